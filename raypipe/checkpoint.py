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
  rank_<r>.json       rank r's digest of its rank_<r>.pt (each rank writes its own; Ray merges them)
  manifest.json       every file rank 0 wrote with its size and sha256 (of 64 MiB blocks for large files,
                      see file_digest): a checkpoint missing a file or holding a truncated or altered
                      one is refused, by name, before anything is loaded

The learning-rate schedule is a pure function of the step (optim.lr_at), so the step restores it.
Nothing is unpickled beyond tensors and plain containers: a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from .config import Config
from .errors import UserError

if TYPE_CHECKING:  # torch is imported where a tensor is made or read: the driver's checks run without it
    import torch

    from .model import GemmaLM

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 1: sizes only; 2: sizes and digests (file_digest), rank files in rank_<r>.json
CHECKPOINT_GLOB = "checkpoint_0*"  # checkpoint_<step, 7 digits>: names sort by step


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:07d}"


def is_checkpoint_step(step: int, last_step: int, eval_interval: int, checkpoint_interval: Optional[int]) -> bool:
    """Checkpoints come with evaluations: every checkpoint_interval steps (None: every evaluation) and at
    the last step of the run."""
    return step == last_step or step % (checkpoint_interval or eval_interval) == 0


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
    import torch

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
    import torch

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


DIGEST_BLOCK = 64 << 20  # bytes hashed per task: files are digested block by block, in parallel
DIGEST_THREADS = min(16, os.cpu_count() or 1)


def _block_sha256(path: Path, offset: int, length: int) -> bytes:
    sha, fd = hashlib.sha256(), os.open(path, os.O_RDONLY)
    try:
        while length > 0:  # os.pread and hashlib both drop the GIL: the blocks are hashed in parallel
            chunk = os.pread(fd, min(length, 16 << 20), offset)
            if not chunk:
                break
            sha.update(chunk)
            offset, length = offset + len(chunk), length - len(chunk)
    finally:
        os.close(fd)
    return sha.digest()


def file_digest(path: Path, pool: Optional[ThreadPoolExecutor] = None) -> dict:
    """{"size": bytes, "sha256": hex}. Up to one block the plain sha256 of the file (`sha256sum` gives
    the same); a larger file's is the sha256 of its blocks' sha256s (64 MiB blocks, in order), so a
    2 GB checkpoint is hashed on every core instead of one, when writing and when verifying."""
    path = Path(path)
    size = path.stat().st_size
    if size <= DIGEST_BLOCK:
        return {"size": size, "sha256": _block_sha256(path, 0, size).hex()}
    offsets = range(0, size, DIGEST_BLOCK)
    with (contextlib.nullcontext(pool) if pool else ThreadPoolExecutor(DIGEST_THREADS)) as workers:
        blocks = list(workers.map(lambda offset: _block_sha256(path, offset, DIGEST_BLOCK), offsets))
    return {"size": size, "sha256": hashlib.sha256(b"".join(blocks)).hexdigest()}


