"""ZeRO-1 data parallelism: each worker keeps AdamW's state for, and updates, 1/N of the parameters.

Under DDP every worker all-reduces the whole gradient, then clips and updates every parameter itself:
the same work N times. Here the gradients are reduce-scattered instead, so worker r receives the
mean gradient of its own 1/N slice; it clips that slice with the global norm (one scalar all-reduce),
updates it with fused AdamW, and the updated slices are all-gathered into every worker's parameters.
A ring all-reduce is a reduce-scatter followed by an all-gather, so the bytes sent are the same;
the clip and the update run on 1/N of the parameters, and AdamW's two state tensors take 1/N of the
memory. There is no DDP wrapper: the micro-batches accumulate locally and the step reduces once.

Parameters and gradients live in two flat float32 buffers (each parameter a view into one, its
`.grad` a view into the other), in configure_optimizer's order, padded to N equal slices: the
collectives run in place, nothing is copied in or out. `state_dict()` gathers the whole state in
torch AdamW's own format (a checkpoint written on N workers is the same file a single worker
writes), and `load_state_dict` takes that format.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .config import TrainConfig
from .optim import adamw, configure_optimizer

# torch 2.13 renamed the two collectives (and warns on the old names); torch 2.11 has only the old ones.
reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

ALIGN = 64  # each slice a multiple of 64 elements (256 bytes): aligned for NCCL and the fused update
STATE_KEYS = ("exp_avg", "exp_avg_sq")


class ShardedAdamW:
    """AdamW sharded over the default process group's ranks (ZeRO stage 1).

    Used as the loop uses torch's optimizer (param_groups' "lr", step, zero_grad, state_dict,
    load_state_dict), plus `reduce_and_clip`: call it once per step, after the backward and before
    `step`. Every method but `param_groups` and `zero_grad` is a collective.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device, grad_dtype: str = "float32"):
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.grad_dtype = getattr(torch, grad_dtype)
        # The full optimizer, stateless until it steps (it never does): the checkpoint format's groups and order.
        self.layout = configure_optimizer(model, cfg, device.type)
        self.params = [p for group in self.layout.param_groups for p in group["params"]]
        total = sum(p.numel() for p in self.params)
        self.shard = -(-total // (self.world * ALIGN)) * ALIGN
        self.flat_param = torch.zeros(self.shard * self.world, dtype=torch.float32, device=device)
        self.flat_grad = torch.zeros_like(self.flat_param)
        self.offsets, offset = [], 0
        for p in self.params:
            if p.dtype != torch.float32:
                raise ValueError(f"sharded AdamW keeps float32 parameters; got {p.dtype}")
            n = p.numel()
            self.flat_param[offset:offset + n].copy_(p.detach().reshape(-1))
            p.data = self.flat_param[offset:offset + n].view_as(p)
            p.grad = self.flat_grad[offset:offset + n].view_as(p)  # backward accumulates into it in place
            self.offsets.append(offset)
            offset += n
        dist.broadcast(self.flat_param, src=0)  # every rank starts from rank 0's weights, as DDP does

        # This rank's slice, cut where configure_optimizer's groups meet: at most one piece per group.
        lo, hi = self.rank * self.shard, (self.rank + 1) * self.shard
        self.pieces: list[tuple[int, int, torch.Tensor]] = []  # (group index, start in the flat buffer, piece)
        groups, start = [], 0
        for index, group in enumerate(self.layout.param_groups):
            end = start + sum(p.numel() for p in group["params"])
            a, b = max(lo, start), min(hi, end)
            params = []
            if a < b:
                piece = self.flat_param[a:b]
                piece.grad = self.flat_grad[a:b]
                self.pieces.append((index, a, piece))
                params = [piece]
            groups.append({"params": params, "weight_decay": group["weight_decay"]})
            start = end
        self.inner = adamw(groups, cfg, device.type)
        self.has_state = False  # after the first update (the same on every rank: a skipped step is skipped by all)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def my_slice(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.rank * self.shard:(self.rank + 1) * self.shard]

    def reduce_and_clip(self, max_norm: float) -> torch.Tensor:
        """Reduce the accumulated gradients to this rank's slice (their mean over ranks), clip it with
        the global norm as torch.nn.utils.clip_grad_norm_ does, and return that norm before clipping."""
        mine = self.my_slice(self.flat_grad)
        if self.grad_dtype == torch.float32:
            reduce_scatter(mine, self.flat_grad)  # in place: the sum lands in this rank's slice
            to_mean = 1.0 / self.world
        else:  # e.g. bfloat16: each rank's gradient rounded once (divided first: the sum stays in range)
            low = self.flat_grad.to(self.grad_dtype).div_(self.world)
            reduce_scatter(self.my_slice(low), low)
            mine.copy_(self.my_slice(low))
            to_mean = 1.0
        squares = torch.linalg.vector_norm(mine, dtype=torch.float32).square()
        dist.all_reduce(squares)
        norm = squares.sqrt() * to_mean  # of the mean gradient
        coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        mine.mul_(coefficient * to_mean)  # the mean, clipped, in one pass
        return norm

    def step(self) -> None:
        self.inner.step()
        all_gather(self.flat_param, self.my_slice(self.flat_param))  # in place
        self.has_state = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the gradient buffer (the parameters' .grad stay views into it, whatever set_to_none says)."""
        self.flat_grad.zero_()

    def state_dict(self) -> dict:
        """The whole state as a single worker's torch.optim.AdamW would hold it (gathered from every rank)."""
        out = self.layout.state_dict()  # param_groups with their indices; no state
        for group, mine in zip(out["param_groups"], self.inner.param_groups):
            group.update({k: v for k, v in mine.items() if k != "params"})
        if not self.has_state:
            return out
        full = {}
        for key in STATE_KEYS:
            mine = torch.zeros(self.shard, dtype=torch.float32, device=self.flat_param.device)
            for _, start, piece in self.pieces:
                offset = start - self.rank * self.shard
                mine[offset:offset + piece.numel()] = self.inner.state[piece][key]
            full[key] = torch.empty_like(self.flat_param)
            all_gather(full[key], mine)
        if not self.pieces:  # a slice of padding only (tiny models on many ranks): nothing of its own to add
            return out
        step = self.inner.state[self.pieces[0][2]]["step"]
        out["state"] = {
            i: {"step": step.clone(),
                **{key: full[key][offset:offset + p.numel()].view_as(p).clone() for key in STATE_KEYS}}
            for i, (p, offset) in enumerate(zip(self.params, self.offsets))}
        return out

    def load_state_dict(self, state: dict) -> None:
        """Take this rank's slice of a whole AdamW state (as `state_dict` returns it)."""
        groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": []} for group in state["param_groups"]]
        for j, (index, _, _) in enumerate(self.pieces):
            groups[index]["params"].append(j)
        inner_state = {}
        if state["state"]:
            device, saved = self.flat_param.device, state["state"]
            flat = {key: torch.cat([saved[i][key].reshape(-1).to(device, torch.float32) for i in range(len(self.params))])
                    for key in STATE_KEYS}
            for j, (_, start, piece) in enumerate(self.pieces):
                inner_state[j] = {"step": saved[0]["step"].clone(),  # its own: AdamW adds to it in place
                                  **{key: flat[key][start:start + piece.numel()].clone() for key in STATE_KEYS}}
            self.has_state = True
        self.inner.load_state_dict({"state": inner_state, "param_groups": groups})
