"""ASHA against running every trial to the end, on the same sampled configurations.

    python benchmarks/bench_sweep.py [sweeps/lr-clip-cpu.yaml] [--storage-path /tmp/raypipe-bench-sweep]

Runs the sweep file as it is (its scheduler, ASHA) and again with `scheduler: fifo`, both with the
file's seed so the same configurations are sampled, and prints the optimizer steps run over all
trials, wall time, and which trial each picks as best.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from raypipe.sweep import run_sweep
from raypipe.sweepspec import load_sweep


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("sweep", nargs="?", default="sweeps/lr-clip-cpu.yaml")
    p.add_argument("--storage-path", default="/tmp/raypipe-bench-sweep")
    args = p.parse_args()
    outcomes = {}
    for label, scheduler in (("asha", None), ("to the end", {"type": "fifo"})):
        spec = load_sweep(args.sweep)
        assert spec.seed is not None, "the sweep file needs a seed: both runs must sample the same trials"
        spec.name = f"{spec.name}-{'asha' if scheduler is None else 'full'}"
        spec.scheduler = scheduler or spec.scheduler
        spec.storage_path = args.storage_path
        spec.base.data.dir = str(Path(spec.base.data.dir).resolve())
        start = time.perf_counter()
        rows = run_sweep(spec)
        wall = time.perf_counter() - start
        keys = list(spec.search)
        outcomes[label] = (sum(r["steps"] for r in rows), wall, tuple(round(rows[0][k], 12) for k in keys),
                           rows[0]["best_val_loss"], len(rows))
    print(f"\n{'scheduler':>12} {'trials':>7} {'trial-steps':>12} {'wall s':>7}  best trial (val_loss)")
    for label, (steps, wall, best, loss, n) in outcomes.items():
        print(f"{label:>12} {n:>7} {steps:>12} {wall:>7.0f}  {best} ({loss:.4f})")
    (a_steps, a_wall, a_best, *_), (f_steps, f_wall, f_best, *_) = outcomes.values()
    print(f"ASHA ran {a_steps / f_steps:.0%} of the trial-steps in {a_wall / f_wall:.0%} of the wall time; "
          f"same best trial: {a_best == f_best}")


if __name__ == "__main__":
    main()
