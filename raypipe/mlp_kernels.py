"""The gated MLP's two matmuls that touch its 2 x mlp_hidden-wide activations, with the GELU fused in (GPU).

Unfused, a micro-batch of the recipe writes gate|up (2 x 2048 wide) from a cuBLAS matmul, reads it back
for tanh-GELU(gate) * up, and in the backward writes the gradient of that product from another matmul
only to read it back for the GELU's backward: 0.5 GB of HBM traffic per layer that only moves data.
Here one Triton matmul computes gate and up tile by tile (two accumulators over the same input tile),
stores both (the backward needs them) and the gated product; the backward's matmul for the product's
gradient applies the GELU's derivative to its tile before storing, so it writes d(gate|up) directly.

The mathematics is the unfused path's: each matmul's result is rounded to the compute dtype before the
GELU reads it, exactly where cuBLAS would have written it, and the GELU runs in float32 on those values
(the same formula as kernels.py). Only the matmuls' summation order differs from cuBLAS's.

`gated_mlp` falls back to the unfused path on CPU, without Triton, or when a width does not divide
the tile sizes below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import SQRT_2_OVER_PI, available, gated_gelu

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

# Tiles (rows, columns, reduction) and launch shape per matmul; benchmarks/bench_mlp.py measures them.
UP_TILES = dict(BM=128, BN=128, BK=64, GROUP=8, num_warps=8, num_stages=3)
DOWN_TILES = dict(BM=128, BN=128, BK=64, GROUP=8, num_warps=8, num_stages=3)


def fits(n_embd: int, hidden: int) -> bool:
    """Whether the kernels' tiles divide the model's widths (otherwise the unfused path runs)."""
    return all(n_embd % t["BK"] == 0 and hidden % t["BN"] == 0 for t in (UP_TILES, DOWN_TILES))


def gated_mlp_reference(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, fused_gelu: bool = True):
    return F.linear(gated_gelu(F.linear(x, w_gate_up), fused=fused_gelu), w_down)


def gated_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """down(tanh-GELU(x W_gate^T) * (x W_up^T)) for x [..., C], w_gate_up [2H, C] (gate rows first), w_down [C, H].

    Under autocast the fused path computes in the autocast dtype, as F.linear would.
    """
    if not (fused and triton is not None and available(x) and fits(x.shape[-1], w_down.shape[1])):
        return gated_mlp_reference(x, w_gate_up, w_down, fused_gelu=fused)
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    shape = x.shape
    out = _GatedMLP.apply(x.reshape(-1, shape[-1]).to(dtype), w_gate_up.to(dtype), w_down.to(dtype))
    return out.view(*shape[:-1], out.shape[-1])


class _GatedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate_up, w_down):
        gate_up, hidden = _mlp_up(x, w_gate_up)
        ctx.save_for_backward(x, w_gate_up, w_down, gate_up, hidden)
        return hidden @ w_down.t()

    @staticmethod
    def backward(ctx, grad):
        x, w_gate_up, w_down, gate_up, hidden = ctx.saved_tensors
        grad = grad.contiguous()
        d_gate_up = _mlp_down_backward(grad, w_down, gate_up)
        return d_gate_up @ w_gate_up, d_gate_up.t() @ x, grad.t() @ hidden


if triton is not None:
    @triton.jit
    def _tile(pid, M, N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
        """Grouped tile order: GROUP row-tiles share each column tile while it sits in L2."""
        n_m = tl.cdiv(M, BM)
        per_group = GROUP * (N // BN)
        first_m = (pid // per_group) * GROUP
        rows = min(n_m - first_m, GROUP)
        return first_m + (pid % per_group) % rows, (pid % per_group) // rows

    @triton.jit
    def _gelu_parts(gate, C: tl.constexpr):
        """tanh-GELU(gate) and its derivative, float32 (the formula of kernels.py; C = sqrt(2 / pi))."""
        t = 2.0 * tl.sigmoid(2.0 * C * (gate + 0.044715 * gate * gate * gate)) - 1.0
        gelu = 0.5 * gate * (1.0 + t)
        slope = 0.5 * (1.0 + t) + 0.5 * gate * (1.0 - t * t) * C * (1.0 + 3.0 * 0.044715 * gate * gate)
        return gelu, slope

    @triton.jit
    def _mlp_up_kernel(x_ptr, w_ptr, gate_up_ptr, hidden_ptr, M, K: tl.constexpr, H: tl.constexpr, C: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
        pid_m, pid_n = _tile(tl.program_id(0), M, H, BM, BN, GROUP)
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        ks = tl.arange(0, BK)
        row_ok = rows[:, None] < M
        a_ptrs = x_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]
        g_ptrs = w_ptr + cols[None, :] * K + ks[:, None]  # W_gate^T tile: [BK, BN]
        u_ptrs = g_ptrs + H * K
        acc_gate = tl.zeros((BM, BN), dtype=tl.float32)
        acc_up = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, K, BK):
            a = tl.load(a_ptrs, mask=row_ok, other=0.0)
            acc_gate = tl.dot(a, tl.load(g_ptrs), acc_gate)
            acc_up = tl.dot(a, tl.load(u_ptrs), acc_up)
            a_ptrs += BK
            g_ptrs += BK
            u_ptrs += BK
        dtype = gate_up_ptr.dtype.element_ty
        gate, up = acc_gate.to(dtype), acc_up.to(dtype)  # where cuBLAS would have rounded them
        out = gate_up_ptr + rows[:, None].to(tl.int64) * (2 * H) + cols[None, :]
        tl.store(out, gate, mask=row_ok)
        tl.store(out + H, up, mask=row_ok)
        gelu, _ = _gelu_parts(gate.to(tl.float32), C)
        hidden = hidden_ptr + rows[:, None].to(tl.int64) * H + cols[None, :]
        tl.store(hidden, (gelu * up.to(tl.float32)).to(dtype), mask=row_ok)

    @triton.jit
    def _mlp_down_backward_kernel(grad_ptr, w_ptr, gate_up_ptr, out_ptr, M, K: tl.constexpr, H: tl.constexpr,
                                  C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
        pid_m, pid_n = _tile(tl.program_id(0), M, H, BM, BN, GROUP)
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        ks = tl.arange(0, BK)
        row_ok = rows[:, None] < M
        a_ptrs = grad_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]
        b_ptrs = w_ptr + ks[:, None] * H + cols[None, :]  # W_down [K, H], row-major
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, K, BK):
            acc = tl.dot(tl.load(a_ptrs, mask=row_ok, other=0.0), tl.load(b_ptrs), acc)
            a_ptrs += BK
            b_ptrs += BK * H
        dtype = out_ptr.dtype.element_ty
        d_hidden = acc.to(dtype).to(tl.float32)  # the product's gradient as cuBLAS would have written it
        offsets = rows[:, None].to(tl.int64) * (2 * H) + cols[None, :]
        gate = tl.load(gate_up_ptr + offsets, mask=row_ok, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + offsets + H, mask=row_ok, other=0.0).to(tl.float32)
        gelu, slope = _gelu_parts(gate, C)
        tl.store(out_ptr + offsets, (d_hidden * up * slope).to(dtype), mask=row_ok)
        tl.store(out_ptr + offsets + H, (d_hidden * gelu).to(dtype), mask=row_ok)


    @triton.jit
    def _mlp_up_tma_kernel(x_ptr, w_ptr, gate_up_ptr, hidden_ptr, M, K: tl.constexpr, H: tl.constexpr,
                           C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                           SMS: tl.constexpr):
        """_mlp_up_kernel with TMA loads and stores, persistent over the tiles (one program per SM)."""
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[2 * H, K], strides=[K, 1], block_shape=[BN, BK])
        gu_desc = tl.make_tensor_descriptor(gate_up_ptr, shape=[M, 2 * H], strides=[2 * H, 1], block_shape=[BM, BN])
        h_desc = tl.make_tensor_descriptor(hidden_ptr, shape=[M, H], strides=[H, 1], block_shape=[BM, BN])
        n_tiles = tl.cdiv(M, BM) * (H // BN)
        tile_out = tl.program_id(0) - SMS
        for tile in tl.range(tl.program_id(0), n_tiles, SMS, flatten=True):
            pid_m, pid_n = _tile(tile, M, H, BM, BN, GROUP)
            acc_gate = tl.zeros((BM, BN), dtype=tl.float32)
            acc_up = tl.zeros((BM, BN), dtype=tl.float32)
            for ki in range(K // BK):
                a = x_desc.load([pid_m * BM, ki * BK])
                acc_gate = tl.dot(a, w_desc.load([pid_n * BN, ki * BK]).T, acc_gate)
                acc_up = tl.dot(a, w_desc.load([H + pid_n * BN, ki * BK]).T, acc_up)
            tile_out += SMS
            pid_m, pid_n = _tile(tile_out, M, H, BM, BN, GROUP)
            dtype = gate_up_ptr.dtype.element_ty
            gate, up = acc_gate.to(dtype), acc_up.to(dtype)
            gu_desc.store([pid_m * BM, pid_n * BN], gate)
            gu_desc.store([pid_m * BM, H + pid_n * BN], up)
            gelu, _ = _gelu_parts(gate.to(tl.float32), C)
            h_desc.store([pid_m * BM, pid_n * BN], (gelu * up.to(tl.float32)).to(dtype))

    @triton.jit
    def _mlp_down_backward_tma_kernel(grad_ptr, w_ptr, gate_up_ptr, out_ptr, M, K: tl.constexpr, H: tl.constexpr,
                                      C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                                      GROUP: tl.constexpr, SMS: tl.constexpr):
        """_mlp_down_backward_kernel with TMA loads and stores, persistent over the tiles."""
        g_desc = tl.make_tensor_descriptor(grad_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K, H], strides=[H, 1], block_shape=[BK, BN])
        gu_desc = tl.make_tensor_descriptor(gate_up_ptr, shape=[M, 2 * H], strides=[2 * H, 1], block_shape=[BM, BN])
        out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, 2 * H], strides=[2 * H, 1], block_shape=[BM, BN])
        n_tiles = tl.cdiv(M, BM) * (H // BN)
        tile_out = tl.program_id(0) - SMS
        for tile in tl.range(tl.program_id(0), n_tiles, SMS, flatten=True):
            pid_m, pid_n = _tile(tile, M, H, BM, BN, GROUP)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for ki in range(K // BK):
                acc = tl.dot(g_desc.load([pid_m * BM, ki * BK]), w_desc.load([ki * BK, pid_n * BN]), acc)
            tile_out += SMS
            pid_m, pid_n = _tile(tile_out, M, H, BM, BN, GROUP)
            dtype = out_ptr.dtype.element_ty
            d_hidden = acc.to(dtype).to(tl.float32)
            gate = gu_desc.load([pid_m * BM, pid_n * BN]).to(tl.float32)
            up = gu_desc.load([pid_m * BM, H + pid_n * BN]).to(tl.float32)
            gelu, slope = _gelu_parts(gate, C)
            out_desc.store([pid_m * BM, pid_n * BN], (d_hidden * up * slope).to(dtype))
            out_desc.store([pid_m * BM, H + pid_n * BN], (d_hidden * gelu).to(dtype))

    def _scratch(size: int, alignment: int, stream):  # room for the device-side TMA descriptors
        return torch.empty(size, dtype=torch.int8, device="cuda")

    triton.set_allocator(_scratch)


TMA = True  # the persistent TMA kernels (Hopper and later); False: the plain ones


def _launch(kernel, tma_kernel, tiles: dict, M: int, H: int, *args) -> None:
    t = dict(tiles)
    tiles_n = triton.cdiv(M, t["BM"]) * (H // t["BN"])
    if TMA and torch.cuda.get_device_capability()[0] >= 9:
        sms = torch.cuda.get_device_properties().multi_processor_count
        kernel, grid, t["SMS"] = tma_kernel, (min(sms, tiles_n),), sms
    else:
        grid = (tiles_n,)
    kernel[grid](*args, BM=t.pop("BM"), BN=t.pop("BN"), BK=t.pop("BK"), GROUP=t.pop("GROUP"), **t)


@torch.library.custom_op("raypipe::mlp_up", mutates_args=())
def _mlp_up(x: torch.Tensor, w_gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    (M, K), H = x.shape, w_gate_up.shape[0] // 2
    x, w_gate_up = x.contiguous(), w_gate_up.contiguous()
    gate_up, hidden = x.new_empty(M, 2 * H), x.new_empty(M, H)
    _launch(_mlp_up_kernel, _mlp_up_tma_kernel, UP_TILES, M, H, x, w_gate_up, gate_up, hidden, M, K, H, SQRT_2_OVER_PI)
    return gate_up, hidden


@_mlp_up.register_fake
def _(x, w_gate_up):
    H = w_gate_up.shape[0] // 2
    return x.new_empty(x.shape[0], 2 * H), x.new_empty(x.shape[0], H)


@torch.library.custom_op("raypipe::mlp_down_backward", mutates_args=())
def _mlp_down_backward(grad: torch.Tensor, w_down: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    (M, K), H = grad.shape, w_down.shape[1]
    out = torch.empty_like(gate_up)
    _launch(_mlp_down_backward_kernel, _mlp_down_backward_tma_kernel, DOWN_TILES, M, H,
            grad, w_down.contiguous(), gate_up.contiguous(), out, M, K, H, SQRT_2_OVER_PI)
    return out


@_mlp_down_backward.register_fake
def _(grad, w_down, gate_up):
    return torch.empty_like(gate_up)
