"""`python -m raypipe.train`: one training run through a Ray Train TorchTrainer.

The driver validates the config and the data (preparing the embedded corpus when that is the
source), starts or joins Ray, runs `train_func` on every worker, then writes `summary.json`,
`config.yaml` and `metrics.jsonl` into the run directory (`storage_path/name`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import yaml

from .config import Config, ConfigError, load_config
from .corpus import prepare_embedded
from .data import DataError, read_meta, unigram_entropy, validate_data
from .loop import WorkerEnv, train
from .model import GemmaLM


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m raypipe.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="run config YAML (default: the embedded default, configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set train.learning_rate=1e-3 (repeatable)")
    p.add_argument("--name", help="run name (ray.name); default: <config name>-<timestamp>")
    p.add_argument("--storage-path", help="where runs are kept (ray.storage_path): a path or a URI")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, build the model, print its size and token budget, and exit")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.name:
        overrides.append(f"ray.name={args.name}")
    if args.storage_path:
        overrides.append(f"ray.storage_path={args.storage_path}")
    cfg = load_config(args.config, overrides)
    stem = Path(args.config).stem if args.config else "default"
    cfg.ray.name = cfg.ray.name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    # Workers run in other directories (and other machines): hand them absolute paths.
    cfg.data.dir = str(Path(cfg.data.dir).expanduser().resolve())
    if "://" not in cfg.ray.storage_path:
        cfg.ray.storage_path = str(Path(cfg.ray.storage_path).expanduser().resolve())
    return cfg


def prepare_data(cfg: Config) -> dict:
    """Make sure the data exists and fits the run; fill model.vocab_size from it when unset."""
    if cfg.data.source == "embedded":
        prepare_embedded(cfg.data)
    meta = validate_data(cfg.data.dir, cfg.train.block_size, cfg.model.vocab_size)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = meta["vocab_size"]
    return meta


def dry_run(cfg: Config) -> None:
    t = cfg.train
    data_note = ""
    try:
        meta = validate_data(cfg.data.dir, t.block_size, cfg.model.vocab_size)
        cfg.model.vocab_size = cfg.model.vocab_size or meta["vocab_size"]
        data_note = f"data: {cfg.data.dir} ok ({meta['tokens']['train']:,} train tokens)"
    except DataError as e:
        if cfg.data.source == "embedded" and not Path(cfg.data.dir).exists():
            data_note = f"data: {cfg.data.dir} will be generated on the first run"
            cfg.model.vocab_size = cfg.model.vocab_size or cfg.data.tokenizer_vocab
        elif cfg.model.vocab_size is not None and not Path(cfg.data.dir).exists():
            data_note = f"data: {cfg.data.dir} not found: prepare it before training"
        else:
            raise
    with torch.device("meta"):  # shapes only: no memory, no init time, even for the 270M recipe
        model = GemmaLM(cfg.model)
    per_step = t.batch_size * t.block_size * t.grad_accum_steps * cfg.ray.num_workers
    head = "tied to the embedding" if cfg.model.tie_embeddings else "untied (its own matrix)"
    print(f"config ok: {cfg.ray.name}\n"
          f"parameters: {model.num_params():,} (output head {head}; vocab {cfg.model.vocab_size})\n"
          f"tokens per optimizer step: {per_step:,} = {t.batch_size} seqs x {t.block_size} tokens x "
          f"{t.grad_accum_steps} accumulation x {cfg.ray.num_workers} worker(s)\n"
          f"token budget: {per_step * t.max_steps:,} over {t.max_steps:,} optimizer steps\n{data_note}")


def train_func(loop_config: dict) -> dict:
    """What each Ray Train worker runs: the thin adapter between Ray and `loop.train`."""
    import ray.train
    import ray.train.torch

    cfg = Config.from_dict(loop_config["config"])
    ctx = ray.train.get_context()

    def report(metrics: dict, checkpoint_dir: Optional[Path]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=checkpoint_dir.name if checkpoint_dir else None)

    env = WorkerEnv(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                    device=ray.train.torch.get_device(), run_name=cfg.ray.name,
                    out_dir=Path(loop_config["wandb_dir"]), report=report, log=_worker_print)
    return train(cfg, env)


def _worker_print(line: str) -> None:
    # Ray Train patches print() into a logger and, when W&B has wrapped sys.stdout, also prints:
    # the real stdout gets the line once, and Ray forwards it to the driver.
    print(line, file=sys.__stdout__, flush=True)


def init_ray(cfg: Config) -> None:
    """Join the cluster named by RAY_ADDRESS (as `ray job submit` sets it) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True,
             runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
    need_cpu = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    need_gpu = cfg.ray.num_workers * cfg.ray.gpus_per_worker if cfg.ray.use_gpu else 0
    have = ray.cluster_resources()
    autoscaling = bool(os.environ.get("RAY_ADDRESS"))
    if not autoscaling and (need_cpu > have.get("CPU", 0) or need_gpu > have.get("GPU", 0)):
        raise ConfigError(
            f"ray: {cfg.ray.num_workers} worker(s) x (CPU {cfg.ray.cpus_per_worker:g}"
            f"{f', GPU {cfg.ray.gpus_per_worker:g}' if cfg.ray.use_gpu else ''}) do not fit this machine "
            f"(CPU {have.get('CPU', 0):g}, GPU {have.get('GPU', 0):g}); lower ray.num_workers or "
            "ray.cpus_per_worker, or set ray.use_gpu: false")


