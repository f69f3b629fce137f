"""W&B holds every evaluation of a resumed run: real W&B offline files, read back (no Ray here)."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from raypipe.config import Config
from raypipe.tracking import Tracker, finish_open_run, offline_logged_step, wait_for_exit_record
from wandb_offline import read_run_history, segments


def evaluation(step: int) -> dict:
    return {"step": step, "val_loss": 10.0 / step, "train_loss": 11.0 / step}


def wandb_cfg():
    cfg = Config().wandb
    cfg.mode = "offline"
    return cfg


def next_second() -> None:
    """W&B names a segment's folder by the second it started: a resume within the same second would
    reuse the folder and overwrite the earlier segment's file."""
    time.sleep(1.05 - time.time() % 1)


def evals(rows: list[dict]) -> list[tuple[int, float]]:
    return [(r["_step"], r["val_loss"]) for r in rows if "val_loss" in r]


KILLED = """
import os, signal, sys, time
from raypipe.config import Config
from raypipe.tracking import Tracker
cfg = Config().wandb
cfg.mode = "offline"
tracker = Tracker(cfg, "killed", {}, sys.argv[1])
for step in (10, 20):
    tracker.log({"step": step, "val_loss": 10.0 / step, "train_loss": 11.0 / step}, step=step)
tracker.log({"step_loss": 0.5}, step=25)
print(tracker.run_id, flush=True)
time.sleep(1)  # W&B's service has the records now
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # Tracker sets it; undone after each test
    yield
    os.environ.pop("WANDB_SERVICE", None)  # this process's W&B service: not for the processes later tests start


def run_killed(tmp_path: Path) -> str:
    """A process that logs evaluations 10 and 20 and step 25, then is SIGKILLed; returns its W&B run id."""
    proc = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_evaluations_lost_by_a_killed_run_are_logged_again_on_resume(tmp_path):
    run_id = run_killed(tmp_path)
    # What W&B 0.31 does: records wait in its service's memory for a 32 KiB block; the kill loses them.
    assert evals(read_run_history(str(tmp_path), run_id)) == [], "W&B kept them: this test no longer tests a loss"

    tracker = Tracker(wandb_cfg(), "killed", {}, tmp_path, run_id=run_id, history=[evaluation(10), evaluation(20)])
    tracker.log({"step_loss": 0.4}, step=21)
    tracker.log(evaluation(30), step=30)
    tracker.finish()
    assert len(segments(str(tmp_path), run_id)) == 2
    assert evals(read_run_history(str(tmp_path), run_id)) == [(s, 10.0 / s) for s in (10, 20, 30)]


DRIVER = """
import os, subprocess, sys, time
from raypipe.config import Config
from raypipe.tracking import Tracker
cfg = Config().wandb
cfg.mode = "offline"
Tracker(cfg, "driver", {}, sys.argv[1] + "/driver").finish()
assert "WANDB_SERVICE" in os.environ  # W&B's doing: children would join this process's service
killed = subprocess.run([sys.executable, "-c", sys.argv[2], sys.argv[1]], capture_output=True, text=True)
assert killed.returncode == -9, killed.stderr
run_id = killed.stdout.strip()
time.sleep(1.05)  # the next second: a segment folder of its own
resume = ("import sys; from raypipe.config import Config; from raypipe.tracking import Tracker; "
          "cfg = Config().wandb; cfg.mode = 'offline'; h = [dict(step=s, val_loss=10.0 / s) for s in (10, 20)]; "
          "Tracker(cfg, 'killed', {}, sys.argv[1], run_id=sys.argv[2], history=h).finish()")
resumed = subprocess.run([sys.executable, "-c", resume, sys.argv[1], run_id], capture_output=True, text=True)
assert resumed.returncode == 0, resumed.stderr[-3000:]
print(run_id)
"""


def test_a_killed_process_that_inherited_a_wandb_service_can_be_resumed(tmp_path):
    """As Ray workers started by a driver that had used W&B: W&B gives child processes its service's
    address. The killed worker's run must not stay open in that service and refuse the restarted one."""
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path), KILLED], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = proc.stdout.strip()
    assert evals(read_run_history(str(tmp_path), run_id)) == [(10, 1.0), (20, 0.5)]


def test_what_the_earlier_segment_holds_is_not_logged_twice(tmp_path):
    first = Tracker(wandb_cfg(), "clean", {}, tmp_path)
    for step in (5, 10, 15, 20, 25):
        first.log(evaluation(step) if step % 10 == 0 else {"step_loss": 1.0 / step}, step=step)
    first.finish()  # a clean end: W&B wrote everything, up to step 25
    run_id = first.run_id
    assert offline_logged_step(tmp_path, run_id) == 25
    next_second()

    # Resumed from the checkpoint of step 20: steps 21..25 come again and W&B holds them already.
    second = Tracker(wandb_cfg(), "clean", {}, tmp_path, run_id=run_id, history=[evaluation(10), evaluation(20)])
    for step in (25, 30):
        second.log(evaluation(step) if step % 10 == 0 else {"step_loss": 1.0 / step}, step=step)
    second.finish()
    rows = read_run_history(str(tmp_path), run_id)
    steps = [r["_step"] for r in rows]
    assert steps == [5, 10, 15, 20, 25, 30]  # each once, in order across both segments
    assert evals(rows) == [(s, 10.0 / s) for s in (10, 20, 30)]


def test_a_torn_transaction_log_counts_only_its_whole_records(tmp_path):
    tracker = Tracker(wandb_cfg(), "torn", {}, tmp_path)
    for step in range(1, 61):  # a few blocks of 32 KiB
        tracker.log({"step_loss": 1.0 / step, "text": "x" * 1500}, step=step)
    tracker.finish()
    (folder,) = segments(str(tmp_path), tracker.run_id)
    log = Path(folder) / f"run-{tracker.run_id}.wandb"
    assert offline_logged_step(tmp_path, tracker.run_id) == 60
    data = log.read_bytes()
    assert len(data) > 3 * 32768
    log.write_bytes(data[: 2 * 32768 + 1000])  # a kill while writing the third block
    started = time.monotonic()
    assert not wait_for_exit_record(str(log), timeout=0.5) and time.monotonic() - started < 5
    held = offline_logged_step(tmp_path, tracker.run_id)
    assert 1 < held < 60
    log.write_bytes(data[:32768] + b"\xff" * 1000)  # garbage after a whole block: ignored, not an error
    assert 0 < offline_logged_step(tmp_path, tracker.run_id) < held


def test_a_new_run_from_a_checkpoint_starts_with_its_history(tmp_path):
    tracker = Tracker(wandb_cfg(), "fresh", {}, tmp_path, history=[evaluation(20), evaluation(10)])
    tracker.log(evaluation(30), step=30)
    tracker.finish()
    assert evals(read_run_history(str(tmp_path), tracker.run_id)) == [(s, 10.0 / s) for s in (10, 20, 30)]


def test_a_shutdown_finishes_the_open_run_from_another_thread(tmp_path):
    """What a worker being shut down (Ctrl-C) does while its training thread still runs."""
    tracker = Tracker(wandb_cfg(), "aborted", {}, tmp_path)
    tracker.log(evaluation(10), step=10)
    shutdown = threading.Thread(target=finish_open_run)
    shutdown.start()
    shutdown.join()
    tracker.log(evaluation(20), step=20)  # the training thread goes on until it is killed: no error
    tracker.finish()
    assert evals(read_run_history(str(tmp_path), tracker.run_id)) == [(10, 1.0)]
    finish_open_run()  # nothing open any more
