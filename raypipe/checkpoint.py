"""Checkpoint directories: written atomically, read without unrestricted pickle.

Layout of a checkpoint directory:
  model.pt      the model's state_dict (the uncompiled, unwrapped module: no `_orig_mod.`/`module.`)
  optimizer.pt  the optimizer's state_dict
  state.json    step, tokens seen, metrics history, W&B run id
  config.json   the resolved run config (model shape included), so a checkpoint stands alone
  data_meta.json, tokenizer.json   the data's meta.json and tokenizer: enough to encode a prompt
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .config import Config
from .model import GemmaLM


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not match; the message names the file."""


def save_checkpoint(parent: str | Path, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    config: Config, state: dict, copy_files: Optional[dict[str, Path]] = None) -> Path:
    """Write `parent/name` via a temporary sibling and one rename: a crash leaves no partial checkpoint."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=parent))
    try:
        torch.save(model.state_dict(), tmp / "model.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
        for dest, src in (copy_files or {}).items():
            shutil.copyfile(src, tmp / dest)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _load_tensors(path: Path):
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated files, foreign pickles: all refused the same way
        raise CheckpointError(f"{path}: cannot be read as a tensor state dict ({type(e).__name__}: {e})") from None


def read_config(checkpoint_dir: str | Path) -> Config:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {checkpoint_dir} is not a raypipe checkpoint")
    return Config.from_dict(json.loads(path.read_text()), origin=str(path))


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> GemmaLM:
    """A fresh model of the checkpoint's shape with its weights."""
    checkpoint_dir = Path(checkpoint_dir)
    model = GemmaLM(read_config(checkpoint_dir).model)
    try:
        model.load_state_dict(_load_tensors(checkpoint_dir / "model.pt"))
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint_dir / 'model.pt'} does not fit its config.json: {e}") from None
    return model.to(device)


def load_state(checkpoint_dir: str | Path) -> dict:
    return json.loads((Path(checkpoint_dir) / "state.json").read_text())


def load_optimizer_state(checkpoint_dir: str | Path) -> Optional[dict]:
    return _load_tensors(Path(checkpoint_dir) / "optimizer.pt")
