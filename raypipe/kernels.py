"""The training step's own GPU kernels, where the compiler's run slower than the memory allows, and
the output head computed without its whole logits.

- `cross_entropy`: mean cross-entropy of bf16 logits over the (padded) vocabulary. The forward reads
  each row once (online max and sum) and keeps only its log-sum-exp; the backward reads the row again
  and writes softmax minus one-hot. Inductor's version ran at about half the HBM bandwidth on an H100
  (a split reduction for the 50k-wide rows), 7% of the recipe's step.
- `gated_gelu`: tanh-GELU(gate) * up from the fused gate|up projection output; its backward writes
  both halves of the gradient in one pass (Inductor's fused cat + GELU backward reached ~1.9 TB/s).
- `linear_cross_entropy` (`model.fused_head`, for memory, not speed): the output head's matmul and the
  cross-entropy over chunks of rows, with the same kernels, the gradients computed in the forward: each
  chunk's logits are overwritten by their gradient, which two matmuls read at once. The whole [N, V]
  logits and their gradient are never in memory (2 x 3.3 GB per 256 x 128 micro-batch at GPT-2's
  vocabulary); the smaller matmuls cost about 1% of a recipe step on an H100.

All are torch custom ops (opaque to torch.compile, with fake kernels for tracing) backed by Triton
on CUDA. Everywhere else (CPU, no Triton, `model.fused_kernels: false`) the plain PyTorch expression
runs; that expression is also what the GPU tests compare the kernels with (forward and gradients). The
mathematics is the same: float32 arithmetic on bf16 inputs, results rounded to the input's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the plain expressions run
    triton = None


def available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets)


def gated_gelu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """Mean cross-entropy of [N, V] logits (any float dtype; -inf columns allowed) against [N] targets."""
    if fused and available(logits):
        losses, _ = _ce_forward(logits.contiguous(), targets.contiguous())
        return losses.mean()
    return cross_entropy_reference(logits, targets)


def gated_gelu(gate_up: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """[..., 2H] (gate then up) -> [..., H]: tanh-GELU(gate) * up."""
    if fused and available(gate_up):
        shape = gate_up.shape
        out = _gelu_forward(gate_up.reshape(-1, shape[-1]).contiguous())
        return out.view(*shape[:-1], shape[-1] // 2)
    return gated_gelu_reference(gate_up)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weight.T (their first `vocab_size` columns) against targets.

    [N, C] h and [V', C] weight (V' >= vocab_size: the rows past vocab_size are padding, never seen) of
    one dtype; float32 arithmetic inside, as `cross_entropy_reference(F.linear(h, weight))` computes it.
    With gradients enabled the forward also computes h's and weight's gradients (for a loss scaled by
    1), and the backward scales them by the loss's gradient: the logits are gone by then.
    """
    with_grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    loss, _, _ = _head_loss(h, weight, targets, vocab_size, chunk_rows or HEAD_CHUNK_ROWS, with_grads)
    return loss


SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

