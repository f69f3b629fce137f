"""Sweeps through real Ray Tune over the Ray Train trainer, on CPU."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import tiny_config
from raypipe.checkpoint import latest_checkpoint, load_state
from raypipe.config import ConfigError, load_config
from raypipe.sweep import main
from raypipe.sweepspec import load_sweep
from wandb_offline import offline_runs, read_group

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def write_sweep(tmp_path: Path, embedded_data: Path, **extra) -> Path:
    base = tiny_config(embedded_data, tmp_path / "runs", max_steps=40, eval_interval=5)
    base.train.sample_tokens = 0
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base.to_dict()))
    spec = {
        "name": "lr-test", "base": "base.yaml",
        # Good rates first: they set the rung cut-offs that the bad ones then fall below.
        "search": {"train.learning_rate": {"grid": [3e-3, 1e-2, 1e-4, 1e-5]}},
        "tie": {"train.min_lr": {"of": "train.learning_rate", "factor": 0.1}},
        "scheduler": {"type": "asha", "grace_period": 10, "reduction_factor": 2},
        "resources": {"num_workers": 1, "cpus_per_worker": 1}, "max_concurrent_trials": 2,
        "storage_path": str(tmp_path / "sweeps"), **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def trial_history(run_dir: Path) -> list[dict]:
    """A trial's own record: summary's metrics.jsonl if it finished, else its last checkpoint."""
    if (run_dir / "metrics.jsonl").is_file():
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return load_state(latest_checkpoint(run_dir))["history"]


def test_lr_sweep_with_asha(ray_cluster, embedded_data, tmp_path):
    assert main([str(write_sweep(tmp_path, embedded_data))]) == 0
    out = tmp_path / "sweeps" / "lr-test"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4
    assert any(r["stopped_early"] == "True" and int(r["steps"]) < 40 for r in rows), "ASHA stopped nothing"
    assert any(r["stopped_early"] == "False" and int(r["steps"]) == 40 for r in rows)
    recorded = {}  # trial id -> the last step Tune recorded for it (each trial's result.json)
    for path in out.glob("*/result.json"):
        results = [json.loads(line) for line in path.read_text().splitlines()]
        recorded[results[-1]["trial_id"]] = results[-1]["step"]
    for r in rows:  # the table agrees with what Tune recorded, and with each trial's own files up to it
        assert int(r["steps"]) == recorded[r["trial_id"]]
        history = [h for h in trial_history(Path(r["run_dir"])) if h["step"] <= int(r["steps"])]
        assert float(r["best_val_loss"]) == pytest.approx(min(h["val_loss"] for h in history))
        assert int(r["steps"]) == history[-1]["step"]
        assert float(r["train.min_lr"]) == pytest.approx(float(r["train.learning_rate"]) * 0.1)
        if r["stopped_early"] == "False":
            summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
            assert summary["best_val_loss"] == pytest.approx(float(r["best_val_loss"]))
            # One W&B run per trial, grouped by sweep. (A trial ASHA stops is killed, and an
            # offline W&B run loses what it had not flushed yet: only finished trials are read.)
            (wandb_run,) = offline_runs(r["run_dir"])
            assert read_group(wandb_run) == "lr-test"
    best = min(rows, key=lambda r: float(r["best_val_loss"]))
    assert rows[0]["trial_id"] == best["trial_id"]
    best_cfg = load_config(out / "best_config.yaml")  # ready to run as it is
    assert best_cfg.train.learning_rate == pytest.approx(float(best["train.learning_rate"]))
    assert best_cfg.train.min_lr == pytest.approx(best_cfg.train.learning_rate * 0.1)
    for png in ("val_loss_vs_train_learning_rate.png", "val_loss_curves.png"):
        assert (out / png).read_bytes()[:8] == PNG


def processes_of_cluster(driver_pid: int) -> list[int]:
    """Every process of the local Ray a driver started: its raylet and what that raylet spawned
    (workers carry RAY_RAYLET_PID). Only that cluster: never every Ray process on the machine."""
    def read(pid: str, name: str) -> bytes:
        try:
            return Path(f"/proc/{pid}/{name}").read_bytes()
        except OSError:
            return b""

    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    raylets = [p for p in pids if b"raylet" in read(p, "cmdline")
               and read(p, "stat").rsplit(b")", 1)[-1].split()[1:2] == [str(driver_pid).encode()]]
    marks = {f"RAY_RAYLET_PID={p}".encode() for p in raylets}
    return [int(p) for p in pids if marks & set(read(p, "environ").split(b"\0"))]


def finished_in_tune_state(sweep_dir: Path) -> set[str]:
    """Trials that Tune's own experiment state (what --resume reads) records as finished."""
    done = set()
    for path in sweep_dir.glob("experiment_state-*.json"):
        try:
            trials = [json.loads(t[0]) for t in json.loads(path.read_text())["trial_data"]]
        except (ValueError, KeyError):  # being rewritten right now
            continue
        done |= {t["trial_id"] for t in trials if t["status"] == "TERMINATED"}
    return done


