"""Training throughput: `python -m raypipe.bench [--config configs/gemma3-270m.yaml] [--steps 20] [--ray]`.

Runs the product's own per-worker loop (`loop.train`: same model, optimizer, sampler, accumulation,
clipping) for `--warmup` + `--steps` optimizer steps, on random tokens of the model's vocabulary
unless `--data` names a prepared directory (throughput does not depend on the token values). First
bare, in this process without Ray (with the `ray.cpus_per_worker` threads a Ray worker gets); with
`--ray`, again under Ray Train with each worker count of `--workers`. Prints one table and
writes it as JSON (`--json`).

Figures count only the steps after `--warmup` (compilation, allocator warm-up):
- tokens/s over all workers, and per device;
- MFU = tokens/s x FLOPs per token / (devices x peak), against the peak dense matmul rate measured
  here on the spot (bf16 on a GPU, fp32 on a CPU; or `train.peak_flops` where the config sets it),
  which every run is given as its `train.peak_flops`, so that its live lines divide by the same peak,
  by two counts of FLOPs per token: nanoGPT's
  (`model.flops_per_token`: 6N + 12 L H Q T, N every parameter, the input embedding's too) and the
  matmul-only count (`model.matmul_flops_per_token`: the input embedding is a lookup, not a matmul; a
  tied output head counts its matmul);
- the median optimizer-step time, the peak GPU memory (rank 0), and the host time spent getting
  batches as a share of the step (the loop's wait for data);
- under Ray: its tokens/s as a share of the bare loop's (same worker count 1) and, for several
  workers, scaling efficiency = tokens/s(N) / (N x tokens/s(1 worker under Ray)). N workers keep
  the config's effective batch (`train.split_over_workers`): each accumulates grad_accum_steps / N
  micro-batches, or takes a smaller micro-batch where the accumulation does not divide.
- with `--compare KEY=VALUE`, the multi-worker Ray runs once more with those overrides: a before and
  after in one process (same data, same measured peak, the same warm compile cache).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import Config, ConfigError, load_config
from .data import dtype_for_vocab, read_meta, write_dataset
from .errors import UserError
from .model import flops_per_token, matmul_flops_per_token
from .throughput import format_flops, measure_peak_flops

MFU_COUNTS = {"mfu": "nanoGPT's count: 6N + 12 L H Q T, N every parameter (the input embedding's too)",
              "mfu_matmul": "matmul-only count: 6 x the weights that multiply (no input embedding; a tied head "
                            "counts its matmul) + 12 L H Q T"}


def random_data(directory: Path, vocab_size: int, train_tokens: int = 20_000_000, seed: int = 0) -> str:
    """Uniform random token ids, written like prepared data (meta.json with checksums)."""
    rng, dtype = np.random.default_rng(seed), dtype_for_vocab(vocab_size)
    chunk = 1 << 22
    splits = {
        "train": (rng.integers(0, vocab_size, chunk, dtype=np.int64) for _ in range(-(-train_tokens // chunk))),
        "val": iter([rng.integers(0, vocab_size, chunk, dtype=np.int64)]),
    }
    out = directory / "random-tokens"
    write_dataset(out, splits, {"vocab_size": vocab_size, "dtype": dtype, "tokenizer": {"kind": "random"}})
    return str(out)


def bench_config(args: argparse.Namespace, data_dir: str, storage: str, extra: Optional[list[str]] = None) -> Config:
    """The config under test, trimmed to a benchmark: no mid-run evaluations, samples or W&B;
    one small evaluation and checkpoint at the end, as every run ends."""
    cfg = load_config(args.config, args.overrides + (extra or []))
    t, steps = cfg.train, args.warmup + args.steps
    t.max_steps, t.stop_at, t.warmup_steps = steps, None, min(t.warmup_steps, steps)
    t.eval_interval, t.checkpoint_interval, t.eval_batches, t.sample_tokens = steps, None, 1, 0
    cfg.data.dir, cfg.data.source = data_dir, "prepared"
    cfg.wandb.mode = "disabled"
    cfg.ray.storage_path, cfg.ray.use_gpu = storage, torch.cuda.is_available()
    t.split_over_workers = True  # every worker count trains the config's effective batch
    return cfg


def figures(label: str, summary: dict, cfg: Config, workers: int, warmup: int, peak: float) -> dict:
    t = cfg.train  # the effective batch is the config's at every worker count
    traced = {step - 1 for step in summary.get("traced_steps", [])}  # under the profiler (--set train.profile_from=N)
    kept = [i for i in range(warmup, len(summary["step_times_s"])) if i not in traced]
    times = [summary["step_times_s"][i] for i in kept]
    waits = [summary["data_wait_s"][i] for i in kept]
    tokens_per_step = t.tokens_per_step(1)  # N workers split this batch between them
    tokens_per_s = tokens_per_step * len(times) / sum(times)
    flops = flops_per_token(cfg.model, summary["num_params"], t.block_size)
    matmul_flops = matmul_flops_per_token(cfg.model, t.block_size)
    return {
        "run": label, "workers": workers, "steps": len(times), "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / workers, "mfu": tokens_per_s * flops / (workers * peak),
        "mfu_matmul": tokens_per_s * matmul_flops / (workers * peak),
        "step_ms": 1000 * statistics.median(times), "peak_gpu_memory_gb": summary["peak_gpu_memory_gb"],
        "data_wait_frac": sum(waits) / sum(times), "cpu_threads": summary["cpu_threads"],
        "live_peak_flops": summary["peak_flops"],  # what the run's own progress lines divided by
        "step_times_ms": [1000 * t for t in times],  # the counted steps, in order: a mean and a median can differ
    }


def run_bare(cfg: Config) -> dict:
    from .driver import compile_cache_env
    from .loop import WorkerEnv, train

    os.environ.update(compile_cache_env())  # the cache the Ray workers of this node use
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    # The threads Ray gives a worker (OMP_NUM_THREADS = its CPUs): the bare loop is then a worker's
    # like for like, and shares its compiled graphs (Inductor's CPU kernels are keyed on the thread count).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    try:
        out = Path(cfg.ray.storage_path) / "bench-bare"  # in the bench's temporary directory, as the Ray runs' are
        summary = train(cfg, WorkerEnv(device=device, run_name="bench-bare", out_dir=out, log=print))
    finally:
        torch.set_num_threads(threads)
    # Hand the GPU back whole before Ray's workers want it: compiled graphs and cached blocks.
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return summary


def keep_traces(storage: Path, json_path: Path, label: str, workers: int) -> None:
    """Move a run's profiler traces (--set train.profile_from=N) out of the bench's temporary directory into
    `<json>-traces/`, named after the run."""
    traces = sorted(storage.rglob("profile-steps-*"))
    if not traces:
        return
    keep = json_path.parent / f"{json_path.stem}-traces"
    keep.mkdir(parents=True, exist_ok=True)
    run = re.sub(r"[^A-Za-z0-9.=_-]+", "-", f"{label}-{workers}").strip("-").lower()
    for trace in traces:
        shutil.move(str(trace), str(keep / f"{run}-{trace.name}"))
    print(f"traces: {keep}/{run}-*", flush=True)


def check_workers(cfg: Config, workers: int) -> None:
    try:
        cfg.train.worker_batch(workers)
    except ValueError as e:
        raise ConfigError(f"--workers {workers}: {e}") from None


def run_ray(cfg: Config, workers: int) -> dict:
    """`workers` as passed by check_workers, which main runs for every count before any run."""
    from .driver import init_ray, make_trainer

    cfg.ray.num_workers = workers
    cfg.ray.name = f"bench-ray-{workers}-{time.strftime('%Y%m%d-%H%M%S')}"
    init_ray(cfg)
    result = make_trainer(cfg, wandb_dir=str(Path(cfg.ray.storage_path) / cfg.ray.name)).fit()
    if result.error:
        raise RuntimeError(f"the Ray run failed: {result.error}")
    return result.return_value


def add_ratios(rows: list[dict]) -> None:
    """Ray rows against the bare loop (1 worker) and against one Ray worker (scaling efficiency)."""
    bare = next((r for r in rows if r["run"] == "bare loop"), None)
    one = next((r for r in rows if r["run"] == "Ray Train" and r["workers"] == 1), None)
    for r in rows:
        if not r["run"].startswith("Ray Train"):
            continue
        if bare and r["workers"] == 1:
            r["vs_bare"] = r["tokens_per_s"] / bare["tokens_per_s"]
        if one and r["workers"] > 1:
            r["scaling_efficiency"] = r["tokens_per_s"] / (r["workers"] * one["tokens_per_s"])


def table(rows: list[dict], peak: float, peak_source: str, device: str) -> str:
    lines = [f"device: {device} | peak ({peak_source}): {format_flops(peak)} | MFU against it: "
             f"nanoGPT = {MFU_COUNTS['mfu']}; matmul = {MFU_COUNTS['mfu_matmul']}",
             "| run | workers | tokens/s | tokens/s per device | MFU nanoGPT | MFU matmul | step ms | peak GPU GB | data wait "
             "| vs bare | scaling |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        mem = f"{r['peak_gpu_memory_gb']:.1f}" if r["peak_gpu_memory_gb"] is not None else "-"
        vs = f"{r['vs_bare']:.1%}" if "vs_bare" in r else "-"
        scaling = f"{r['scaling_efficiency']:.1%}" if "scaling_efficiency" in r else "-"
        lines.append(f"| {r['run']} | {r['workers']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_device']:,.0f} | "
                     f"{r['mfu']:.1%} | {r['mfu_matmul']:.1%} | {r['step_ms']:.1f} | {mem} | {r['data_wait_frac']:.2%} | "
                     f"{vs} | {scaling} |")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m raypipe.bench", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/gemma3-270m.yaml", help="run config (default: the reference recipe)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=20, help="measured optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="optimizer steps run first and not counted")
    p.add_argument("--data", help="a prepared data directory (default: random tokens in a temp dir)")
    p.add_argument("--ray", action="store_true", help="also run inside a TorchTrainer")
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="worker counts under --ray")
    p.add_argument("--no-bare", action="store_true", help="skip the bare loop (only the Ray runs)")
    p.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                   help="run the multi-worker Ray runs once more with these overrides added (a before/after in one process)")
    p.add_argument("--json", default="bench.json", help="where to write the figures")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    with tempfile.TemporaryDirectory(prefix="raypipe-bench-") as tmp:
        try:
            probe = load_config(args.config, args.overrides)
            vocab = probe.model.vocab_size
            if args.data is None and vocab is None:
                raise ConfigError(f"{args.config}: model.vocab_size is null; random tokens need it (or pass --data)")
            data_dir = str(Path(args.data).resolve()) if args.data else random_data(Path(tmp), vocab)
            base = bench_config(args, data_dir, str(Path(tmp) / "runs"))
            base.model.vocab_size = base.model.vocab_size or read_meta(data_dir)["vocab_size"]  # the FLOP counts need it
            for n in args.workers if args.ray else []:
                check_workers(base, n)  # before any run, not after the bare one
            if args.compare:
                bench_config(args, data_dir, str(Path(tmp) / "runs"), args.compare)  # a bad key fails now
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        peak = base.train.peak_flops or measure_peak_flops(device)
        peak_source = "train.peak_flops" if base.train.peak_flops else "measured"
        report = {"device": device_name, "torch": torch.__version__, "peak_flops": peak, "peak_flops_source": peak_source,
                  "mfu_counts": MFU_COUNTS,
                  "config": args.config,
                  "overrides": args.overrides, "warmup_steps": args.warmup, "rows": [],
                  "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        runs = ([("bare loop", 1)] if not args.no_bare else []) + ([("Ray Train", n) for n in args.workers] if args.ray else [])
        if args.compare:
            runs += [(f"Ray Train + {' '.join(args.compare)}", n) for n in args.workers if args.ray and n > 1]
        for label, workers in runs:
            cfg = bench_config(args, data_dir, base.ray.storage_path, args.compare if label.startswith("Ray Train +") else [])
            cfg.train.peak_flops = peak  # the runs' live MFU lines divide by the table's peak
            summary = run_bare(cfg) if label == "bare loop" else run_ray(cfg, workers)
            keep_traces(Path(base.ray.storage_path), Path(args.json), label, workers)
            report["rows"].append(figures(label, summary, base, workers, args.warmup, peak))
            add_ratios(report["rows"])
            # Each finished run is kept at once: a run cut short (a time limit, a crash) loses only itself.
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
            print(table(report["rows"][-1:], peak, peak_source, device_name), flush=True)
    print(table(report["rows"], peak, peak_source, device_name))
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
