"""Forward + backward time of the reference recipe's attention per SDPA backend (GPU only); prints one line each.

    python benchmarks/bench_attention.py

Shape as configs/gemma3-270m.yaml makes it: micro-batch 256, 4 query heads, 1 key/value head, 128
positions, head dim 256, bf16, causal, q/k/v as transposed views of [B, T, heads, D] (the model's
layout). Grouped-query attention either through `enable_gqa` or with the key/value head expanded.
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

B, H, KV, T, D = 256, 4, 1, 128, 256
ALL = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def time_attention(name: str, backends: list, expand: bool, contiguous: bool = False, iters: int = 20) -> None:
    q, k, v = (torch.randn(B, T, heads, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for heads in (H, KV, KV))

    def step():
        qq, kk, vv = q, k, v
        if expand:
            kk, vv = k.expand(B, H, T, D), v.expand(B, H, T, D)
        if contiguous:
            qq, kk, vv = qq.contiguous(), kk.contiguous(), vv.contiguous()
        F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=D ** -0.5, enable_gqa=not expand).sum().backward()

    try:
        with sdpa_kernel(backends):
            for _ in range(3):
                step()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                step()
            end.record()
            torch.cuda.synchronize()
        ms = start.elapsed_time(end) / iters
        print(f"{name:44s} fwd+bwd {ms:7.3f} ms per layer, x18 layers {18 * ms:6.1f} ms", flush=True)
    except RuntimeError as e:  # a backend that does not take this shape
        print(f"{name:44s} not available: {str(e)[:120]}", flush=True)


if __name__ == "__main__":
    time_attention("default dispatch, enable_gqa", ALL, expand=False)
    for backend in ALL[:3]:
        time_attention(f"{backend.name}, enable_gqa", [backend], expand=False)
        time_attention(f"{backend.name}, kv expanded", [backend], expand=True)
        time_attention(f"{backend.name}, kv expanded contiguous", [backend], expand=True, contiguous=True)