def test_sweep_survives_a_killed_driver(ray_cluster, embedded_data, tmp_path):
    """SIGKILL the sweep's driver (and the local Ray it started) mid-sweep, then --resume."""
    sweep = write_sweep(tmp_path, embedded_data, scheduler={"type": "fifo"})
    runs = tmp_path / "sweeps" / "lr-test" / "runs"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "raypipe.sweep", str(sweep)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not finished_in_tune_state(tmp_path / "sweeps" / "lr-test"):
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.2)
    cluster = processes_of_cluster(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its raylet and GCS: a crashed head
    for pid in cluster:  # and the workers that raylet had started (they have their own groups)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    finished = {t: (runs / t / "summary.json").stat().st_mtime_ns for t in finished_in_tune_state(runs.parent)}
    assert finished and len(finished) < 4

    assert main([str(sweep), "--resume"]) == 0  # on this test session's Ray
    rows = list(csv.DictReader(open(tmp_path / "sweeps" / "lr-test" / "results.csv")))
    assert len(rows) == 4 and all(int(r["steps"]) == 40 for r in rows)
    for trial, mtime in finished.items():  # finished trials were not run again
        assert (runs / trial / "summary.json").stat().st_mtime_ns == mtime


def test_sweep_file_errors(tmp_path, embedded_data):
    good = yaml.safe_load(write_sweep(tmp_path, embedded_data).read_text())

    def check(change: dict, match: str):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**good, **change}))
        with pytest.raises(ConfigError, match=match):
            load_sweep(path)

    check({"serach": {}}, r"unknown key 'serach'; did you mean 'search'")
    check({"search": {"train.learning_rat": {"loguniform": [1e-4, 1e-2]}}},
          r"search: 'train.learning_rat' is not a config key; did you mean 'train.learning_rate'")
    check({"search": {"train.learning_rate": {"lognormal": [1, 2]}}}, r"must be one of \{loguniform")
    check({"search": {"train.learning_rate": {"uniform": [1e-2, 1e-4]}}}, r"low < high")
    check({"tie": {}, "search": {"train.batch_size": {"choice": [8, "x"]}}}, r"'train.batch_size' must be an integer, got 'x'")
    check({"tie": {}, "search": {"train.learning_rate": {"choice": [1e-5]}}},
          r"'train.min_lr' = 0.0003: must not exceed train.learning_rate")
    check({"scheduler": {"type": "hyperband"}}, r"expected asha or fifo")
    check({"resources": {"num_workers": 2, "use_gpu": True, "gpus_per_worker": 0.5}}, r"Duplicate GPU detected")
    check({"resources": {"workers": 2}}, r"resources: unknown key 'workers'")


def test_shipped_sweep_files_are_valid():
    for path in sorted((ROOT / "sweeps").glob("*.yaml")):
        spec = load_sweep(path)
        assert spec.search and spec.name == path.stem
