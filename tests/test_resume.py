"""Checkpoints that resume exactly, survive a killed worker, and refuse what they should."""

import json
import os
import pickle
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
from raypipe.checkpoint import (CheckpointError, check_compatible, file_digest, latest_checkpoint, load_for_resume,
                                load_model, load_state, verify)
from raypipe.data import read_meta
from raypipe.loop import WorkerEnv, train
from raypipe.step_results import NonFiniteError
from raypipe.train import main
from wandb_offline import offline_runs


def keep_checkpoints(into: Path):
    into.mkdir(parents=True, exist_ok=True)
    return lambda metrics, checkpoint: checkpoint.rename(into / checkpoint.name)


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-identical
    sa, sb = load_state(a), load_state(b)
    assert sa["step_losses"] == sb["step_losses"] and len(sa["step_losses"]) == sa["step"]
    assert [h["val_loss"] for h in sa["history"]] == [h["val_loss"] for h in sb["history"]]


def test_exact_resume_one_worker(embedded_data, tmp_path):
    def cfg(**kw):
        c = tiny_config(embedded_data, tmp_path, max_steps=20, eval_interval=5, **kw)
        c.wandb.mode, c.train.sample_tokens = "disabled", 0
        return c

    train(cfg(), WorkerEnv(report=keep_checkpoints(tmp_path / "full"), log=lambda _: None))
    train(cfg(stop_at=10), WorkerEnv(report=keep_checkpoints(tmp_path / "part"), log=lambda _: None))
    assert sorted(p.name for p in (tmp_path / "part").iterdir())[-1] == "checkpoint_0000010"
    logs = []
    summary = train(cfg(), WorkerEnv(report=keep_checkpoints(tmp_path / "part"), log=logs.append),
                    resume=load_for_resume(tmp_path / "part" / "checkpoint_0000010", rank=0))
    assert "[raypipe] resumed from checkpoint_0000010 at step 10 (restart 1)" in logs
    assert summary["steps"] == 20 and [h["step"] for h in summary["history"]] == [5, 10, 15, 20]
    assert_same_run(tmp_path / "full" / "checkpoint_0000020", tmp_path / "part" / "checkpoint_0000020")


