"""The GPU time of a callable, for the kernel benchmarks (bench_kernels.py, bench_attention.py)."""

import torch


def timed(fn, iters: int = 20) -> float:
    """Milliseconds per call on the GPU's clock (CUDA events), after 3 calls of warm-up."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
