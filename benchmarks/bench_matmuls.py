"""The recipe's per-layer matmuls alone, as a training step runs them, on one GPU; prints TFLOP/s each.

    python benchmarks/bench_matmuls.py [--config configs/gemma3-270m.yaml] [--splits 2 4]

For each projection of a block (q|k|v, o, gate|up, down) at one micro-batch (M = batch_size x block_size
rows): the forward (x @ W^T), the input's gradient (dy @ W) and the weight's gradient (dy^T @ x, a
reduction over all M rows into a small output). The weight's gradient is also timed split over its
long reduction: `s` batched matmuls over M / s rows each, their float32 results summed, to show whether
cuBLAS's choice for that small output leaves SMs idle (BENCHMARKS.md: it does not).
"""

import argparse

import torch
import torch.nn.functional as F

from cuda_timing import timed
from raypipe.config import load_config


def projections(m) -> list[tuple[str, int, int]]:
    """(name, in features, out features) of a block's matmuls."""
    qkv = (m.n_head + 2 * m.n_kv_head) * m.head_dim
    return [("qkv", m.n_embd, qkv), ("o", m.n_head * m.head_dim, m.n_embd),
            ("gate_up", m.n_embd, 2 * m.mlp_hidden), ("down", m.mlp_hidden, m.n_embd)]


def split_weight_grad(dy: torch.Tensor, x: torch.Tensor, splits: int) -> torch.Tensor:
    M, N = dy.shape
    parts = torch.bmm(dy.view(splits, M // splits, N).transpose(1, 2), x.view(splits, M // splits, -1),
                      out_dtype=torch.float32)
    return parts.sum(0).to(dy.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/gemma3-270m.yaml")
    parser.add_argument("--splits", type=int, nargs="*", default=[2, 4, 8])
    args = parser.parse_args()
    cfg = load_config(args.config, [])
    M = cfg.train.batch_size * cfg.train.block_size
    total_ms = {"cuBLAS": 0.0, "best split": 0.0}
    print(f"{torch.cuda.get_device_name()}, M = {M}")
    for name, K, N in projections(cfg.model):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        flop = 2 * M * K * N
        cases = {"forward": lambda: F.linear(x, w), "input grad": lambda: dy @ w, "weight grad": lambda: dy.t() @ x}
        for split in args.splits:
            cases[f"weight grad / {split}"] = lambda s=split: split_weight_grad(dy, x, s)
        reference = (dy.t().float() @ x.float())
        ms = {}
        for case, fn in cases.items():
            if "/" in case:
                err = (fn().float() - reference).abs().max().item() / reference.abs().max().item()
            ms[case] = timed(fn, iters=50)
            print(f"{name:8s} {case:16s} [{M}x{K}]x[{K}x{N}]  {ms[case] * 1000:8.1f} us  "
                  f"{flop / ms[case] / 1e9:6.1f} TFLOP/s" + (f"  max rel err {err:.1e}" if "/" in case else ""), flush=True)
        others = ms["forward"] + ms["input grad"]
        total_ms["cuBLAS"] += others + ms["weight grad"]
        total_ms["best split"] += others + min(v for case, v in ms.items() if case.startswith("weight grad"))
    print(f"one layer, one micro-batch: cuBLAS {total_ms['cuBLAS'] * 1000:.1f} us, with the best weight-grad split "
          f"{total_ms['best split'] * 1000:.1f} us", flush=True)


if __name__ == "__main__":
    main()
