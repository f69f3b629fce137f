"""AdamW and the learning-rate schedule, both in optimizer steps (the reference script stepped per micro-batch)."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Rate for optimizer step `step` (1-based; `step` = 0 is the start of training).

    Linear warmup from 0 at step 0 to `learning_rate` at `warmup_steps`, then cosine decay to
    `min_lr` at `max_steps`. (The reference script's LinearLR started at 1/3 of the rate, not 0.)
    """
    if step < cfg.warmup_steps:
        return cfg.learning_rate * step / cfg.warmup_steps
    decay_steps = cfg.max_steps - cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
    return cfg.min_lr + 0.5 * (cfg.learning_rate - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW(beta1, beta2) with weight decay on matrices and embeddings only, as nanoGPT does:
    decaying norm gains and other vectors only fights the normalisation."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return adamw(groups, cfg, device_type)


def adamw(groups: list[dict], cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """torch's AdamW over `groups` with the run's betas; fused (one kernel over all tensors) on CUDA."""
    return torch.optim.AdamW(groups, lr=lr_at(0, cfg), betas=(cfg.beta1, cfg.beta2), fused=device_type == "cuda")


def step_unless(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, skip: torch.Tensor) -> None:
    """Update unless `skip` (a bool scalar on the step's device). A fused AdamW decides on the device:
    given `found_inf` it leaves weights, moments and step counts alone, so the host does not wait for
    the GPU. Other optimizers, and float16's GradScaler (which skips overflowing steps itself and
    lowers its scale), decide on the host. A ZeRO-1 optimizer passes the flag to its inner AdamWs."""
    fused = getattr(optimizer, "inners", [optimizer])  # ShardedAdamW: the AdamWs over this rank's shard
    if fused[0].defaults.get("fused") and not scaler.is_enabled():
        flag = skip.float()
        for inner in fused:
            inner.found_inf = flag
        try:
            optimizer.step()
        finally:
            for inner in fused:
                del inner.found_inf
    elif not skip.item():
        scaler.step(optimizer)
