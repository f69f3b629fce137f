"""What a training step runs: the model compiled whole, replayed as CUDA graphs, or compiled block by
block (for a sharded optimizer that reduces each block's gradients during the backward), and wrapped
for data parallelism where DDP does the reducing."""

from __future__ import annotations

import torch

from .model import GemmaLM
from .parallel import wrap_for_training


class GraphSteps:
    """`model` compiled and replayed as CUDA graphs (train.cuda_graphs), one graph step per micro-batch.

    A replay writes its outputs into the graph's own memory, so the loss is copied out before the next
    one, and the parameters' gradients must already exist: the backward adds into them in place (they
    are created here; the optimizer then zeroes instead of freeing them).
    """

    def __init__(self, model: torch.nn.Module):
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.compiled = torch.compile(model, mode="reduce-overhead")

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        torch.compiler.cudagraph_mark_step_begin()
        logits, loss = self.compiled(x, y)
        return logits, loss.clone()


def compile_blocks(raw_model: GemmaLM) -> GemmaLM:
    """Each transformer block's training forward compiled on its own, in place (parameter names unchanged;
    module hooks run outside the graphs); the embedding, the final norm and the head run eagerly. Each
    block's backward is then a graph of its own, after which its gradients are final: a sharded optimizer
    reduces them while the backward of earlier blocks runs. Evaluation (no gradients) and generation (a
    KV cache) stay eager, as they are on the plain model the loop evaluates with."""
    for block in raw_model.layers:
        def forward(x, rope_local, rope_global, cache=None, eager=block.forward, compiled=torch.compile(block.forward)):
            if cache is None and torch.is_grad_enabled():
                return compiled(x, rope_local, rope_global)
            return eager(x, rope_local, rope_global, cache)
        block.forward = forward
    return raw_model


def step_model(raw_model: GemmaLM, t, device: torch.device, world_size: int, sharded: bool):
    """What a training step runs: the model compiled (and replayed as CUDA graphs) as `t` asks, and
    wrapped in DDP with several workers unless the optimizer is sharded (ZeRO-1 reduces on its own)."""
    if not t.compile:
        model = raw_model
    elif sharded and t.overlap_comm:
        model = compile_blocks(raw_model)
    elif t.cuda_graphs and device.type == "cuda":
        model = GraphSteps(raw_model)
    else:
        model = torch.compile(raw_model)
    if world_size > 1 and not sharded:
        model = wrap_for_training(model, device, t)
    return model
