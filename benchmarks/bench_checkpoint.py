"""Checkpoint save/load time and size for a model shape (default: the reference recipe), on this machine.

    python benchmarks/bench_checkpoint.py [--config configs/gemma3-270m.yaml] [--repeats 3]
        [--step-seconds S ...]

Builds the model and a stepped AdamW (so the optimizer state is full size), then times
`save_checkpoint` (rank 0: weights, optimizer, state, RNG, and every file's digest), the digest part
of it alone (the same files hashed again, as save_checkpoint does right after writing them), `verify`
(every byte read back and hashed, as before any load) and `load_for_resume` + loading the weights
back, each after an `os.sync()`, and prints the share of training time spent checkpointing at the
config's eval_interval for each given optimizer-step time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

from raypipe.checkpoint import (DIGEST_THREADS, capture_rank_state, file_digest, load_for_resume, load_model_weights,
                                save_checkpoint, verify)
from raypipe.config import load_config
from raypipe.model import GemmaLM
from raypipe.optim import configure_optimizer


def digest_all(d: Path) -> None:
    with ThreadPoolExecutor(DIGEST_THREADS) as pool:
        for f in d.iterdir():
            file_digest(f, pool)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/gemma3-270m.yaml")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--step-seconds", type=float, nargs="*", default=[],
                   help="optimizer-step times to express the checkpoint cost against")
    args = p.parse_args()
    cfg = load_config(args.config)
    torch.manual_seed(0)
    model = GemmaLM(cfg.model)
    optimizer = configure_optimizer(model, cfg.train, "cpu")
    x = torch.randint(0, cfg.model.vocab_size, (1, 8))
    model(x, x)[1].backward()
    optimizer.step()  # fills exp_avg / exp_avg_sq: the optimizer state at its real size
    state = {"step": 1, "world_size": 1, "history": [], "step_losses": [0.0] * cfg.train.max_steps,
             "skipped_steps": 0, "restarts": 0,
             "scaler": {}, "tokens": 0}
    rank_state = capture_rank_state(torch.Generator(), torch.device("cpu"))

    def timed(fn) -> float:
        os.sync()  # a clean page cache: no writeback of the previous round's files in this one's time
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    saves, digests, verifies, loads = [], [], [], []
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for i in range(args.repeats):
            d = Path(tmp) / f"checkpoint_{i:07d}"
            saves.append(timed(partial(save_checkpoint, tmp, d.name, rank=0, rank_state=rank_state, model=model,
                                       optimizer_state=optimizer.state_dict(), config=cfg, state=state)))
            # the digest part of that save: the same files hashed again as save_checkpoint does, right after
            digests.append(timed(partial(digest_all, d)))
            verifies.append(timed(partial(verify, d)))
            t0 = time.perf_counter()
            resume = load_for_resume(d, rank=0)
            load_model_weights(GemmaLM(cfg.model), resume.model, d)
            optimizer.load_state_dict(resume.optimizer)
            loads.append(time.perf_counter() - t0)
            sizes = {f.name: f.stat().st_size for f in d.iterdir()}
            shutil.rmtree(d)
    total = sum(sizes.values())
    save, load = statistics.median(saves), statistics.median(loads)
    digest, check = statistics.median(digests), statistics.median(verifies)
    print(f"model: {model.num_params():,} parameters ({args.config})")
    print(f"checkpoint size: {total / 1e6:,.0f} MB (" + ", ".join(f"{k} {v / 1e6:,.1f} MB" for k, v in
                                                           sorted(sizes.items(), key=lambda kv: -kv[1])[:3]) + ")")
    print(f"save: {save:.2f} s median of {args.repeats} ({total / save / 1e9:.2f} GB/s); "
          f"load (weights + optimizer into a model): {load:.2f} s")
    print(f"of the save, the digests (files read back and hashed on {DIGEST_THREADS} threads): {digest:.2f} s = "
          f"{digest / save:.0%}; verify (every file read and hashed, before a load): {check:.2f} s "
          f"({total / check / 1e9:.2f} GB/s)")
    for step_s in args.step_seconds:
        interval = cfg.train.eval_interval * step_s
        print(f"at {step_s:.3f} s/step, a checkpoint every {cfg.train.eval_interval} steps ({interval:,.0f} s): "
              f"{save / (interval + save):.2%} of training time")


if __name__ == "__main__":
    main()
