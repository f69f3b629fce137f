"""Checkpoint directories: everything a run needs to continue exactly, written atomically, read safely.

Layout (rank 0 writes all but the other ranks' files; under Ray Train every rank reports the same
directory name and Ray merges them in storage):
  model.safetensors   weights of the plain module (no `_orig_mod.` / `module.`; a tied head once)
  optimizer.pt        AdamW state (tensors and numbers only: loaded with weights_only=True)
  state.json          step, tokens, metrics history, per-step losses, skipped steps, restarts,
                      grad-scaler state, W&B run id, world size
  rank_<r>.pt         rank r's RNG states (Python, NumPy, torch CPU and CUDA) and its sampler state
  config.json         the resolved run config
  data_meta.json      the data's meta.json (its checksums identify the data), tokenizer.json beside it
  manifest.json       every file and its size: a checkpoint missing a file or holding a truncated one
                      is refused before anything is loaded

The learning-rate schedule is a pure function of the step (optim.lr_at), so the step restores it.
Nothing is unpickled beyond tensors and plain containers: a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import Config
from .errors import UserError
from .model import GemmaLM

MANIFEST = "manifest.json"


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not fit the run; the message names the file."""


@dataclass
class Resume:
    """A checkpoint loaded into memory for one rank: what `loop.train` continues from."""

    path: Path
    model: dict
    optimizer: dict
    state: dict
    rank_state: dict


# --- RNG and sampler state ---------------------------------------------------------------------------


def capture_rank_state(sampler, device: torch.device) -> dict:
    """`sampler`: the training batch source (BatchSampler or CudaPrefetcher), or any torch.Generator."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": np_state["state"]["pos"], "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "sampler": sampler.get_state(),
    }


def restore_rank_state(rank_state: dict, sampler, device: torch.device) -> None:
    version, internal, gauss = rank_state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = rank_state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32),
                         "pos": n["pos"]}, "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(rank_state["torch"])
    if device.type == "cuda" and rank_state["cuda"] is not None:
        torch.cuda.set_rng_state(rank_state["cuda"], device)
    sampler.set_state(rank_state["sampler"])


# --- writing -----------------------------------------------------------------------------------------


def save_checkpoint(parent: str | Path, name: str, *, rank: int, rank_state: dict,
                    model: Optional[torch.nn.Module] = None, optimizer: Optional[torch.optim.Optimizer] = None,
                    config: Optional[Config] = None, state: Optional[dict] = None,
                    copy_files: Optional[dict[str, Path]] = None) -> Path:
    """Write `parent/name` through a temporary sibling and one rename: a crash leaves no partial
    directory under the final name. Rank 0 passes model, optimizer, config and state."""
    from safetensors.torch import save_file

    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=parent))
    try:
        torch.save(rank_state, tmp / f"rank_{rank}.pt")
        if rank == 0:
            weights = model.state_dict()
            if config.model.tie_embeddings:  # safetensors stores a shared tensor once: drop the alias
                weights.pop("lm_head.weight")
            save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
            (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
            for dest, src in (copy_files or {}).items():
                shutil.copyfile(src, tmp / dest)
            files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.name != f"rank_{rank}.pt"}
            manifest = {"files": files, "world_size": state["world_size"]}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# --- reading -----------------------------------------------------------------------------------------


def verify(checkpoint_dir: str | Path) -> dict:
    """Check the manifest: every file there with its size, every rank's file present."""
    d = Path(checkpoint_dir)
    path = d / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {d} is not a complete raypipe checkpoint")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    for name, size in manifest["files"].items():
        f = d / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing (listed in {MANIFEST})")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, but {MANIFEST} says {size}: truncated or altered")
    for r in range(manifest["world_size"]):
        if not (d / f"rank_{r}.pt").is_file():
            raise CheckpointError(f"{d / f'rank_{r}.pt'} is missing: the checkpoint was written by "
                                  f"{manifest['world_size']} ranks")
    return manifest


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated files and pickles that would run code are refused alike
        raise CheckpointError(f"{path}: refused, not a plain tensor file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None


def _load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def read_config(checkpoint_dir: str | Path) -> Config:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {checkpoint_dir} is not a raypipe checkpoint")
    return Config.from_dict(json.loads(path.read_text()), origin=str(path))


def load_state(checkpoint_dir: str | Path) -> dict:
    return json.loads((Path(checkpoint_dir) / "state.json").read_text())


def load_model_weights(model: GemmaLM, weights: dict, path: Path) -> GemmaLM:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if model.cfg.tie_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> GemmaLM:
    """A fresh model of the checkpoint's shape with its weights."""
    d = Path(checkpoint_dir)
    verify(d)
    model = GemmaLM(read_config(d).model)
    try:
        load_model_weights(model, _load_weights(d / "model.safetensors"), d / "model.safetensors")
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{d / 'model.safetensors'} does not fit its config.json: {e}") from None
    return model.to(device)


def load_for_resume(checkpoint_dir: str | Path, rank: int) -> Resume:
    d = Path(checkpoint_dir)
    manifest = verify(d)
    if not 0 <= rank < manifest["world_size"]:
        raise CheckpointError(f"{d} was written by {manifest['world_size']} ranks; rank {rank} has no state there")
    return Resume(path=d, model=_load_weights(d / "model.safetensors"), optimizer=_torch_load(d / "optimizer.pt"),
                  state=load_state(d), rank_state=_torch_load(d / f"rank_{rank}.pt"))


def check_compatible(checkpoint_dir: str | Path, cfg: Config, data_meta: dict, world_size: int) -> None:
    """Refuse a checkpoint of another model shape, other data or another world size, naming what differs."""
    d = Path(checkpoint_dir)
    theirs = read_config(d)
    diffs = [f"model.{k}: checkpoint {v!r}, run {getattr(cfg.model, k)!r}"
             for k, v in vars(theirs.model).items() if getattr(cfg.model, k) != v and k != "init_std"]
    if diffs:
        raise CheckpointError(f"{d} holds another model shape: " + "; ".join(diffs))
    meta_path = d / "data_meta.json"
    their_data = json.loads(meta_path.read_text()).get("sha256") if meta_path.is_file() else None
    if their_data != data_meta.get("sha256"):
        raise CheckpointError(f"{d} was trained on other data: its data_meta.json checksums {their_data} "
                              f"differ from {cfg.data.dir}/meta.json's {data_meta.get('sha256')}")
    theirs_ws = load_state(d)["world_size"]
    if theirs_ws != world_size:
        raise CheckpointError(f"{d} was written by {theirs_ws} worker(s), this run has {world_size}: each rank's "
                              f"sampler and RNG state would be lost; set ray.num_workers={theirs_ws}")


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint of a run directory (incomplete ones are skipped)."""
    for d in sorted(Path(run_dir).glob("checkpoint_0*"), reverse=True):
        try:
            verify(d)
            return d
        except CheckpointError:
            continue
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given, or a run directory's best (else latest complete) checkpoint."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    summary = path / "summary.json"
    if summary.is_file():
        best = json.loads(summary.read_text()).get("best_checkpoint")
        if best and Path(best).is_dir():
            return Path(best)
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise CheckpointError(f"{path}: neither a checkpoint ({MANIFEST}) nor a run directory with a complete checkpoint")
    return latest