def save_checkpoint(parent: str | Path, name: str, *, rank: int, rank_state: dict,
                    model: Optional[torch.nn.Module] = None, optimizer_state: Optional[dict] = None,
                    config: Optional[Config] = None, state: Optional[dict] = None,
                    copy_files: Optional[dict[str, Path]] = None) -> Path:
    """Write `parent/name` through a temporary sibling and one rename: a crash leaves no partial
    directory under the final name. Rank 0 passes model, optimizer state, config and state. Every file's
    size and digest are recorded (manifest.json; rank_<r>.json for each rank's own file)."""
    import torch
    from safetensors.torch import save_file

    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=parent))
    try:
        rank_file = f"rank_{rank}.pt"
        torch.save(rank_state, tmp / rank_file)
        (tmp / f"rank_{rank}.json").write_text(json.dumps({"file": rank_file, **file_digest(tmp / rank_file)}) + "\n")
        if rank == 0:
            weights = model.state_dict()
            if config.model.tie_embeddings:  # safetensors stores a shared tensor once: drop the alias
                weights.pop("lm_head.weight")
            # Cloned: parameters may be views into one buffer (raypipe/sharded_adamw.py), which safetensors refuses.
            save_file({k: v.detach().clone() for k, v in weights.items()}, str(tmp / "model.safetensors"))
            torch.save(optimizer_state, tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
            (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
            for dest, src in (copy_files or {}).items():
                shutil.copyfile(src, tmp / dest)
            names = ["model.safetensors", "optimizer.pt", "state.json", "config.json", *(copy_files or {})]
            with ThreadPoolExecutor(DIGEST_THREADS) as pool:  # read back from the page cache, on every core
                files = {name: file_digest(tmp / name, pool) for name in names}
            manifest = {"version": MANIFEST_VERSION, "files": files, "world_size": state["world_size"]}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# --- reading -----------------------------------------------------------------------------------------


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {path.parent} is not a complete raypipe checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable as {what} ({e})") from None


def _check_file(d: Path, name: str, entry, listed_in: str) -> None:
    """One listed file: present, its size, and (from manifest version 2 on) its sha256."""
    f = d / name
    if isinstance(entry, int) and not isinstance(entry, bool):  # version 1 manifests recorded sizes only
        entry = {"size": entry}
    if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and entry["size"] >= 0
            and isinstance(entry.get("sha256", ""), str)):
        raise CheckpointError(f"{d / listed_in}: entry for '{name}' must be {{size: bytes, sha256: hex}}, got {entry!r}")
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        raise CheckpointError(f"{d / listed_in}: '{name}' is not a file name inside the checkpoint")
    if not f.is_file():
        raise CheckpointError(f"{f} is missing (listed in {listed_in})")
    size = f.stat().st_size
    if size != entry["size"]:
        raise CheckpointError(f"{f}: {size} bytes, but {listed_in} says {entry['size']}: truncated or altered")
    if "sha256" in entry:
        found = file_digest(f)["sha256"]
        if found != entry["sha256"]:
            raise CheckpointError(f"{f}: sha256 {found[:16]}..., but {listed_in} says {entry['sha256'][:16]}...: "
                                  "the file was altered or damaged after it was written")


def verify(checkpoint_dir: str | Path) -> dict:
    """Check the checkpoint against its manifest, byte for byte: every file rank 0 wrote (size and
    sha256) and every rank's own file (against its rank_<r>.json). Returns the manifest."""
    d = Path(checkpoint_dir)
    path = d / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {d} is not a complete raypipe checkpoint")
    manifest = _read_json(path, "a checkpoint manifest")
    if not (isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)):
        raise CheckpointError(f"{path}: expected a mapping with 'files' (name -> size and sha256) and 'world_size'")
    ws = manifest.get("world_size")
    if not (isinstance(ws, int) and not isinstance(ws, bool) and ws >= 1):
        raise CheckpointError(f"{path}: 'world_size' must be a positive integer, got {ws!r}")
    for name, entry in manifest["files"].items():
        _check_file(d, name, entry, MANIFEST)
    for r in range(ws):
        rank_file = d / f"rank_{r}.pt"
        if not rank_file.is_file():
            raise CheckpointError(f"{rank_file} is missing: the checkpoint was written by {ws} ranks")
        digest_file = d / f"rank_{r}.json"
        if manifest.get("version", 1) >= 2:
            entry = _read_json(digest_file, "a rank's file digest")
            if not isinstance(entry, dict) or entry.get("file") != rank_file.name:
                raise CheckpointError(f"{digest_file}: expected {{file: {rank_file.name}, size, sha256}}, got {entry!r}")
            _check_file(d, rank_file.name, {k: entry.get(k) for k in ("size", "sha256")}, digest_file.name)
    return manifest


def _torch_load(path: Path):
    import torch

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
    raw = _read_json(path, "a run config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a mapping of config sections, got {type(raw).__name__}")
    return Config.from_dict(raw, origin=str(path))


# state.json keys `loop.train` reads back, and what each must be
STATE_KEYS = {"step": int, "world_size": int, "history": list, "step_losses": list, "skipped_steps": int,
              "restarts": int, "scaler": dict}


def load_state(checkpoint_dir: str | Path) -> dict:
    path = Path(checkpoint_dir) / "state.json"
    state = _read_json(path, "checkpoint state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a mapping (step, history, ...), got {type(state).__name__}")
    for key, kind in STATE_KEYS.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{path}: '{key}' must be {kind.__name__}, got {value!r:.80}")
    if not all(isinstance(h, dict) and isinstance(h.get("step"), int) for h in state["history"]):
        raise CheckpointError(f"{path}: 'history' must be a list of evaluations, each with its 'step'")
    return state


def load_model_weights(model: GemmaLM, weights: dict, path: Path) -> GemmaLM:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if model.cfg.tie_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu", *, verified: bool = False) -> GemmaLM:
    """A fresh model of the checkpoint's shape with its weights (`verified`: the caller has just run verify)."""
    from .model import GemmaLM

    d = Path(checkpoint_dir)
    if not verified:
        verify(d)
    model = GemmaLM(read_config(d).model)
    try:
        load_model_weights(model, _load_weights(d / "model.safetensors"), d / "model.safetensors")
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{d / 'model.safetensors'} does not fit its config.json: {e}") from None
    return model.to(device)


