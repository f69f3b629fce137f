"""ZeRO-1's reduce-scatter and all-gather as copies between the GPUs of one host (`train.shard_transport`).

NCCL's collectives are kernels: they hold SMs, so ZeRO-1 runs them after the backward and after the
update with nothing beside them. Here both flat buffers (weights and gradients) live in symmetric memory
(torch.distributed._symmetric_memory): every rank maps its peers' buffers, and a plain copy from a
peer's buffer is carried by a copy engine over NVLink, without SMs, so it can run beside kernels. A
rank's chunk of the buffers is cut into RANGES ranges:
- reduce: the peers' gradients for this rank's chunk are pulled range by range on a side stream, and
  each range is summed into the chunk while the next one is pulled;
- gather: after the update of each range (one fused AdamW per range), the peers' updated copies of that
  range are pulled while the next range is updated.
A barrier on the device (the symmetric memory's signal pads) orders each pull after the writes it reads.
On two ranks the sums are NCCL's (a + b): the weights come out bit-identical to the collectives'.
"""

from __future__ import annotations

import socket
from typing import Optional

import torch
import torch.distributed as dist

from .errors import ConfigError

RANGES = 4  # ranges a chunk is pipelined in (BENCHMARKS.md: 4 against 1 and 8 on two GPUs)


def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why this run's ranks cannot use peer copies, or None when they can. A collective: every rank gets the
    same answer."""
    index = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else None
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (socket.gethostname(), index, _local_reason(device)))
    reasons = [reason for _, _, reason in everyone if reason]
    if reasons:
        return reasons[0]
    if len({host for host, _, _ in everyone}) > 1:
        return "the workers are on more than one host"
    indices = [index for _, index, _ in everyone]
    if len(set(indices)) < len(indices) or max(indices) >= torch.cuda.device_count():
        return "each worker does not see every worker's GPU (CUDA_VISIBLE_DEVICES)"
    for a in indices:
        for b in indices:
            if a != b and not torch.cuda.can_device_access_peer(a, b):
                return f"GPU {a} cannot access GPU {b}'s memory (no peer access)"
    return None


def _local_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "the workers are not on GPUs"
    try:  # a small allocation: drivers or containers without what symmetric memory needs fail here, on every rank
        from torch.distributed import _symmetric_memory as symm_mem
        symm_mem.empty(1024, dtype=torch.float32, device=device)
    except Exception as e:  # whatever it is, NCCL still works: the reason is logged and auto takes NCCL
        return f"symmetric memory does not work here ({type(e).__name__}: {e})"
    return None


def shard_transport(t, device: torch.device, log) -> str:
    """The transport of ZeRO-1's reduce and gather for `train.shard_transport` (a collective on GPUs).
    "auto" takes peer copies where every rank can use them and says so on rank 0's log."""
    if t.shard_transport == "collectives" or t.overlap_comm or t.ddp_grad_dtype != "float32" or device.type != "cuda":
        return "collectives"
    reason = unavailable_reason(device)
    if reason is None:
        log("[raypipe] ZeRO-1's reduce-scatter and all-gather: copies between the GPUs on their copy engines "
            "(train.shard_transport)")
        return "peer_copies"
    if t.shard_transport == "peer_copies":
        raise ConfigError(f"train.shard_transport: peer_copies cannot run here: {reason}; "
                          "set train.shard_transport: collectives (or auto)")
    log(f"[raypipe] ZeRO-1's reduce-scatter and all-gather: NCCL ({reason}, so no copies between GPUs)")
    return "collectives"


class PeerCopies:
    """The symmetric buffers of one ZeRO-1 optimizer (one bucket) and the copies between them. Rank r owns
    [r * chunk, (r + 1) * chunk) of `numel`, a multiple of the world size."""

    def __init__(self, numel: int, device: torch.device, ranges: list[tuple[int, int]]):
        from torch.distributed import _symmetric_memory as symm_mem
        self.symm_mem = symm_mem
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.chunk = numel // self.world
        self.ranges = ranges  # of the chunk, in order
        self.flat_param = symm_mem.empty(numel, dtype=torch.float32, device=device).zero_()
        self.flat_grad = symm_mem.empty(numel, dtype=torch.float32, device=device).zero_()
        self.peers = [(self.rank + s) % self.world for s in range(1, self.world)]
        self.received = torch.empty(len(self.peers), self.chunk, device=device)  # the peers' gradients for my chunk
        self.side = torch.cuda.Stream(device)

    def connect(self) -> None:
        """Map the peers' buffers (a collective); after the buffers hold their first values."""
        group = dist.group.WORLD.group_name
        self.weights_handle = self.symm_mem.rendezvous(self.flat_param, group)
        self.grads_handle = self.symm_mem.rendezvous(self.flat_grad, group)
        mine = self.rank * self.chunk
        self.peer_grads = [self.grads_handle.get_buffer(p, (self.chunk,), torch.float32, mine) for p in self.peers]
        self.peer_weights = [self.weights_handle.get_buffer(p, (self.chunk,), torch.float32, p * self.chunk)
                             for p in self.peers]

    def reduce(self) -> torch.Tensor:
        """Sum every rank's gradients for this rank's chunk into it (in place); returns the chunk."""
        main = torch.cuda.current_stream()
        mine = self.flat_grad[self.rank * self.chunk:(self.rank + 1) * self.chunk]
        self.side.wait_stream(main)  # this rank's gradients are complete
        pulled = []
        with torch.cuda.stream(self.side):
            self.grads_handle.barrier(channel=0)  # ... and every peer's
            for lo, hi in self.ranges:
                for slot, grads in enumerate(self.peer_grads):
                    self.received[slot, lo:hi].copy_(grads[lo:hi])
                pulled.append(self.side.record_event())
            self.grads_handle.barrier(channel=0)  # every peer has read this rank's gradients
        for (lo, hi), event in zip(self.ranges, pulled):
            main.wait_event(event)
            mine[lo:hi].add_(self.received[0, lo:hi] if len(self.peers) == 1 else self.received[:, lo:hi].sum(0))
        main.wait_stream(self.side)  # the gradients may not be zeroed before every peer has read them
        return mine

    def gather(self, index: int) -> None:
        """Pull range `index` of every peer's chunk of the weights, once each rank has updated it (queued
        behind the update on the side stream; `finish` waits for all)."""
        lo, hi = self.ranges[index]
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            self.weights_handle.barrier(channel=1)  # every rank has updated this range
            for peer, weights in zip(self.peers, self.peer_weights):
                self.flat_param[peer * self.chunk + lo:peer * self.chunk + hi].copy_(weights[lo:hi])

    def finish(self) -> None:
        torch.cuda.current_stream().wait_stream(self.side)  # the next forward reads every chunk
