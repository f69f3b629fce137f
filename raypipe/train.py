"""`python -m raypipe.train`: one training run through a Ray Train TorchTrainer.

The command line: flags and config into a checked `Config` (a run to resume, `--dry-run`), then
`driver.run`, which runs it on Ray and writes the run directory. This module does not import Ray, nor
torch (only `--dry-run` does, to count the model's parameters).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

from .checkpoint import (CHECKPOINT_GLOB, MANIFEST, CheckpointError, check_compatible, latest_checkpoint, load_state,
                         read_config, verify)
from .config import Config, ConfigError, apply_override, load_config, print_config
from .data import DataError, validate_data
from .driver import RunFailed, check_wandb_login, local_misfit, process_start_time, run
from .errors import UserError
from .staging import is_uri, read_remote_meta
from .validation import check_name, validate


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m raypipe.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="run config YAML (default: the embedded default, configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set train.learning_rate=1e-3 (repeatable)")
    p.add_argument("--name", help="run name (ray.name); default: <config name>-<timestamp>")
    p.add_argument("--storage-path", help="where runs are kept (ray.storage_path): a path or a URI")
    p.add_argument("--resume", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="continue a run: a run directory goes on in place from its latest checkpoint; "
                        "a checkpoint directory starts a new run from it (config from the checkpoint "
                        "unless --config; --set still applies)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, build the model, print its size and token budget, and exit")
    p.add_argument("--print-config", action="store_true",
                   help="print the config (after --config and --set) as YAML, every key with its help, and exit")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    resume_run = resume_checkpoint = None
    if args.resume:
        resume_run, resume_checkpoint = resolve_resume(args.resume)
    if args.resume and not args.config:
        cfg = read_config(resume_checkpoint)
        for item in args.overrides:
            apply_override(cfg, item)
        validate(cfg, "--set")
        if resume_run is None:
            cfg.ray.name = None  # a new run from that checkpoint
    else:
        cfg = load_config(args.config, args.overrides)
    # Flag values are taken as typed (a '#' or a number is part of the name), then checked like config values.
    flags = {}
    if resume_run is not None:  # the same run, in place: same name and storage, so Ray restores it
        flags.update({("name", "--resume"): resume_run.name, ("storage_path", "--resume"): str(resume_run.parent)})
    if args.name is not None:
        flags[("name", "--name")] = args.name
    if args.storage_path is not None:
        flags[("storage_path", "--storage-path")] = args.storage_path
    for (key, flag), value in flags.items():
        setattr(cfg.ray, key, value)
        validate(cfg, f"{flag} {value!r}")
    if resume_checkpoint is not None:
        step = load_state(resume_checkpoint)["step"]
        if cfg.train.stop_at is not None and cfg.train.stop_at <= step:
            cfg.train.stop_at = None  # it stopped there on purpose; resuming means going on
        cfg.resume_from = str(resume_checkpoint)
    stem = Path(args.config).stem if args.config else "default"
    if not cfg.ray.name:
        cfg.ray.name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        check_name(cfg.ray.name, "ray.name", f"{args.config} (no ray.name or --name: the file name is used)")
    # Workers run in other directories (and other machines): hand them absolute paths.
    if not is_uri(cfg.data.dir):
        cfg.data.dir = str(Path(cfg.data.dir).expanduser().resolve())
    if "://" not in cfg.ray.storage_path:
        cfg.ray.storage_path = str(Path(cfg.ray.storage_path).expanduser().resolve())
        run_dir = Path(cfg.ray.storage_path) / cfg.ray.name
        if resume_run is None and (any(run_dir.glob(CHECKPOINT_GLOB)) or (run_dir / "summary.json").exists()):
            # Ray would silently continue (or mix into) that run: make the user say which they mean.
            raise ConfigError(f"ray.name {cfg.ray.name!r}: {run_dir} already holds a run; continue it with "
                              f"--resume {run_dir}, or pick another --name")
    return cfg


def resolve_resume(path: str) -> tuple[Optional[Path], Path]:
    """(run directory or None, checkpoint to resume from) for --resume."""
    p = Path(path).expanduser().resolve()
    if (p / MANIFEST).is_file():
        verify(p)
        return None, p
    latest = latest_checkpoint(p) if p.is_dir() else None
    if latest is None:
        raise CheckpointError(f"--resume {path}: neither a checkpoint directory nor a run directory "
                              "holding a complete checkpoint")
    return p, latest


def dry_run(cfg: Config) -> None:
    t = cfg.train
    data_note, meta = "", None
    try:
        if is_uri(cfg.data.dir):  # meta.json only: the copy to each node is made when the run starts
            meta, _ = read_remote_meta(cfg.data.dir)
            where = "copied to each node's cache at start"
        else:
            meta, where = validate_data(cfg.data.dir, t.block_size, cfg.model.vocab_size), "ok"
        cfg.model.vocab_size = cfg.model.vocab_size or meta["vocab_size"]
        data_note = f"data: {cfg.data.dir} {where} ({meta['tokens']['train']:,} train tokens)"
    except DataError:
        if is_uri(cfg.data.dir):
            raise
        if cfg.data.source == "embedded" and not Path(cfg.data.dir).exists():
            data_note = f"data: {cfg.data.dir} will be generated on the first run"
            cfg.model.vocab_size = cfg.model.vocab_size or cfg.data.tokenizer_vocab
        elif cfg.model.vocab_size is not None and not Path(cfg.data.dir).exists():
            data_note = f"data: {cfg.data.dir} not found: prepare it before training"
        else:
            raise
    check_wandb_login(cfg)
    if cfg.resume_from and meta is not None:  # as the run does before Ray starts (no data yet: said above)
        check_compatible(cfg.resume_from, cfg, meta, cfg.ray.num_workers)
    import torch

    from .model import GemmaLM

    with torch.device("meta"):  # shapes only: no memory, no init time, even for the 270M recipe
        model = GemmaLM(cfg.model)
    per_step = t.tokens_per_step(cfg.ray.num_workers)
    micro, accum = t.worker_batch(cfg.ray.num_workers)
    head = "tied to the embedding" if cfg.model.tie_embeddings else "untied (its own matrix)"
    print(f"config ok: {cfg.ray.name}\n"
          f"outputs: {cfg.ray.storage_path.rstrip('/')}/{cfg.ray.name}\n"
          f"parameters: {model.num_params():,} (output head {head}; vocab {cfg.model.vocab_size})\n"
          f"tokens per optimizer step: {per_step:,} = {micro} seqs x {t.block_size} tokens x "
          f"{accum} accumulation x {cfg.ray.num_workers} worker(s)\n{parallel_note(t, cfg.ray.num_workers)}"
          f"token budget: {per_step * t.max_steps:,} over {t.max_steps:,} optimizer steps\n{data_note}\n"
          f"resources: {resource_note(cfg)}")


def parallel_note(t, workers: int) -> str:
    """How several workers share a step (nothing for one), ending in a newline."""
    if workers == 1:
        return ""
    graphs = ", CUDA graphs" if t.cuda_graphs else ""
    if t.shard_optimizer:
        if t.overlap_comm:
            comm = (f"{t.ddp_grad_dtype} reduce-scatter, per block during the backward; weights all-gathered during "
                    "the next forward")
        else:
            copies = {"auto": ", copies between GPUs where they can", "peer_copies": ", copies between GPUs"}
            comm = (f"{t.ddp_grad_dtype} reduce-scatter and all-gather"
                    f"{copies.get(t.shard_transport, '') if t.ddp_grad_dtype == 'float32' else ''}")
        return (f"data parallel: ZeRO-1 ({comm}; each worker updates and keeps AdamW's state for 1/{workers} of the "
                f"weights{graphs})\n")
    graph = ("the compiled graph cut at its buckets" if t.ddp_split_graph else "one compiled graph") if t.compile else "eager"
    return f"data parallel: DDP ({t.ddp_grad_dtype} all-reduce of the whole gradient, {graph})\n"


def resource_note(cfg: Config) -> str:
    misfit = local_misfit(cfg)
    if misfit is None:
        return ("the cluster in RAY_ADDRESS decides" if os.environ.get("RAY_ADDRESS")
                else "the workers fit this machine")
    return f"{misfit}: a run here would be refused; run it where they fit, or on a cluster (RAY_ADDRESS)"


def main(argv: Optional[list[str]] = None) -> int:
    # Start-up counts from the launch: this process's start when run as the command (argv from
    # sys.argv), else this call (a caller in a longer-lived process).
    launch_time = process_start_time() if argv is None else time.time()
    args = parse_args(argv)
    try:
        if args.print_config:
            print_config(load_config(args.config, args.overrides))
            return 0
        cfg = resolve_config(args)
        if args.dry_run:
            dry_run(cfg)
            return 0
        run(cfg, launch_time=launch_time)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