def load_for_resume(checkpoint_dir: str | Path, rank: int, world_size: Optional[int] = None) -> Resume:
    """What rank `rank` resumes from. On another world size than the checkpoint's (train.allow_worker_count_change)
    no rank takes a rank's own state: `rank_state` is None."""
    d = Path(checkpoint_dir)
    manifest = verify(d)
    same_world = world_size in (None, manifest["world_size"])
    if same_world and not 0 <= rank < manifest["world_size"]:
        raise CheckpointError(f"{d} was written by {manifest['world_size']} ranks; rank {rank} has no state there")
    return Resume(path=d, model=_load_weights(d / "model.safetensors"), optimizer=_torch_load(d / "optimizer.pt"),
                  state=load_state(d), rank_state=_torch_load(d / f"rank_{rank}.pt") if same_world else None)


COMPUTE_ONLY = ("init_std", "attention", "fused_kernels", "fused_head")  # model keys a resume may change: the weights load alike


def data_checksums(meta) -> Optional[dict]:
    """The sha256 of every token file a data meta.json lists, in either layout (single files or shards)."""
    return {k: meta[k] for k in ("sha256", "shards") if meta.get(k)} if isinstance(meta, dict) else None


def check_compatible(checkpoint_dir: str | Path, cfg: Config, data_meta: dict, world_size: int) -> None:
    """Refuse a checkpoint of another model shape, other data or another world size, naming what differs."""
    d = Path(checkpoint_dir)
    theirs = read_config(d)
    diffs = [f"model.{k}: checkpoint {v!r}, run {getattr(cfg.model, k)!r}"
             for k, v in vars(theirs.model).items() if getattr(cfg.model, k) != v and k not in COMPUTE_ONLY]
    if diffs:
        raise CheckpointError(f"{d} holds another model shape: " + "; ".join(diffs))
    meta_path = d / "data_meta.json"
    their_meta = _read_json(meta_path, "the data's meta.json") if meta_path.is_file() else {}
    their_data, ours = data_checksums(their_meta), data_checksums(data_meta)
    if their_data != ours:
        raise CheckpointError(f"{d} was trained on other data: its data_meta.json checksums {their_data} "
                              f"differ from {cfg.data.dir}/meta.json's {ours}")
    theirs_ws = load_state(d)["world_size"]
    if theirs_ws == world_size:
        return
    if not cfg.train.allow_worker_count_change:
        raise CheckpointError(f"{d} was written by {theirs_ws} worker(s), this run has {world_size}: each rank's "
                              f"sampler and RNG state would be lost; set ray.num_workers={theirs_ws} to go on exactly, "
                              f"or train.allow_worker_count_change: true to go on with {world_size} (each worker then "
                              "draws a new batch stream)")
    theirs_tokens, ours_tokens = theirs.train.tokens_per_step(theirs_ws), cfg.train.tokens_per_step(world_size)
    if theirs_tokens != ours_tokens:
        micro, accum = cfg.train.worker_batch(world_size)
        raise CheckpointError(f"{d} trained on {theirs_tokens:,} tokens per step ({theirs_ws} worker(s)); {world_size} "
                              f"worker(s) of {micro} x {accum} sequences would take {ours_tokens:,}: set "
                              "train.split_over_workers: true (the same step split over any worker count), or "
                              "train.batch_size and train.grad_accum_steps to keep the tokens per step")


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint of a run directory (incomplete ones are skipped)."""
    for d in sorted(Path(run_dir).glob(CHECKPOINT_GLOB), reverse=True):
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
        try:
            best = json.loads(summary.read_text()).get("best_checkpoint")
        except (OSError, ValueError, AttributeError):
            best = None  # an unreadable summary: fall back to the latest complete checkpoint
        if isinstance(best, str) and (Path(best) / MANIFEST).is_file():
            return Path(best)
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise CheckpointError(f"{path}: neither a checkpoint ({MANIFEST}) nor a run directory with a complete checkpoint")
    return latest


def choose_resume(ray_pick: Optional[Path], verified: Optional[str | Path], log) -> Optional[Path]:
    """The checkpoint a worker continues from: the newest complete one among Ray's pick (its latest
    checkpoint, after a worker failure or when a run directory is resumed) and the one the driver
    verified (--resume). A damaged pick of Ray's is passed over, with a line, for the latest complete
    checkpoint beside it. None: a fresh start."""
    candidates = [Path(verified)] if verified else []
    if ray_pick is not None:
        try:
            verify(ray_pick)
            candidates.append(ray_pick)
        except CheckpointError as e:
            beside = latest_checkpoint(ray_pick.parent)
            if beside is None and not candidates:  # never start over silently in the middle of a run
                raise CheckpointError(f"{e}; and no complete checkpoint is left in {ray_pick.parent} to go on from") from None
            log(f"[raypipe] not resuming from {ray_pick.name}: {e}")
            candidates += [beside] if beside else []
    return max(candidates, key=lambda d: load_state(d)["step"], default=None)
