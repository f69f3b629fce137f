"""Forward + backward time of the reference recipe's attention per implementation (GPU only); one line each.

    python benchmarks/bench_attention.py [--T 128 256 512]

Shape as configs/gemma3-270m.yaml makes it: micro-batch 256 (fewer at longer T: the same tokens), 4
query heads, 1 key/value head, head dim 256, bf16, causal, q/k/v as transposed views of [B, T, heads, D]
(the model's layout). SDPA backends with grouped-query attention through `enable_gqa` or with the
key/value head expanded; `model.matmul_attention` eager and compiled; FlexAttention compiled.
"""

import argparse

import torch
import torch.nn.functional as F
from cuda_timing import timed
from torch.nn.attention import SDPBackend, sdpa_kernel

from raypipe.model import matmul_attention

H, KV, D = 4, 1, 256
ALL = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(backends, expand: bool, contiguous: bool = False):
    def attend(q, k, v):
        B, _, T, _ = q.shape
        if expand:
            k, v = k.expand(B, H, T, D), v.expand(B, H, T, D)
        if contiguous:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=D ** -0.5, enable_gqa=not expand)
    return attend


def flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled, masks = torch.compile(flex_attention), {}

    def attend(q, k, v):
        T = q.shape[2]
        if T not in masks:
            masks[T] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device="cuda")
        return compiled(q, k, v, block_mask=masks[T], scale=D ** -0.5, enable_gqa=True)
    return attend


def time_attention(name: str, attend, T: int, iters: int = 20) -> None:
    B = 256 * 128 // T
    q, k, v = (torch.randn(B, T, heads, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for heads in (H, KV, KV))

    def step():
        attend(q, k, v).float().sum().backward()

    try:
        ms = timed(step, iters)
        print(f"T {T:4d} {name:40s} fwd+bwd {ms:7.3f} ms per layer, x18 layers {18 * ms:6.1f} ms", flush=True)
    except Exception as e:  # a backend that does not take this shape
        print(f"T {T:4d} {name:40s} not available: {type(e).__name__}: {str(e)[:120]}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--T", type=int, nargs="+", default=[128])
    args = parser.parse_args()
    scale = D ** -0.5
    compiled_matmul = torch.compile(lambda q, k, v: matmul_attention(q, k, v, scale))
    for T in args.T:
        time_attention("default dispatch, enable_gqa", sdpa(ALL, expand=False), T)
        for backend in ALL[:3]:
            time_attention(f"{backend.name}, enable_gqa", sdpa([backend], expand=False), T)
            time_attention(f"{backend.name}, kv expanded", sdpa([backend], expand=True), T)
        time_attention("matmul_attention, eager", lambda q, k, v: matmul_attention(q, k, v, scale), T)
        time_attention("matmul_attention, compiled", compiled_matmul, T)
        time_attention("flex_attention, compiled", flex(), T)
