"""End to end through a real local Ray: TorchTrainer, 2 DDP workers (gloo), checkpoints, W&B offline."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import tiny_config
from raypipe.checkpoint import load_model, read_config
from raypipe.batches import BatchSampler
from raypipe.loop import estimate_loss
from raypipe.model import GemmaLM
from raypipe.train import main
from wandb_offline import offline_runs, read_config as wandb_config, read_history

METRICS = ("train_loss", "val_loss", "learning_rate", "grad_norm")


def test_two_workers_train_report_and_checkpoint(ray_cluster, embedded_data, tmp_path, capsys):
    cfg = tiny_config(embedded_data, tmp_path / "runs", max_steps=40)
    # 8 x 4 sequences per step in all, shared: each of the 2 workers runs 8 x 2.
    cfg.ray.num_workers, cfg.train.grad_accum_steps, cfg.train.split_over_workers = 2, 4, True
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))

    assert main(["--config", str(config_file), "--name", "tiny-ddp"]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "tiny-ddp"
    assert f"run directory: {run_dir}" in out and "final val loss is below it" in out

    summary = json.loads((run_dir / "summary.json").read_text())
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["world_size"] == 2 and summary["steps"] == 40
    assert summary["tokens"] == 40 * 8 * 32 * 2 * 2  # steps x batch x block x each worker's accumulation x workers
    assert [h["step"] for h in history] == [10, 20, 30, 40]
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.5  # the loss falls
    assert summary["final_val_loss"] == history[-1]["val_loss"]
    assert summary["final_val_loss"] < summary["val_unigram_entropy"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["ray"]["num_workers"] == 2

    # The best checkpoint (Ray kept it under the run dir) loads into a fresh model of its shape.
    best = Path(summary["best_checkpoint"])
    assert best.parent == run_dir and best.name == f"checkpoint_{summary['best_step']:07d}"
    model = load_model(best)
    assert read_config(best).model.n_layer == 2
    fresh = GemmaLM(model.cfg)
    loss = {}
    for name, m in (("trained", model), ("fresh", fresh)):  # the same val batches for both
        batches = {"val": BatchSampler(embedded_data, "val", 32, 8, "cpu", seed=0, stream="probe")}
        loss[name] = estimate_loss(m, 4, contextlib.nullcontext(), batches)["val"]
    assert loss["trained"] < loss["fresh"] - 0.5
    assert len(list(run_dir.glob("checkpoint_0*"))) == cfg.ray.checkpoints_to_keep

    # W&B (offline, rank 0 only): read back what it wrote, no mock.
    (wandb_run,) = offline_runs(str(run_dir))
    assert wandb_run.endswith(summary["wandb_run_id"]) and summary["wandb_mode"] == "offline"
    rows = read_history(wandb_run)
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    for evals, (row, h) in enumerate(zip(rows, history), start=1):
        for name in METRICS:
            assert row[name] == pytest.approx(h[name])
        # The eval samples, as one growing W&B table (2 samples per eval).
        assert row["samples._type"] == "table-file" and row["samples.nrows"] == 2 * evals
    assert wandb_config(wandb_run)["train"]["max_steps"] == 40

    # The same config on one worker, which then runs all 8 x 4: the same effective batch, so the same
    # loss curve up to sampling noise (measured: within 0.07; half the batch ends 0.28 higher).
    cfg.ray.num_workers, cfg.wandb.mode = 1, "disabled"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["--config", str(config_file), "--name", "tiny-one"]) == 0
    one = [json.loads(line) for line in (tmp_path / "runs" / "tiny-one" / "metrics.jsonl").read_text().splitlines()]
    assert [h["tokens"] for h in one] == [h["tokens"] for h in history]
    for a, b in zip(one, history):
        assert abs(a["val_loss"] - b["val_loss"]) < 0.12 and abs(a["train_loss"] - b["train_loss"]) < 0.12


def test_more_workers_than_the_local_machine_has_is_refused_up_front(tmp_path):
    """A fresh local Ray asked for more CPUs than it has would wait forever: the CLI refuses it."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "raypipe.train", "--set", "ray.num_workers=64",
                           "--set", f"data.dir={tmp_path / 'data'}", "--set", "data.num_stories=300",
                           "--storage-path", str(tmp_path / "runs")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "64 worker(s) x (CPU 2) do not fit this machine" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_one_worker_with_wandb_disabled(ray_cluster, embedded_data, tmp_path):
    from raypipe.driver import run
    from raypipe.train import parse_args, resolve_config

    args = parse_args(["--set", f"data.dir={embedded_data}", "--set", "data.num_stories=3000",
                       "--set", "model.n_layer=2", "--set", "model.n_embd=32", "--set", "model.mlp_hidden=64",
                       "--set", "train.max_steps=6", "--set", "train.eval_interval=3", "--set", "train.eval_batches=2",
                       "--set", "train.batch_size=4", "--set", "train.warmup_steps=1",
                       "--set", "ray.cpus_per_worker=1", "--set", "wandb.mode=disabled",
                       "--name", "one", "--storage-path", str(tmp_path)])
    summary = run(resolve_config(args))
    assert summary["world_size"] == 1 and summary["steps"] == 6 and summary["wandb_mode"] == "disabled"
    assert summary["tokens"] == 6 * 4 * 128 * 2
    assert not (tmp_path / "one" / "wandb").exists()
    assert sorted(p.name for p in (tmp_path / "one").glob("checkpoint_0*")) == ["checkpoint_0000003", "checkpoint_0000006"]
