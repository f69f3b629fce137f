"""Weights & Biases logging from the rank-0 worker (Train V2 refuses Tune's logger callbacks).

`wandb.mode: auto` goes online only when credentials exist (WANDB_API_KEY or a netrc entry),
and offline otherwise, so a fresh machine never blocks on a login prompt.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Optional

from .config import WandbConfig


def resolve_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        host = (os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").split("://")[-1].split("/")[0]
        if netrc.netrc().authenticators(host):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


class Tracker:
    """A W&B run, or nothing at all (mode disabled or not rank 0): log() and finish() are no-ops then."""

    def __init__(self, cfg: WandbConfig, run_name: str, config: dict, out_dir: str | Path,
                 enabled: bool = True, run_id: Optional[str] = None):
        self.mode = resolve_mode(cfg.mode) if enabled else "disabled"
        self.run, self.run_id = None, None
        self.sample_rows: list[list] = []
        if self.mode == "disabled":
            return
        # The env var, not only init(mode=...): W&B's telemetry otherwise tries the network at exit.
        os.environ["WANDB_MODE"] = self.mode
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=cfg.group, tags=cfg.tags or None,
            name=run_name, config=config, dir=str(out_dir), mode=self.mode,
            id=run_id, resume="allow" if run_id else None,
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.run_id = self.run.id  # kept after finish(): summaries and checkpoints name the run

    def log(self, metrics: dict, step: int) -> None:
        if self.run:
            self.run.log(metrics, step=step)

    def log_samples(self, step: int, prompt: str, samples: list[str]) -> None:
        """One W&B table with every sample so far (tables are immutable: log the grown one)."""
        if self.run:
            import wandb

            self.sample_rows += [[step, prompt, text] for text in samples]
            self.run.log({"samples": wandb.Table(columns=["step", "prompt", "sample"], data=self.sample_rows)},
                         step=step)

    def finish(self) -> None:
        if self.run:
            self.run.finish()
            self.run = None