@pytest.mark.parametrize("parallel", ["ddp", "zero1", "zero1-overlap"])
def test_exact_resume_two_workers_through_ray(ray_cluster, embedded_data, tmp_path, capsys, parallel):
    # zero1: each rank's slice of AdamW's state is gathered into the checkpoint and sliced again on resume;
    # overlap: checkpoints and evaluations come while the weights' all-gathers may still run.
    cfg = tiny_config(embedded_data, tmp_path / "runs", max_steps=12, eval_interval=3)
    cfg.ray.num_workers, cfg.wandb.mode, cfg.train.sample_tokens = 2, "offline", 0
    cfg.train.shard_optimizer, cfg.train.overlap_comm = parallel != "ddp", parallel == "zero1-overlap"
    cfg.ray.checkpoints_to_keep = 10
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["--config", str(config), "--name", "full"]) == 0
    assert main(["--config", str(config), "--name", "part", "--set", "train.stop_at=6"]) == 0
    assert "6 steps of 12 (train.stop_at; go on with --resume" in capsys.readouterr().out
    part = tmp_path / "runs" / "part"
    assert latest_checkpoint(part).name == "checkpoint_0000006"
    assert main(["--resume", str(part)]) == 0  # in place: same name, Ray restores the run
    summary = json.loads((part / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["restarts"] == 1
    assert [h["step"] for h in summary_history(part)] == [3, 6, 9, 12]
    assert_same_run(tmp_path / "runs" / "full" / "checkpoint_0000012", part / "checkpoint_0000012")
    # Every rank's own RNG and sampler state went into the merged checkpoint.
    assert verify(part / "checkpoint_0000012")["world_size"] == 2
    assert (part / "checkpoint_0000012" / "rank_1.pt").is_file()
    # One W&B run across the restart: the resumed segment logs under the same run id.
    segments = offline_runs(str(part))
    assert len(segments) == 2 and len({s.rsplit("-", 1)[-1] for s in segments}) == 1
    assert segments[0].endswith(summary["wandb_run_id"])


def test_resume_on_another_worker_count_only_when_asked(ray_cluster, embedded_data, tmp_path, capsys):
    """Two ZeRO-1 workers stop at step 6; the run goes on with one worker once the config allows it: the
    same weights, AdamW state and tokens per step, a new batch stream."""
    cfg = tiny_config(embedded_data, tmp_path / "runs", max_steps=12, eval_interval=3, split_over_workers=True,
                      shard_optimizer=True)
    cfg.ray.num_workers, cfg.wandb.mode, cfg.train.sample_tokens = 2, "disabled", 0
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["--config", str(config), "--name", "part", "--set", "train.stop_at=6"]) == 0
    part = tmp_path / "runs" / "part"
    six = load_state(part / "checkpoint_0000006")
    capsys.readouterr()

    assert main(["--resume", str(part), "--set", "ray.num_workers=1"]) == 2  # refused before Ray starts
    err = capsys.readouterr().err
    assert ("checkpoint_0000006 was written by 2 worker(s), this run has 1" in err and "set ray.num_workers=2" in err
            and "train.allow_worker_count_change: true" in err)
    # Without the split the step would shrink to one worker's 8 x 2 sequences: refused, naming both figures.
    assert main(["--resume", str(part), "--set", "ray.num_workers=1", "--set", "train.allow_worker_count_change=true",
                 "--set", "train.split_over_workers=false", "--set", "train.batch_size=4"]) == 2
    assert "trained on 512 tokens per step (2 worker(s)); 1 worker(s) of 4 x 2 sequences would take 256" in \
        capsys.readouterr().err
    assert latest_checkpoint(part).name == "checkpoint_0000006"  # nothing written by the refusals

    assert main(["--resume", str(part), "--set", "ray.num_workers=1", "--set", "train.allow_worker_count_change=true"]) == 0
    assert "written by 2 worker(s); going on with 1, each drawing a new batch stream" in capsys.readouterr().out
    final = load_state(part / "checkpoint_0000012")
    assert final["world_size"] == 1 and final["restarts"] == 1 and verify(part / "checkpoint_0000012")["world_size"] == 1
    assert final["step_losses"][:6] == six["step_losses"] and len(final["step_losses"]) == 12
    # It went on from the trained weights and AdamW state: step 7 is near step 6, far below a fresh model's loss.
    assert abs(final["step_losses"][6] - six["step_losses"][5]) < 0.5 < final["step_losses"][0] - final["step_losses"][6]
    assert [h["step"] for h in final["history"]] == [3, 6, 9, 12]


def summary_history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_killed_worker_is_restarted_from_the_last_checkpoint(ray_cluster, embedded_data, tmp_path):
    """SIGKILL the training worker from outside, mid-run; Ray restarts it and it goes on from the checkpoint."""
    from ray.util.state import list_actors

    cfg = tiny_config(embedded_data, tmp_path / "runs", max_steps=100, eval_interval=10)
    cfg.ray.max_failures, cfg.wandb.mode, cfg.train.sample_tokens = 1, "disabled", 0
    run_dir = tmp_path / "runs" / "killed"
    killed = []

    def kill_after_first_checkpoint():
        # Wait until Ray has registered a checkpoint (its snapshot names it), not just until files exist.
        snapshot, deadline = run_dir / "checkpoint_manager_snapshot.json", time.time() + 240
        while time.time() < deadline and not killed:
            registered = re.findall(r"checkpoint_(\d{7})", snapshot.read_text()) if snapshot.is_file() else []
            if registered:
                for actor in list_actors(address=f"http://{ray_cluster.dashboard_url}",
                                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]):
                    os.kill(actor["pid"], signal.SIGKILL)
                    killed.append((actor["pid"], max(map(int, registered))))
            time.sleep(0.1)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["--config", str(config), "--name", "killed"]) == 0
    killer.join(timeout=5)
    assert killed, "the worker was never killed"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 100 and summary["restarts"] == 1
    history = summary_history(run_dir)
    steps = [h["step"] for h in history]
    assert steps == list(range(10, 101, 10))  # every eval once: no step counted twice, none lost
    # After the restart the losses go on from the checkpoint, not from a fresh model (ln 512 = 6.24).
    resumed_at = killed[0][1]
    after = next(h for h in history if h["step"] > resumed_at)
    assert after["val_loss"] < history[0]["val_loss"] < 6.0


