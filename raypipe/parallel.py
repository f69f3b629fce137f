"""Data parallelism: how the training loop's model is wrapped when a run has several workers.

DDP (one full replica per worker, gradients all-reduced once per optimizer step, on the last
micro-batch), with the choices measured for the recipe (BENCHMARKS.md, "Data-parallel scaling"):
- broadcast_buffers=False: the model's buffers (rotary tables, the padded vocabulary's bias) are
  built identically on every rank and never trained, so DDP's default broadcast of them before
  every forward (a collective on every micro-batch, where the ranks wait for each other) buys nothing;
- gradient_as_bucket_view=True: gradients live in DDP's all-reduce buckets, not copied in and out;
- train.ddp_grad_dtype: bfloat16 all-reduces the gradients in half the bytes (each rank's fp32
  gradient is rounded once before the sum); parameters, gradients and AdamW's state stay float32;
- train.ddp_bucket_mb: DDP's bucket size.
- train.ddp_split_graph: whether a compiled model's graph is cut at the buckets (see wrap_for_training).
With train.shard_optimizer: true the loop runs ZeRO-1 (raypipe/sharded_adamw.py) instead, unwrapped.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from .validation import DDP_GRAD_DTYPES as GRAD_DTYPES


def data_parallel(model: torch.nn.Module, device: torch.device, grad_dtype: str = "float32", bucket_mb: float = 25.0,
                  broadcast_buffers: bool = False, gradient_as_bucket_view: bool = True,
                  static_graph: bool = False) -> DDP:
    """`model` (compiled or not) wrapped in DDP; the process group must exist."""
    if grad_dtype not in GRAD_DTYPES:
        raise ValueError(f"grad_dtype {grad_dtype!r}: expected one of {', '.join(GRAD_DTYPES)}")
    device_ids: Optional[list[int]] = [device.index] if device.type == "cuda" else None
    # Newer torch names the per-forward buffer sync `forward_sync_buffers` (and warns on the old name).
    sync_key = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    ddp = DDP(model, device_ids=device_ids, bucket_cap_mb=bucket_mb, gradient_as_bucket_view=gradient_as_bucket_view,
              static_graph=static_graph, **{sync_key: broadcast_buffers})
    if grad_dtype == "bfloat16":
        ddp.register_comm_hook(None, bf16_allreduce_hook)  # state None: the default process group
    return ddp


def bf16_allreduce_hook(process_group, bucket):  # no annotations: DDP checks them, and this module's are strings
    """All-reduce a gradient bucket in bfloat16 and write the mean back into the float32 bucket.

    torch's own bf16_compress_hook does the same but refuses gloo; this one also runs on CPU.
    Dividing by the world size first (exact for powers of two) keeps the bf16 sum in range.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(dist.get_world_size(group))
    future = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def decompress(fut: torch.futures.Future) -> torch.Tensor:
        buffer.copy_(fut.value()[0])
        return buffer

    return future.then(decompress)


def wrap_for_training(model: torch.nn.Module, device: torch.device, train_cfg) -> DDP:
    """The loop's wrapping under several workers, as the run config's train section asks."""
    # Read when the compiled model first runs, inside DDP's forward. True (torch's default) splits the
    # graph into one piece per bucket so each bucket's all-reduce can start during the backward; False
    # keeps one graph (Inductor fuses across the cuts) and all-reduces after the backward.
    torch._dynamo.config.optimize_ddp = train_cfg.ddp_split_graph
    return data_parallel(model, device, grad_dtype=train_cfg.ddp_grad_dtype, bucket_mb=train_cfg.ddp_bucket_mb)
