"""SIGKILL the driver, or a Ray worker, mid-run and go on: the same losses as a run never interrupted,
and every evaluation in metrics.jsonl and in the W&B offline files read back."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import tiny_config
from raypipe.checkpoint import load_state
from raypipe.config import load_config
from raypipe.loop import WorkerEnv, train
from raypipe.train import main
from wandb_offline import read_run_history

MAX_STEPS, EVAL_INTERVAL = 100, 10
EVAL_STEPS = list(range(EVAL_INTERVAL, MAX_STEPS + 1, EVAL_INTERVAL))

pytestmark = pytest.mark.slow


def write_config(embedded_data: Path, tmp_path: Path, wandb_mode: str = "offline", max_failures: int = 0) -> Path:
    cfg = tiny_config(embedded_data, tmp_path / "runs", max_steps=MAX_STEPS, eval_interval=EVAL_INTERVAL)
    cfg.train.sample_tokens = 0  # a checkpoint at every evaluation (checkpoint_interval unset)
    cfg.ray.checkpoints_to_keep, cfg.ray.max_failures, cfg.wandb.mode = 20, max_failures, wandb_mode
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


@pytest.fixture(scope="module")
def uninterrupted(embedded_data, tmp_path_factory) -> Path:
    """The final checkpoint of the same run never interrupted, trained in this process with one
    thread, as a Ray worker of 1 CPU runs (the same loop; Ray only hands it its checkpoints)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg = load_config(str(write_config(embedded_data, tmp, wandb_mode="disabled")), [])
    final = f"checkpoint_{MAX_STEPS:07d}"

    def keep(metrics, checkpoint):
        if checkpoint is not None and checkpoint.name == final:
            checkpoint.rename(tmp / final)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, WorkerEnv(report=keep, log=lambda _: None))
    finally:
        torch.set_num_threads(threads)
    return tmp / final


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_as_uninterrupted(run_dir: Path, reference: Path) -> None:
    final = run_dir / f"checkpoint_{MAX_STEPS:07d}"
    state, expected = load_state(final), load_state(reference)
    assert len(state["step_losses"]) == MAX_STEPS and state["step_losses"] == expected["step_losses"]  # bit-identical
    wa, wb = load_file(str(final / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wb)
    history = metrics(run_dir)
    assert [h["step"] for h in history] == EVAL_STEPS  # none missing, none twice
    losses = [(h["train_loss"], h["val_loss"]) for h in history]
    assert losses == [(h["train_loss"], h["val_loss"]) for h in expected["history"]]
    assert [(h["train_loss"], h["val_loss"]) for h in state["history"]] == losses
    # W&B: every segment of the run (one per start) merged, as `wandb sync` uploads them.
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_run_history(str(run_dir), summary["wandb_run_id"])
    steps = [r["_step"] for r in rows]
    assert steps == sorted(set(steps)), "a W&B step logged twice or out of order"
    evaluations = [r for r in rows if "val_loss" in r]
    assert [r["_step"] for r in evaluations] == EVAL_STEPS
    assert [(r["train_loss"], r["val_loss"]) for r in evaluations] == losses


def session_pids(sid: int) -> list[int]:
    """Processes of session `sid`: a driver started in its own session, its local Ray and its workers."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in run_dir.glob("checkpoint_0*"))


def interrupt_driver(config: Path, run_dir: Path, sig: int, env: dict) -> int:
    """Start `python -m raypipe.train` in its own session, send `sig` to its process group (what a
    terminal's Ctrl-C does with SIGINT) once two checkpoints exist; return its exit status once it
    and every process of its session (its local Ray, the workers) are gone."""
    with open(config.parent / f"{run_dir.name}.log", "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "raypipe.train", "--config", str(config), "--name", run_dir.name],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 240
    while len(checkpoint_steps(run_dir)) < 2 and driver.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(driver.pid, sig)  # the driver and its local Ray (the workers are in their own groups)
    try:
        returncode = driver.wait(timeout=120)
    finally:
        deadline = time.time() + 60
        while session_pids(driver.pid) and time.time() < deadline:  # the workers notice and exit
            time.sleep(0.2)
        for pid in session_pids(driver.pid):  # none should be left; if one is, it must not write beside a resume
            os.kill(pid, signal.SIGKILL)
    assert not (run_dir / "summary.json").exists() and 2 <= len(checkpoint_steps(run_dir))
    assert checkpoint_steps(run_dir)[-1] < MAX_STEPS, "the run ended before it was interrupted"
    return returncode


def test_driver_killed_then_resumed(uninterrupted, embedded_data, tmp_path):
    config, run_dir = write_config(embedded_data, tmp_path), tmp_path / "runs" / "killed"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user's run
    assert interrupt_driver(config, run_dir, signal.SIGKILL, env) == -signal.SIGKILL

    resumed = subprocess.run([sys.executable, "-m", "raypipe.train", "--resume", str(run_dir)],
                             capture_output=True, text=True, env=env, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["restarts"] == 1
    assert "[raypipe] started a local Ray in " in resumed.stdout  # and how to keep one running
    assert "Failed to send resource request" not in resumed.stdout + resumed.stderr  # its coordinator came up first
    assert_same_as_uninterrupted(run_dir, uninterrupted)


def test_ctrl_c_leaves_every_checkpointed_evaluation_in_wandb(embedded_data, tmp_path):
    """Ctrl-C aborts the run; the rank-0 worker finishes its W&B run before Ray kills it, so W&B holds
    every evaluation the checkpoints hold even if the run is never resumed."""
    config, run_dir = write_config(embedded_data, tmp_path), tmp_path / "runs" / "interrupted"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    assert interrupt_driver(config, run_dir, signal.SIGINT, env) != 0
    state = load_state(run_dir / f"checkpoint_{checkpoint_steps(run_dir)[-1]:07d}")
    rows = read_run_history(str(run_dir), state["wandb_run_id"])
    held = [(r["_step"], r["val_loss"]) for r in rows if "val_loss" in r]
    assert held[:len(state["history"])] == [(h["step"], h["val_loss"]) for h in state["history"]]


def test_worker_killed_and_restarted(uninterrupted, ray_cluster, embedded_data, tmp_path):
    from ray.util.state import list_actors

    config, run_dir = write_config(embedded_data, tmp_path, max_failures=1), tmp_path / "runs" / "worker"
    killed = []

    def kill_after_second_checkpoint():
        # Ray's snapshot names the checkpoints it registered: the restart goes on from the latest of them.
        snapshot, deadline = run_dir / "checkpoint_manager_snapshot.json", time.time() + 240
        while time.time() < deadline and not killed:
            registered = set(re.findall(r"checkpoint_(\d{7})", snapshot.read_text())) if snapshot.is_file() else ()
            if len(registered) >= 2:
                for actor in list_actors(address=f"http://{ray_cluster.dashboard_url}",
                                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]):
                    os.kill(actor["pid"], signal.SIGKILL)
                    killed.append(actor["pid"])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_second_checkpoint, daemon=True)
    killer.start()
    assert main(["--config", str(config), "--name", "worker"]) == 0
    killer.join(timeout=5)
    assert killed, "the worker was never killed"
    assert json.loads((run_dir / "summary.json").read_text())["restarts"] == 1
    assert_same_as_uninterrupted(run_dir, uninterrupted)
