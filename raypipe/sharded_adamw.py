"""ZeRO-1 data parallelism: each worker keeps AdamW's state for, and updates, 1/N of the parameters.

Under DDP every worker all-reduces the whole gradient, then clips and updates every parameter itself:
the same work N times. Here the gradients are reduce-scattered instead, so worker r receives the
mean gradient of its own 1/N slice; it clips that slice with the global norm (one scalar all-reduce),
updates it with fused AdamW, and the updated slices are all-gathered into every worker's parameters.
A ring all-reduce is a reduce-scatter followed by an all-gather, so the bytes sent are the same;
the clip and the update run on 1/N of the parameters, and AdamW's two state tensors take 1/N of the
memory. There is no DDP wrapper: the micro-batches accumulate locally and the step reduces once.

Parameters and gradients live in two flat float32 buffers (each parameter a view into one, its
`.grad` a view into the other), so the collectives run in place and nothing is copied in or out. The
buffers are cut into buckets (the whole model as one, or one per block as `GemmaLM.gradient_buckets`
lists them), each padded to N equal chunks; worker r owns chunk r of every bucket. `state_dict()`
gathers the whole state in torch AdamW's own format (a checkpoint written on N workers is the same
file a single worker writes), and `load_state_dict` takes that format.

With `overlap`, a bucket's reduce-scatter starts from its gradients' hooks as soon as the last
micro-batch's backward has finished them, while the backward of earlier blocks goes on; and after
the update each bucket's all-gather runs in the background until the first forward that uses it
(its modules' forward pre-hooks wait for it). That needs the blocks compiled one by one
(`compiled.compile_blocks`): a whole-model graph finishes every gradient at once, at its end.

With `transport="peer_copies"` (one bucket, the GPUs of one host) the reduce and the gather are copies
pulled from the peers' buffers on the copy engines instead of NCCL kernels (raypipe/peer_copies.py),
pipelined over ranges of the rank's chunk with the sums and with the update (one fused AdamW per range).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .config import TrainConfig
from .optim import adamw, configure_optimizer
from .peer_copies import RANGES, PeerCopies

TRANSPORTS = ("collectives", "peer_copies")

# torch 2.13 renamed the two collectives (and warns on the old names); torch 2.11 has only the old ones.
reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

ALIGN = 64  # each slice a multiple of 64 elements (256 bytes): aligned for NCCL and the fused update
STATE_KEYS = ("exp_avg", "exp_avg_sq")


def bucket_layout(members: list[list[torch.nn.Parameter]], world: int) -> tuple[list[tuple[int, int]], dict[int, int]]:
    """Bucket after bucket in one flat buffer, each padded to `world` equal chunks of a multiple of ALIGN
    elements: each bucket's (start, size), and each parameter's offset (by id)."""
    buckets, offset_of, start = [], {}, 0
    for params in members:
        offset = start
        for p in params:
            offset_of[id(p)] = offset
            offset += p.numel()
        size = -(-(offset - start) // (world * ALIGN)) * ALIGN * world
        buckets.append((start, size))
        start += size
    return buckets, offset_of


def split_range(n: int, count: int) -> list[tuple[int, int]]:
    """[0, n) cut into at most `count` ranges, each but the last a multiple of ALIGN elements long."""
    step = -(-n // (count * ALIGN)) * ALIGN
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


class ShardedAdamW:
    """AdamW sharded over the default process group's ranks (ZeRO stage 1).

    Used as the loop uses torch's optimizer (param_groups' "lr", step, zero_grad, state_dict,
    load_state_dict), plus `reduce_and_clip`: call it once per step, after the backward and before
    `step`. Every method but `param_groups` and `zero_grad` is a collective.

    `buckets`: lists of modules, in the order the backward finishes their gradients (a parameter
    listed twice, as a tied head, belongs to the later bucket); None: the whole model is one bucket.
    `transport`: "collectives" (the process group's reduce-scatter and all-gather) or "peer_copies".
    `ranges`: each chunk is updated in this many ranges, one fused AdamW each (None: RANGES with peer
    copies, which pipeline them with the gather; else 1).
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device, grad_dtype: str = "float32",
                 buckets: Optional[list[list[torch.nn.Module]]] = None, overlap: bool = False,
                 transport: str = "collectives", ranges: Optional[int] = None):
        if transport not in TRANSPORTS:
            raise ValueError(f"transport {transport!r}: expected one of {', '.join(TRANSPORTS)}")
        if transport == "peer_copies" and (buckets or overlap or grad_dtype != "float32"):
            raise ValueError("peer copies reduce float32 gradients of one bucket, without overlap")
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.grad_dtype = getattr(torch, grad_dtype)
        # The full optimizer, stateless until it steps (it never does): the checkpoint format's groups and order.
        self.layout = configure_optimizer(model, cfg, device.type)
        self.params = [p for group in self.layout.param_groups for p in group["params"]]
        for p in self.params:
            if p.dtype != torch.float32:
                raise ValueError(f"sharded AdamW keeps float32 parameters; got {p.dtype}")
        module_lists = buckets or [[model]]
        bucket_of = {}
        for b, modules in enumerate(module_lists):
            for module in modules:
                bucket_of.update((id(p), b) for p in module.parameters())
        members = [[p for p in self.params if bucket_of.get(id(p), len(module_lists) - 1) == b]
                   for b in range(len(module_lists))]  # each in configure_optimizer's order: group by group
        members = [params for params in members if params]
        bucket_of = {id(p): b for b, params in enumerate(members) for p in params}

        self.buckets, offset_of = bucket_layout(members, self.world)  # (start, size) of each; each parameter's offset
        self.offsets = [offset_of[id(p)] for p in self.params]
        total = sum(size for _, size in self.buckets)
        count = ranges or (RANGES if transport == "peer_copies" else 1)
        ranges_of = [split_range(size // self.world, count) for _, size in self.buckets]  # in each bucket's chunk
        self.copies = PeerCopies(total, device, ranges_of[0]) if transport == "peer_copies" else None
        self.uncounted_bytes = 0  # GPU memory torch's allocator statistics leave out
        if self.copies:
            self.flat_param, self.flat_grad = self.copies.flat_param, self.copies.flat_grad
            self.uncounted_bytes = 2 * self.flat_param.numel() * self.flat_param.element_size()  # symmetric memory
        else:
            self.flat_param = torch.zeros(total, dtype=torch.float32, device=device)
            self.flat_grad = torch.zeros_like(self.flat_param)
        for p, offset in zip(self.params, self.offsets):
            n = p.numel()
            self.flat_param[offset:offset + n].copy_(p.detach().reshape(-1))
            p.data = self.flat_param[offset:offset + n].view_as(p)
            p.grad = self.flat_grad[offset:offset + n].view_as(p)  # backward accumulates into it in place
        dist.broadcast(self.flat_param, src=0)  # every rank starts from rank 0's weights, as DDP does
        if self.copies:
            self.copies.connect()

        # This rank's chunk of each bucket, cut where configure_optimizer's groups meet and into the ranges,
        # range r of every chunk updated by inners[r].
        group_of = {id(p): g for g, group in enumerate(self.layout.param_groups) for p in group["params"]}
        self.pieces: list[tuple[int, int, torch.Tensor, int]] = []  # (group index, start in the buffer, piece, range)
        for (start, size), params, chunk_ranges in zip(self.buckets, members, ranges_of):
            extents = {}  # group index -> (first, end) of its parameters in this bucket: one span each
            for p in params:  # group by group, in buffer order
                g, offset = group_of[id(p)], offset_of[id(p)]
                extents[g] = (extents.get(g, (offset,))[0], offset + p.numel())
            chunk = start + self.rank * (size // self.world)
            for r, (range_lo, range_hi) in enumerate(chunk_ranges):
                for g, (first, end) in sorted(extents.items()):
                    a, b = max(chunk + range_lo, first), min(chunk + range_hi, end)
                    if a < b:
                        piece = self.flat_param[a:b]
                        piece.grad = self.flat_grad[a:b]
                        self.pieces.append((g, a, piece, r))
        self.inners = [adamw([{"params": [piece for g, _, piece, r in self.pieces if (g, r) == (index, range_index)],
                               "weight_decay": group["weight_decay"]} for index, group in enumerate(self.layout.param_groups)],
                             cfg, device.type)
                       for range_index in range(max(map(len, ranges_of)))]
        self.has_state = False  # after the first update (the same on every rank: a skipped step is skipped by all)

        self.overlap = overlap
        self.reducing: list[tuple] = []  # (work, bf16 copy or None) of buckets 0, 1, ... launched this step
        self.gathering: dict[int, object] = {}  # bucket -> all-gather work not waited for yet
        self.arrived = [0] * len(self.buckets)  # gradient hooks run this step, per bucket
        self.expected = [len(params) * cfg.grad_accum_steps for params in members]
        if overlap:
            for b, params in enumerate(members):
                for p in params:
                    p.register_post_accumulate_grad_hook(lambda _, b=b: self._gradient_done(b))
            for module in {m for modules in module_lists for m in modules}:  # waits for the buckets its weights are in
                needed = sorted({bucket_of[id(p)] for p in module.parameters()})
                module.register_forward_pre_hook(lambda *_, needed=needed: self.wait_for_weights(needed))
            model.register_state_dict_pre_hook(lambda *_: self.wait_for_weights())

    @property
    def param_groups(self) -> list[dict]:
        return [group for inner in self.inners for group in inner.param_groups]

    def mine(self, bucket_tensor: torch.Tensor) -> torch.Tensor:
        """This rank's chunk of one bucket's tensor."""
        n = bucket_tensor.numel() // self.world
        return bucket_tensor[self.rank * n:(self.rank + 1) * n]

    def bucket(self, flat: torch.Tensor, bucket: int) -> torch.Tensor:
        """Bucket `bucket` of a flat buffer."""
        start, size = self.buckets[bucket]
        return flat[start:start + size]

    def chunk(self, flat: torch.Tensor, bucket: int) -> torch.Tensor:
        """This rank's chunk of bucket `bucket` in a flat buffer."""
        return self.mine(self.bucket(flat, bucket))

    def _gradient_done(self, bucket: int) -> None:
        """A parameter's gradient hook: the bucket's last gradient of the step's last micro-batch lets its
        reduce start, in bucket order. Every rank must issue the collectives in one order (NCCL pairs them by
        position), so a bucket finished before the one ahead of it waits for that one."""
        self.arrived[bucket] += 1
        while len(self.reducing) < len(self.buckets) and \
                self.arrived[len(self.reducing)] == self.expected[len(self.reducing)]:
            self._reduce(len(self.reducing))

    def _reduce(self, bucket: int) -> None:
        full = self.bucket(self.flat_grad, bucket)
        if self.grad_dtype == torch.float32:  # in place: the sum lands in this rank's chunk
            work, low = reduce_scatter(self.mine(full), full, async_op=True), None
        else:  # e.g. bfloat16: each rank's gradient rounded once (divided first: the sum stays in range)
            low = full.to(self.grad_dtype).div_(self.world)
            work = reduce_scatter(self.mine(low), low, async_op=True)
        self.reducing.append((work, low))

    def wait_for_weights(self, buckets=None) -> None:
        """Wait for the all-gathers of `buckets` (None: all) still running: needed before reading the weights
        other than through the model's forward or state_dict, whose hooks wait by themselves."""
        for b in list(self.gathering) if buckets is None else buckets:
            work = self.gathering.pop(b, None)
            if work is not None:
                work.wait()

    def reduce_and_clip(self, max_norm: float) -> torch.Tensor:
        """Reduce the accumulated gradients to this rank's chunks (their mean over ranks), clip them with
        the global norm as torch.nn.utils.clip_grad_norm_ does, and return that norm before clipping."""
        if self.copies:
            return self._clip([self.copies.reduce()], max_norm, 1.0 / self.world)
        if self.overlap and self.arrived != self.expected:
            raise RuntimeError(f"gradient hooks per bucket {self.arrived}, expected {self.expected}: the step must run "
                               "train.grad_accum_steps backward passes, each reaching every parameter")
        for b in range(len(self.reducing), len(self.buckets)):  # those the hooks did not start, in order
            self._reduce(b)
        chunks = [self.chunk(self.flat_grad, b) for b in range(len(self.buckets))]
        for b, (work, low) in enumerate(self.reducing):
            work.wait()
            if low is not None:
                chunks[b].copy_(self.mine(low))
        self.reducing.clear()
        self.arrived = [0] * len(self.buckets)
        return self._clip(chunks, max_norm, 1.0 / self.world if self.grad_dtype == torch.float32 else 1.0)

    def _clip(self, chunks: list[torch.Tensor], max_norm: float, to_mean: float) -> torch.Tensor:
        """Scale the summed chunks to the mean gradient, clipped by the global norm; return that norm."""
        squares = torch.stack(torch._foreach_norm(chunks)).square().sum()
        dist.all_reduce(squares)
        norm = squares.sqrt() * to_mean  # of the mean gradient
        coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(chunks, coefficient * to_mean)  # the mean, clipped, in one pass
        return norm

    def step(self) -> None:
        for index, inner in enumerate(self.inners):
            inner.step()
            if self.copies:
                self.copies.gather(index)  # beside the next range's update
        if self.copies:
            self.copies.finish()
        else:
            for b in reversed(range(len(self.buckets))):  # in the order the next forward uses them
                weights = self.bucket(self.flat_param, b)
                work = all_gather(weights, self.mine(weights), async_op=self.overlap)  # in place
                if self.overlap:
                    self.gathering[b] = work
        self.has_state = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the gradient buffer (the parameters' .grad stay views into it, whatever set_to_none says)."""
        self.flat_grad.zero_()

    def state_dict(self) -> dict:
        """The whole state as a single worker's torch.optim.AdamW would hold it (gathered from every rank)."""
        self.wait_for_weights()
        out = self.layout.state_dict()  # param_groups with their indices; no state
        for group, mine in zip(out["param_groups"], self.inners[0].param_groups):  # every range has every group
            group.update({k: v for k, v in mine.items() if k != "params"})
        if not self.has_state:
            return out
        full = {}
        for key in STATE_KEYS:
            local = torch.zeros_like(self.flat_param)  # this rank's chunks filled in, the rest gathered
            for _, start, piece, r in self.pieces:
                local[start:start + piece.numel()] = self.inners[r].state[piece][key]
            for b in range(len(self.buckets)):
                gathered = self.bucket(local, b)
                all_gather(gathered, self.mine(gathered))  # in place
            full[key] = local
        if not self.pieces:  # chunks of padding only (tiny models on many ranks): nothing of its own to add
            return out
        step = self.inners[self.pieces[0][3]].state[self.pieces[0][2]]["step"]
        # Views into the gathered buffers, not copies (the checkpoint's moment needs no second copy of
        # AdamW's state on the GPU); torch.save writes each buffer once.
        out["state"] = {
            i: {"step": step.clone(), **{key: full[key][offset:offset + p.numel()].view_as(p) for key in STATE_KEYS}}
            for i, (p, offset) in enumerate(zip(self.params, self.offsets))}
        return out

    def load_state_dict(self, state: dict) -> None:
        """Take this rank's chunks of a whole AdamW state (as `state_dict` returns it)."""
        self.wait_for_weights()
        groups = [[{**{k: v for k, v in group.items() if k != "params"}, "params": []} for group in state["param_groups"]]
                  for _ in self.inners]
        for j, (index, _, _, r) in enumerate(self.pieces):
            groups[r][index]["params"].append(j)
        inner_state = {}
        if state["state"]:
            saved = state["state"]
            flat = {key: torch.zeros_like(self.flat_param) for key in STATE_KEYS}
            for i, (p, offset) in enumerate(zip(self.params, self.offsets)):
                for key in STATE_KEYS:
                    flat[key][offset:offset + p.numel()] = saved[i][key].reshape(-1)
            for j, (_, start, piece, _) in enumerate(self.pieces):
                inner_state[j] = {"step": saved[0]["step"].clone(),  # its own: AdamW adds to it in place
                                  **{key: flat[key][start:start + piece.numel()].clone() for key in STATE_KEYS}}
            self.has_state = True
        for r, inner in enumerate(self.inners):
            inner.load_state_dict({"state": {j: inner_state[j] for j in inner_state if self.pieces[j][3] == r},
                                   "param_groups": groups[r]})
