"""raypipe/mlp_kernels.py against cuBLAS + kernels.py's GELU, at the recipe's shapes (GPU only).

    python benchmarks/bench_mlp.py

One micro-batch (256 x 128 rows) of one layer's MLP, n_embd 640, mlp_hidden 2048, bf16:
- forward: gate|up matmul then the gated GELU (cuBLAS + kernels.py), against one Triton matmul with the
  GELU in its epilogue;
- backward: the product's gradient (cuBLAS) then the GELU's backward, against one Triton matmul that
  writes d(gate|up);
- the whole MLP, forward and backward (the four other matmuls are cuBLAS in both);
then each Triton matmul's tile sizes (BM, BN, BK, GROUP, warps, stages), with TMA and without.
TFLOP/s counts the matmul's own work only.
"""

import torch
import torch.nn.functional as F
from cuda_timing import timed

from raypipe import kernels, mlp_kernels

N, C, H = 256 * 128, 640, 2048
CONFIGS = [  # (BM, BN, BK, GROUP, num_warps, num_stages)
    (128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 128, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4),
    (64, 128, 64, 8, 4, 5), (64, 256, 64, 8, 8, 3), (64, 256, 64, 8, 8, 4), (128, 64, 64, 8, 4, 4),
    (128, 256, 64, 8, 8, 3), (128, 128, 128, 8, 8, 2),
]


def report(name: str, fn, flops: float) -> None:
    try:
        ms = timed(fn)
    except Exception as error:  # a tile too large for the registers or shared memory, or no TMA here
        print(f"{name:58s} {type(error).__name__}: {str(error).splitlines()[0][:80]}", flush=True)
        return
    print(f"{name:58s} {ms:7.3f} ms  {flops / ms / 1e9:6.1f} TFLOP/s", flush=True)


def tiles(config: tuple) -> dict:
    return dict(zip(("BM", "BN", "BK", "GROUP", "num_warps", "num_stages"), config))


def main() -> None:
    torch.manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(N, C, **bf16)
    w_gate_up, w_down = torch.randn(2 * H, C, **bf16) * C ** -0.5, torch.randn(C, H, **bf16) * H ** -0.5
    grad = torch.randn(N, C, **bf16)
    gate_up = F.linear(x, w_gate_up)
    up_flops, down_flops = 2 * N * C * 2 * H, 2 * N * C * H

    report("gate|up matmul alone (cuBLAS)", lambda: F.linear(x, w_gate_up), up_flops)
    report("forward: cuBLAS + gated GELU kernel", lambda: kernels._gelu_forward(F.linear(x, w_gate_up)), up_flops)
    report("forward: mlp_up (Triton, GELU in the epilogue)", lambda: mlp_kernels._mlp_up(x, w_gate_up), up_flops)
    report("product's gradient matmul alone (cuBLAS)", lambda: grad @ w_down, down_flops)
    report("backward: cuBLAS + GELU backward kernel",
           lambda: kernels._gelu_backward(gate_up, grad @ w_down), down_flops)
    report("backward: mlp_down_backward (Triton)",
           lambda: mlp_kernels._mlp_down_backward(grad, w_down, gate_up), down_flops)

    for tma in (True, False):
        mlp_kernels.TMA = tma
        try:
            ours, ref = mlp_kernels._mlp_up(x, w_gate_up), kernels._gelu_forward(gate_up)
            d_ours, d_ref = mlp_kernels._mlp_down_backward(grad, w_down, gate_up), kernels._gelu_backward(gate_up, grad @ w_down)
        except Exception as error:
            print(f"TMA {tma}: {type(error).__name__}: {str(error).splitlines()[0][:80]}", flush=True)
            continue
        print(f"TMA {tma}: max |difference| gate|up {(ours[0] - gate_up).abs().max().item():.3g}, GELU output "
              f"{(ours[1] - ref).abs().max().item():.3g}, d(gate|up) {(d_ours - d_ref).abs().max().item():.3g}", flush=True)
    mlp_kernels.TMA = True

    leaves = [t.clone().requires_grad_() for t in (x, w_gate_up, w_down)]
    for name, fn in (("cuBLAS + kernels.py", mlp_kernels.gated_mlp_reference), ("mlp_kernels.py", mlp_kernels.gated_mlp)):
        step = lambda: torch.autograd.grad(fn(*leaves), leaves, grad)  # noqa: E731
        report(f"whole MLP forward + backward: {name}", step, 3 * (up_flops + down_flops))

    for tma, config in [(tma, config) for tma in (True, False) for config in CONFIGS]:
        mlp_kernels.TMA = tma
        mlp_kernels.UP_TILES = mlp_kernels.DOWN_TILES = tiles(config)
        for name, fn, flops in (("mlp_up", lambda: mlp_kernels._mlp_up(x, w_gate_up), up_flops),
                                ("mlp_down_backward", lambda: mlp_kernels._mlp_down_backward(grad, w_down, gate_up),
                                 down_flops)):
            report(f"{name}{' TMA' if tma else ''} {config}", fn, flops)


if __name__ == "__main__":
    main()
