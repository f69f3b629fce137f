"""A run a user can rely on: flags taken as typed, the same checks in --dry-run as in the run, a damaged
latest checkpoint passed over on resume, worker failures reported as one clear message, ranks that agree
on skipping a non-finite step. Real local Ray, real checkpoints, real gloo processes."""

import contextlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from helpers import tiny_config
from raypipe.checkpoint import file_digest, latest_checkpoint, load_state
from raypipe.config import load_config
from raypipe.driver import describe_failure
from raypipe.loop import forward_backward
from raypipe.train import main

ROOT = Path(__file__).resolve().parents[1]


def write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def flip_byte(path: Path, offset: int = -100) -> None:
    """Change one byte in place; the size stays the same (what a size check cannot see)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# --- flags -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["123", "run-1.b_2", "x+y=z@1"])
def test_flag_values_are_taken_as_typed(name, tmp_path, capsys):
    storage = tmp_path / "st #1"
    assert main(["--dry-run", "--name", name, "--storage-path", str(storage)]) == 0
    out = capsys.readouterr().out
    assert f"config ok: {name}\n" in out
    assert f"outputs: {storage / name}\n" in out  # not cut at the '#', not read as YAML


@pytest.mark.parametrize("name", ["#run", "a/b", "..", ".", "", "-x", "a b", "a\\b"])
def test_a_run_name_must_be_a_safe_directory_name(name, tmp_path, capsys):
    assert main(["--dry-run", f"--name={name}", "--storage-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --name {name!r}: 'ray.name' = {name!r}: must be a plain directory name")
    assert "--set" not in err


@pytest.mark.parametrize("item", ["ray.name=#run", "ray.storage_path=/x/st #1", "data.dir=data #old"])
def test_a_yaml_comment_in_a_set_value_is_refused_not_dropped(item, capsys):
    assert main(["--dry-run", "--set", item]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --set {item}: the value ") and "holds a YAML comment" in err and "quote it" in err


def test_a_quoted_set_value_keeps_its_hash(tmp_path, capsys):
    assert main(["--dry-run", "--set", f'ray.storage_path="{tmp_path}/st #1"']) == 0
    assert f"outputs: {tmp_path}/st #1/" in capsys.readouterr().out


def test_a_new_run_does_not_take_over_an_existing_one(embedded_data, tmp_path, capsys):
    run_dir = tmp_path / "taken"
    (run_dir / "checkpoint_0000010").mkdir(parents=True)
    config = write_config(tiny_config(embedded_data, tmp_path), tmp_path / "c.yaml")
    assert main(["--config", str(config), "--name", "taken", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir} already holds a run; continue it with --resume {run_dir}" in err


# --- --dry-run refuses what the run refuses ----------------------------------------------------------


def test_dry_run_and_run_both_refuse_workers_that_do_not_fit(tmp_path):
    args = ["--set", "ray.num_workers=64", "--storage-path", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    dry = subprocess.run([sys.executable, "-m", "raypipe.train", "--dry-run", *args], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=120)
    assert dry.returncode == 0 and "resources: ray: 64 worker(s) x (CPU 2) do not fit this machine" in dry.stdout
    assert "a run here would be refused" in dry.stdout
    real = subprocess.run([sys.executable, "-m", "raypipe.train", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    assert real.returncode == 2
    assert real.stderr.strip().startswith("error: ray: 64 worker(s) x (CPU 2) do not fit this machine")
    assert "Started a local Ray instance" not in real.stdout + real.stderr  # refused before Ray starts


@pytest.fixture(scope="module")
def two_checkpoint_run(ray_cluster, embedded_data, tmp_path_factory):
    """A run stopped at step 20 with checkpoints at 10 and 20 (W&B off, no samples)."""
    root = tmp_path_factory.mktemp("trust")
    cfg = tiny_config(embedded_data, root / "runs", stop_at=20)
    cfg.wandb.mode, cfg.train.sample_tokens, cfg.ray.checkpoints_to_keep = "disabled", 0, 3
    config = write_config(cfg, root / "c.yaml")
    assert main(["--config", str(config), "--name", "two"]) == 0
    run_dir = root / "runs" / "two"
    assert sorted(d.name for d in run_dir.glob("checkpoint_0*")) == ["checkpoint_0000010", "checkpoint_0000020"]
    return run_dir


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "state.json", "rank_0.pt", "data_meta.json"])
def test_a_changed_byte_of_the_same_size_is_refused_everywhere(name, two_checkpoint_run, tmp_path, capsys):
    import shutil

    from raypipe.export import main as export_main
    from raypipe.generate import main as generate_main

    ck = shutil.copytree(two_checkpoint_run / "checkpoint_0000020", tmp_path / "run" / "checkpoint_0000020")
    flip_byte(ck / name, offset=len((ck / name).read_bytes()) // 2)
    expected = f"{ck / name}: sha256 "
    assert generate_main([str(ck), "--max-new-tokens", "4"]) == 2
    assert export_main([str(ck), str(tmp_path / "hf")]) == 2
    assert main(["--resume", str(ck), "--dry-run"]) == 2
    errs = capsys.readouterr().err.strip().splitlines()
    assert len(errs) == 3, errs
    for e in errs:
        assert e.startswith("error: ") and expected in e, e
    assert not (tmp_path / "hf").exists()


def test_the_code_that_made_a_run_is_recorded(two_checkpoint_run):
    import re

    from raypipe import __version__

    summary = json.loads((two_checkpoint_run / "summary.json").read_text())
    state = load_state(two_checkpoint_run / "checkpoint_0000020")
    for code in (summary["code"], state["code"]):
        assert code["raypipe"] == __version__
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        if head.returncode == 0:  # a git checkout (CI clones one): its commit
            assert code["git_commit"] == head.stdout.strip() and re.fullmatch(r"[0-9a-f]{40}", code["git_commit"])


def test_dry_run_checks_the_checkpoint_it_would_resume(two_checkpoint_run, capsys):
    ck = two_checkpoint_run / "checkpoint_0000020"
    assert main(["--resume", str(ck), "--set", "model.n_layer=3", "--dry-run"]) == 2
    assert "model.n_layer: checkpoint 2, run 3" in capsys.readouterr().err


# --- failures inside a worker: one clear message -----------------------------------------------------


def test_a_refused_pickle_in_the_worker_ends_in_one_clear_message(two_checkpoint_run, tmp_path, capsys):
    import pickle
    import shutil

    ck = shutil.copytree(two_checkpoint_run / "checkpoint_0000020", tmp_path / "checkpoint_0000020")
    (ck / "rank_0.pt").write_bytes(pickle.dumps({"python": os.getcwd}))  # a pickle torch.load refuses
    # forged consistently: the digests agree, so only the worker's loader can tell
    (ck / "rank_0.json").write_text(json.dumps({"file": "rank_0.pt", **file_digest(ck / "rank_0.pt")}))
    assert main(["--resume", str(ck), "--name", "from-forged", "--storage-path", str(tmp_path / "runs")]) == 1
    err = error_block(capsys.readouterr().err)
    assert err[0].startswith("error: training failed on rank 0: ") and "rank_0.pt: refused, not a plain tensor file" in err[0]
    assert err[1].startswith(f"run directory: {tmp_path / 'runs' / 'from-forged'}")


def error_block(stderr: str) -> list[str]:
    """raypipe's own lines at the end of stderr (Ray's worker logs may come before them)."""
    lines = stderr.strip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("error: "))
    block = lines[start:]
    assert len(block) == 2, block
    return block


def test_a_non_finite_streak_ends_in_one_clear_message(ray_cluster, embedded_data, tmp_path, capsys):
    cfg = tiny_config(embedded_data, tmp_path / "runs", max_steps=30, eval_interval=2, warmup_steps=0,
                      learning_rate=1e30, min_lr=0.0, max_nonfinite_steps=3)
    cfg.wandb.mode, cfg.train.sample_tokens = "disabled", 0
    assert main(["--config", str(write_config(cfg, tmp_path / "c.yaml")), "--name", "nan"]) == 1
    err = error_block(capsys.readouterr().err)
    run_dir = tmp_path / "runs" / "nan"
    last = latest_checkpoint(run_dir)
    assert err[0].startswith("error: training failed on rank 0: 3 optimizer steps in a row had a non-finite loss")
    assert err[1] == (f"run directory: {run_dir}; last complete checkpoint: {last.name} (step "
                      f"{load_state(last)['step']}); go on with: python -m raypipe.train --resume {run_dir}")


def test_a_gpu_out_of_memory_names_the_keys_that_fit_it(tmp_path):
    """A worker's CUDA out-of-memory error, as it reaches the driver from Ray Train's controller: its
    first two sentences and what to change, on one line, not its paragraph of allocator advice."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.29 GiB. GPU 0 has a total capacity of "
                                 "79.19 GiB of which 1.21 GiB is free. Including non-PyTorch memory, this process "
                                 "has 77.97 GiB memory in use. If reserved but unallocated memory is large try "
                                 "setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    error = pickle.loads(pickle.dumps(WorkerGroupError("rank 1 failed", {1: oom})))
    first, where = describe_failure(error, str(tmp_path / "run")).splitlines()
    assert first == ("training failed on rank 1: OutOfMemoryError: CUDA out of memory. Tried to allocate 3.29 GiB. "
                     "The micro-batch does not fit this GPU: halve train.batch_size and double "
                     "train.grad_accum_steps (the same sequences per step, less memory)")
    assert where == f"run directory: {tmp_path / 'run'}; no complete checkpoint was written"