def make_trainer(cfg: Config, wandb_dir: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = cfg.ray
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.use_gpu else {})}
    return TorchTrainer(
        train_func,
        train_loop_config={"config": cfg.to_dict(), "wandb_dir": wandb_dir},
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=r.name, storage_path=r.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=r.checkpoints_to_keep,
                                               checkpoint_score_attribute="val_loss", checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=r.max_failures),
        ),
    )


def write_outputs(result, cfg: Config, summary: dict) -> None:
    """summary.json, config.yaml and metrics.jsonl beside Ray's checkpoints (local disk or a URI)."""
    fs, base = result.filesystem, result.path
    history = summary.pop("history")
    files = {
        "summary.json": json.dumps(summary, indent=2) + "\n",
        "config.yaml": yaml.safe_dump(cfg.to_dict(), sort_keys=False),
        "metrics.jsonl": "".join(json.dumps(h) + "\n" for h in history),
    }
    for name, text in files.items():
        with fs.open_output_stream(f"{base}/{name}") as f:
            f.write(text.encode())


def run(cfg: Config) -> dict:
    wall_start = time.perf_counter()
    meta = prepare_data(cfg)
    init_ray(cfg)
    local_storage = "://" not in cfg.ray.storage_path
    run_dir = f"{cfg.ray.storage_path.rstrip('/')}/{cfg.ray.name}"
    wandb_dir = run_dir if local_storage else str(Path(tempfile.gettempdir()) / "raypipe-wandb" / cfg.ray.name)
    result = make_trainer(cfg, wandb_dir).fit()
    if result.error:
        raise result.error
    summary = dict(result.return_value)
    best = min(result.best_checkpoints or [], key=lambda cm: cm[1]["val_loss"], default=None)
    summary.update({
        "run_dir": result.path,
        "best_checkpoint": best[0].path if best else None,
        "val_unigram_entropy": unigram_entropy(cfg.data.dir, "val"),
        "data_dir": cfg.data.dir, "vocab_size": meta["vocab_size"],
        "wall_time_s": time.perf_counter() - wall_start,
    })
    write_outputs(result, cfg, summary)
    print_summary(summary)
    return summary


def print_summary(s: dict) -> None:
    beat = "below" if s["final_val_loss"] < s["val_unigram_entropy"] else "NOT below"
    print(f"\n[raypipe] done: {s['steps']} steps, {s['tokens']:,} tokens in {s['wall_time_s']:.0f}s wall "
          f"({s['tokens_per_sec']:,.0f} tokens/s while training)\n"
          f"[raypipe] val loss: final {s['final_val_loss']:.4f}, best {s['best_val_loss']:.4f} (step {s['best_step']}); "
          f"train loss {s['final_train_loss']:.4f}\n"
          f"[raypipe] val unigram entropy {s['val_unigram_entropy']:.4f} nats: final val loss is {beat} it\n"
          f"[raypipe] best checkpoint: {s['best_checkpoint']}\n"
          f"[raypipe] run directory: {s['run_dir']} (summary.json, config.yaml, metrics.jsonl)")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
        if args.dry_run:
            dry_run(cfg)
            return 0
        run(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