if triton is not None:
    @triton.jit
    def _ce_forward_kernel(logits_ptr, targets_ptr, losses_ptr, lse_ptr, V, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        m = float("-inf")
        s = 0.0
        for start in range(0, V, BLOCK):  # online max and sum: one exp per element, one rescale per block
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            new_m = tl.maximum(m, tl.max(x, 0))
            safe = tl.where(new_m == float("-inf"), 0.0, new_m)  # a block of padded columns only
            s = s * tl.exp(m - safe) + tl.sum(tl.exp(x - safe), 0)
            m = new_m
        lse = m + tl.log(s)
        target = tl.load(targets_ptr + row)
        picked = tl.load(base + target).to(tl.float32)
        tl.store(losses_ptr + row, lse - picked)
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _ce_backward_kernel(logits_ptr, targets_ptr, lse_ptr, grad_ptr, out_ptr, V, width, stride, out_stride,
                            BLOCK: tl.constexpr):
        """The gradient over a row's `width` columns, of which the first V are logits (the rest get 0)."""
        row = tl.program_id(0).to(tl.int64)
        lse = tl.load(lse_ptr + row)
        g = tl.load(grad_ptr + row)
        target = tl.load(targets_ptr + row)
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(logits_ptr + row * stride + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            d = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * g
            tl.store(out_ptr + row * out_stride + cols, d.to(out_ptr.dtype.element_ty), mask=cols < width)

    @triton.jit
    def _tanh(z):
        return 2.0 * tl.sigmoid(2.0 * z) - 1.0

    @triton.jit
    def _gelu_forward_kernel(in_ptr, out_ptr, H: tl.constexpr, n, C: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        row, col = i // H, i % H
        gate = tl.load(in_ptr + row * 2 * H + col, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(in_ptr + row * 2 * H + H + col, mask=mask, other=0.0).to(tl.float32)
        t = _tanh(C * (gate + 0.044715 * gate * gate * gate))
        tl.store(out_ptr + i, (0.5 * gate * (1.0 + t) * up).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gelu_backward_kernel(in_ptr, grad_ptr, out_ptr, H: tl.constexpr, n, C: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        row, col = i // H, i % H
        gate = tl.load(in_ptr + row * 2 * H + col, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(in_ptr + row * 2 * H + H + col, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + i, mask=mask, other=0.0).to(tl.float32)
        t = _tanh(C * (gate + 0.044715 * gate * gate * gate))
        gelu = 0.5 * gate * (1.0 + t)
        slope = 0.5 * (1.0 + t) + 0.5 * gate * (1.0 - t * t) * C * (1.0 + 3.0 * 0.044715 * gate * gate)
        dtype = out_ptr.dtype.element_ty
        tl.store(out_ptr + row * 2 * H + col, (g * up * slope).to(dtype), mask=mask)
        tl.store(out_ptr + row * 2 * H + H + col, (g * gelu).to(dtype), mask=mask)


# --- custom ops: opaque to torch.compile (fake kernels give shapes), gradients registered -------------

CE_BLOCK, CE_WARPS = 4096, 8  # columns per loop iteration of a row; benchmarks/bench_kernels.py
GELU_BLOCK, GELU_WARPS = 1024, 4  # elements per program


@torch.library.custom_op("raypipe::ce_forward", mutates_args=())
def _ce_forward(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    N, V = logits.shape
    losses = torch.empty(N, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(losses)
    _ce_forward_kernel[(N,)](logits, targets, losses, lse, V, logits.stride(0), BLOCK=CE_BLOCK, num_warps=CE_WARPS)
    return losses, lse


@_ce_forward.register_fake
def _(logits, targets):
    return logits.new_empty(logits.shape[0], dtype=torch.float32), logits.new_empty(logits.shape[0], dtype=torch.float32)


@torch.library.custom_op("raypipe::ce_backward", mutates_args=())
def _ce_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    N, V = logits.shape
    out = torch.empty_like(logits)
    _ce_backward_kernel[(N,)](logits, targets, lse, grad.contiguous(), out, V, V, logits.stride(0), out.stride(0),
                              BLOCK=CE_BLOCK, num_warps=CE_WARPS)
    return out


@_ce_backward.register_fake
def _(logits, targets, lse, grad):
    return torch.empty_like(logits)


def _ce_setup(ctx, inputs, output):
    logits, targets = inputs
    ctx.save_for_backward(logits, targets, output[1])


def _ce_grad(ctx, grad_losses, _grad_lse):
    logits, targets, lse = ctx.saved_tensors
    return _ce_backward(logits, targets, lse, grad_losses.float()), None


_ce_forward.register_autograd(_ce_grad, setup_context=_ce_setup)


@torch.library.custom_op("raypipe::gelu_forward", mutates_args=())
def _gelu_forward(gate_up: torch.Tensor) -> torch.Tensor:
    M, H2 = gate_up.shape
    out = gate_up.new_empty(M, H2 // 2)
    n = out.numel()
    _gelu_forward_kernel[(triton.cdiv(n, GELU_BLOCK),)](gate_up, out, H2 // 2, n, C=SQRT_2_OVER_PI,
                                                        BLOCK=GELU_BLOCK, num_warps=GELU_WARPS)
    return out


@_gelu_forward.register_fake
def _(gate_up):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


@torch.library.custom_op("raypipe::gelu_backward", mutates_args=())
def _gelu_backward(gate_up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(gate_up)
    n = grad.numel()
    _gelu_backward_kernel[(triton.cdiv(n, GELU_BLOCK),)](gate_up, grad.contiguous(), out, gate_up.shape[1] // 2, n,
                                                         C=SQRT_2_OVER_PI, BLOCK=GELU_BLOCK, num_warps=GELU_WARPS)
    return out


@_gelu_backward.register_fake
def _(gate_up, grad):
    return torch.empty_like(gate_up)


def _gelu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _gelu_grad(ctx, grad):
    (gate_up,) = ctx.saved_tensors
    return _gelu_backward(gate_up, grad)


_gelu_forward.register_autograd(_gelu_grad, setup_context=_gelu_setup)


HEAD_CHUNK_ROWS = 8192  # rows per chunk of linear_cross_entropy: 0.8 GB of bf16 logits at 50,304 columns


def _rows_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor, vocab: int,
                        scale: float, with_grads: bool) -> None:
    """Each row's loss from its first `vocab` columns into `losses` and, with gradients,
    scale * (softmax - one-hot) over the whole row in place (0 past `vocab`)."""
    if available(logits):
        n, width = logits.shape
        lse = torch.empty_like(losses)
        _ce_forward_kernel[(n,)](logits, targets, losses, lse, vocab, logits.stride(0), BLOCK=CE_BLOCK, num_warps=CE_WARPS)
        if with_grads:
            _ce_backward_kernel[(n,)](logits, targets, lse, torch.full_like(losses, scale), logits, vocab, width,
                                      logits.stride(0), logits.stride(0), BLOCK=CE_BLOCK, num_warps=CE_WARPS)
        return
    x = logits[:, :vocab].float()
    lse = x.logsumexp(-1, keepdim=True)
    losses.copy_((lse - x.gather(1, targets[:, None])).squeeze(1))
    if with_grads:
        grad = (x - lse).exp()
        grad[torch.arange(len(targets), device=grad.device), targets] -= 1.0
        logits[:, :vocab] = grad * scale
        logits[:, vocab:] = 0


def _add_product(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total (float32) += a @ b, a and b of a lower precision, the product accumulated in float32."""
    if total.is_cuda:
        torch.addmm(total, a, b, out_dtype=torch.float32, out=total)
    else:
        total.add_(a.float() @ b.float())


@torch.library.custom_op("raypipe::head_loss", mutates_args=())
def _head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int, chunk_rows: int,
               with_grads: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, h's gradient, weight's gradient in float32); empty gradients without `with_grads`."""
    N = h.shape[0]
    rows = min(N, chunk_rows)
    buffer = h.new_empty(rows, weight.shape[0])
    losses = h.new_empty(N, dtype=torch.float32)
    dh = torch.empty_like(h) if with_grads else h.new_empty(0)
    dweight = h.new_zeros(weight.shape if with_grads else (0,), dtype=torch.float32)
    for start in range(0, N, rows):
        stop = min(start + rows, N)
        logits = torch.mm(h[start:stop], weight.t(), out=buffer[:stop - start])
        _rows_loss_and_grad(logits, targets[start:stop], losses[start:stop], vocab, 1.0 / N, with_grads)
        if with_grads:  # the chunk's logits are now the mean loss's gradient
            torch.mm(logits, weight, out=dh[start:stop])
            _add_product(dweight, logits.t(), h[start:stop])
    return losses.mean(), dh, dweight


@_head_loss.register_fake
def _(h, weight, targets, vocab, chunk_rows, with_grads):
    loss = h.new_empty((), dtype=torch.float32)
    if with_grads:
        return loss, torch.empty_like(h), h.new_empty(weight.shape, dtype=torch.float32)
    return loss, h.new_empty(0), h.new_empty(0, dtype=torch.float32)


def _head_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.dtypes = inputs[0].dtype, inputs[1].dtype
    ctx.save_for_backward(output[1], output[2])


def _head_grad(ctx, grad_loss, _grad_dh, _grad_dweight):
    dh, dweight = ctx.saved_tensors
    return (dh * grad_loss).to(ctx.dtypes[0]), (dweight * grad_loss).to(ctx.dtypes[1]), None, None, None, None


_head_loss.register_autograd(_head_grad, setup_context=_head_setup)