def test_kill_during_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(f"""
import sys, torch
from raypipe.checkpoint import save_checkpoint, capture_rank_state
from raypipe.config import Config
from raypipe.model import GemmaLM
cfg = Config(); cfg.model.vocab_size, cfg.model.n_embd, cfg.model.mlp_hidden = 4096, 512, 2048
model = GemmaLM(cfg.model); opt = torch.optim.AdamW(model.parameters())
model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward(); opt.step()
rank_state = capture_rank_state(torch.Generator(), torch.device("cpu"))
for step in range(1, 10_000):
    save_checkpoint({str(tmp_path)!r}, f"checkpoint_{{step:07d}}", rank=0, rank_state=rank_state, model=model,
                    optimizer_state=opt.state_dict(), config=cfg, state={{"step": step, "world_size": 1}})
    print(step, flush=True)
""")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "1"  # one checkpoint is complete ...
    time.sleep(0.35)  # ... and later ones are being written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = sorted(tmp_path.glob("checkpoint_0*"))
    assert written, "no checkpoint at all"
    for d in written:  # whatever the kill interrupted never shows up under a checkpoint name
        verify(d)
        load_model(d)
    assert latest_checkpoint(tmp_path) == written[-1]


@pytest.fixture(scope="module")
def checkpoint_dir(embedded_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    cfg = tiny_config(embedded_data, root, max_steps=4, eval_interval=4)
    cfg.wandb.mode, cfg.train.sample_tokens = "disabled", 0
    train(cfg, WorkerEnv(report=keep_checkpoints(root / "kept"), log=lambda _: None))
    return root / "kept" / "checkpoint_0000004"


def copy_of(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def rewrite_manifest(d: Path) -> None:
    """Make the manifest and the rank digests agree with the files as they now are (a forged checkpoint)."""
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"] = {name: file_digest(d / name) for name in manifest["files"]}
    (d / "manifest.json").write_text(json.dumps(manifest))
    for r in range(manifest["world_size"]):
        (d / f"rank_{r}.json").write_text(json.dumps({"file": f"rank_{r}.pt", **file_digest(d / f"rank_{r}.pt")}))


def test_truncated_file_is_refused(checkpoint_dir, tmp_path):
    d = copy_of(checkpoint_dir, tmp_path / "c")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: \d+ bytes, but manifest.json says \d+: truncated"):
        load_model(d)
    rewrite_manifest(d)  # even with a manifest that agrees, the file itself does not parse
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_model(d)


def test_corrupted_file_is_refused(checkpoint_dir, tmp_path):
    d = copy_of(checkpoint_dir, tmp_path / "c")
    data = bytearray((d / "optimizer.pt").read_bytes())
    data[10:60] = b"\xff" * 50
    (d / "optimizer.pt").write_bytes(bytes(data))
    altered = r"optimizer.pt: sha256 \w+\.\.\., but manifest.json says \w+\.\.\.: the file was altered"
    with pytest.raises(CheckpointError, match=altered):
        load_for_resume(d, rank=0)
    rewrite_manifest(d)  # even with a manifest that agrees, the file itself does not parse
    with pytest.raises(CheckpointError, match="optimizer.pt: refused, not a plain tensor file"):
        load_for_resume(d, rank=0)


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/raypipe-pickle-ran"


def test_a_pickle_that_would_run_code_is_refused(checkpoint_dir, tmp_path):
    Path(MARKER).unlink(missing_ok=True)
    d = copy_of(checkpoint_dir, tmp_path / "c")
    (d / "rank_0.pt").write_bytes(pickle.dumps({"python": RunsCode()}))
    with pytest.raises(CheckpointError, match=r"rank_0.pt: \d+ bytes, but rank_0.json says"):
        load_for_resume(d, rank=0)
    rewrite_manifest(d)
    with pytest.raises(CheckpointError, match="rank_0.pt: refused, not a plain tensor file"):
        load_for_resume(d, rank=0)
    assert not Path(MARKER).exists()


def test_a_checkpoint_of_another_shape_or_data_is_refused(checkpoint_dir, embedded_data, tmp_path, capsys):
    cfg = tiny_config(embedded_data, tmp_path)
    cfg.model.vocab_size = 512
    meta = read_meta(embedded_data)
    check_compatible(checkpoint_dir, cfg, meta, world_size=1)  # the same run fits
    cfg.model.n_layer = 3
    with pytest.raises(CheckpointError, match=r"another model shape: model.n_layer: checkpoint 2, run 3"):
        check_compatible(checkpoint_dir, cfg, meta, world_size=1)
    cfg.model.n_layer = 2
    with pytest.raises(CheckpointError, match=r"other data"):
        check_compatible(checkpoint_dir, cfg, {**meta, "sha256": {"train": "0" * 64}}, world_size=1)
    shards = {split: [{"file": f"{split}-00000.bin", "tokens": meta["tokens"][split], "sha256": sha}]
              for split, sha in meta["sha256"].items()}
    sharded = {k: v for k, v in meta.items() if k != "sha256"} | {"shards": shards}
    with pytest.raises(CheckpointError, match=r"other data"):  # the same tokens in another layout
        check_compatible(checkpoint_dir, cfg, sharded, world_size=1)
    cfg.model.attention, cfg.model.fused_kernels, cfg.model.fused_head = "matmul", False, True  # compute only
    check_compatible(checkpoint_dir, cfg, meta, world_size=1)
    with pytest.raises(CheckpointError, match=r"written by 1 worker\(s\), this run has 2"):
        check_compatible(checkpoint_dir, cfg, meta, world_size=2)
    # And through the CLI, before Ray starts.
    assert main(["--resume", str(checkpoint_dir), "--set", "model.n_layer=3", "--storage-path", str(tmp_path)]) == 2
    assert "model.n_layer: checkpoint 2, run 3" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "nothing")]) == 2


