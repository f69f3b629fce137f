"""ZeRO-1's collectives alone: all-reduce, reduce-scatter and all-gather of a float32 buffer of the recipe's
size (about its 164.65M parameters) on every GPU of one host. Prints milliseconds per call on rank 0.

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_collectives.py
    NCCL_MIN_NCHANNELS=64 torchrun --standalone --nproc-per-node 2 benchmarks/bench_collectives.py

NCCL reads its environment when the process group starts, so each setting is a run of its own.
Without GPUs it runs on gloo (a smoke test; its timings mean nothing here).
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raypipe.sharded_adamw import ALIGN, all_gather, reduce_scatter  # noqa: E402


def per_call_ms(fn, device: torch.device, reps: int) -> float:
    """Wall milliseconds per call over `reps` calls, after 3, the ranks started together."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        fn()
    sync()
    dist.barrier()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--numel", type=int, default=164_700_000, help="float32 elements (padded to the ranks' chunks)")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    n = -(-args.numel // (world * ALIGN)) * world * ALIGN
    buf = torch.randn(n, device=device)
    mine = buf[rank * (n // world):(rank + 1) * (n // world)]
    ar = per_call_ms(lambda: dist.all_reduce(buf), device, args.reps)
    rs = per_call_ms(lambda: reduce_scatter(mine, buf), device, args.reps)
    ag = per_call_ms(lambda: all_gather(buf, mine), device, args.reps)
    if rank == 0:
        nccl = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")) or "NCCL defaults"
        print(f"RESULT {world} ranks, {n * 4 / 1e6:,.1f} MB float32 ({nccl}): all-reduce {ar:.2f} ms | reduce-scatter "
              f"{rs:.2f} ms | all-gather {ag:.2f} ms | reduce-scatter + all-gather {rs + ag:.2f} ms", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