# --- resume in place from the checkpoint the driver verified (runs last: it extends the shared run) -----


def test_resume_passes_over_a_damaged_latest_checkpoint(two_checkpoint_run, capsys):
    run_dir = two_checkpoint_run
    flip_byte(run_dir / "checkpoint_0000020" / "model.safetensors")  # same size: only the digest can tell
    assert latest_checkpoint(run_dir).name == "checkpoint_0000010"  # the driver's pick
    assert main(["--resume", str(run_dir), "--set", "train.max_steps=30", "--set", "train.stop_at=null"]) == 0
    out = capsys.readouterr().out
    assert "resumed from checkpoint_0000010 at step 10" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 30
    assert [h["step"] for h in load_state(run_dir / "checkpoint_0000030")["history"]] == [10, 20, 30]


# --- ranks agree on skipping a non-finite step --------------------------------------------------------


class ScaledLoss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, x, y):
        return None, (self.w * x).sum()


def _rank_loss(rank: int, world: int, init_file: str, out) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(ScaledLoss())
        x = torch.full((3,), float("nan") if rank == 1 else 1.0)  # only rank 1 sees a non-finite loss
        loss = forward_backward(model, lambda: (x, None), 2, contextlib.nullcontext(),
                                torch.amp.GradScaler("cpu", enabled=False))
        out.put((rank, loss.item()))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_a_non_finite_step(tmp_path):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank_loss, args=(r, 2, str(tmp_path / "init"), out)) for r in range(2)]
    for p in procs:
        p.start()
    losses = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert all(p.exitcode == 0 for p in procs)
    assert all(loss != loss for loss in losses.values()), losses  # NaN on both: both skip the step


# --- the recipe survives a lost worker ---------------------------------------------------------------


def test_the_recipe_goes_on_after_a_lost_worker():
    cfg = load_config(ROOT / "configs" / "gemma3-270m.yaml")
    assert cfg.ray.max_failures >= 1


def test_wandb_online_without_credentials_is_refused_before_ray(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc
    for args in (["--dry-run"], []):
        proc = subprocess.run([sys.executable, "-m", "raypipe.train", "--set", "wandb.mode=online",
                               "--storage-path", str(tmp_path / "runs"), *args],
                              capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: wandb.mode: 'online', but this machine has no W&B credentials")
        assert "Started a local Ray instance" not in proc.stdout + proc.stderr