def test_non_finite_steps_are_skipped_then_stop_the_run(embedded_data, tmp_path):
    cfg = tiny_config(embedded_data, tmp_path, max_steps=30, eval_interval=2, warmup_steps=0,
                      learning_rate=1e30, min_lr=0.0, max_nonfinite_steps=3)
    cfg.wandb.mode, cfg.train.sample_tokens = "disabled", 0
    logs = []
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row .* the last checkpoint \(step \d+\) is intact"):
        train(cfg, WorkerEnv(report=keep_checkpoints(tmp_path / "kept"), log=logs.append))
    assert sum("update skipped" in line for line in logs) >= 3
    last = latest_checkpoint(tmp_path / "kept")
    assert load_state(last)["skipped_steps"] >= 1 and load_model(last) is not None


def test_a_batch_stream_begun_anew_draws_other_windows(embedded_data):
    from raypipe.batches import BatchSampler

    def first_batch(from_step: int) -> torch.Tensor:
        return BatchSampler(embedded_data, "train", 32, 4, "cpu", seed=1, rank=0, from_step=from_step)()[0]

    assert torch.equal(first_batch(0), BatchSampler(embedded_data, "train", 32, 4, "cpu", seed=1, rank=0)()[0])
    assert not torch.equal(first_batch(0), first_batch(6)) and not torch.equal(first_batch(6), first_batch(7))
    assert torch.equal(first_batch(6), first_batch(6))  # stable: a later exact resume draws it again
