"""raypipe/kernels.py against the compiled PyTorch expressions they replace, at the recipe's shapes (GPU only).

    python benchmarks/bench_kernels.py

Forward + backward of the cross-entropy over 32,768 x 50,304 bf16 logits (micro-batch 256 x 128, the
padded GPT-2 vocabulary) and of the gated GELU over 32,768 x (2 x 2,048); each line gives the time
and the bandwidth that its unavoidable traffic implies (logits read twice and gradient written once;
gate|up read twice, the output and the gradient written once each). Then the Triton block sizes.

Then the output head's whole forward + backward (matmuls included; time and the memory it adds at its
peak): the plain head (the padded logits, the cross-entropy kernels, autograd's two matmuls) against
`kernels.linear_cross_entropy` (`model.fused_head`) by rows per chunk.
"""

import torch
import torch.nn.functional as F
from cuda_timing import timed

from raypipe import kernels

N, V, VOCAB, H = 256 * 128, 50304, 50257, 2048


def report(name: str, ms: float, nbytes: int) -> None:
    print(f"{name:48s} {ms:7.3f} ms  {nbytes / ms / 1e9:6.2f} TB/s", flush=True)


def main() -> None:
    torch.manual_seed(0)
    logits = torch.randn(N, V, device="cuda").to(torch.bfloat16)
    logits[:, VOCAB:] = float("-inf")
    logits.requires_grad_()
    targets = torch.randint(0, VOCAB, (N,), device="cuda")
    gate_up = torch.randn(N, 2 * H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ce_bytes, gelu_bytes = 3 * logits.numel() * 2, (2 * gate_up.numel() + N * H + gate_up.numel()) * 2
    reference_ce = torch.compile(kernels.cross_entropy_reference)
    reference_gelu = torch.compile(kernels.gated_gelu_reference)
    grad = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)

    def run_ce(fn):  # autograd.grad: no .grad to accumulate into (the model's logits are no leaf either)
        return lambda: torch.autograd.grad(fn(logits, targets), logits)

    def run_gelu(fn):
        return lambda: torch.autograd.grad(fn(gate_up), gate_up, grad)

    report("cross-entropy, compiled PyTorch", timed(run_ce(reference_ce)), ce_bytes)
    report("cross-entropy, kernels.py", timed(run_ce(kernels.cross_entropy)), ce_bytes)
    report("gated GELU, compiled PyTorch", timed(run_gelu(reference_gelu)), gelu_bytes)
    report("gated GELU, kernels.py", timed(run_gelu(kernels.gated_gelu)), gelu_bytes)
    for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)):
        kernels.CE_BLOCK, kernels.CE_WARPS = block, warps
        report(f"cross-entropy, BLOCK {block}, {warps} warps", timed(run_ce(kernels.cross_entropy)), ce_bytes)
    for block, warps in ((512, 4), (1024, 4), (2048, 8), (4096, 8)):
        kernels.GELU_BLOCK, kernels.GELU_WARPS = block, warps
        report(f"gated GELU, BLOCK {block}, {warps} warps", timed(run_gelu(kernels.gated_gelu)), gelu_bytes)


def head() -> None:
    torch.cuda.empty_cache()  # main()'s tensors are gone
    targets = torch.randint(0, VOCAB, (N,), device="cuda")
    h = torch.randn(N, 640, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, 640, device="cuda") * 0.05).to(torch.bfloat16)
    weight[VOCAB:] = 0
    weight.requires_grad_()
    bias = torch.zeros(V, device="cuda", dtype=torch.bfloat16)
    bias[VOCAB:] = float("-inf")

    def measure(name, loss):
        ms = timed(lambda: torch.autograd.grad(loss(), (h, weight)))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.autograd.grad(loss(), (h, weight))
        print(f"{name:48s} {ms:7.3f} ms  peak +{(torch.cuda.max_memory_allocated() - base) / 1e9:5.2f} GB", flush=True)

    measure("head, plain (logits, cross-entropy kernels)", lambda: kernels.cross_entropy(F.linear(h, weight, bias), targets))
    for rows in (4096, 8192, 16384, 32768):
        measure(f"head, linear_cross_entropy, {rows} rows a chunk",
                lambda: kernels.linear_cross_entropy(h, weight, targets, VOCAB, rows))


if __name__ == "__main__":
    main()
    head()
