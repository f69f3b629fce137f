"""Sampling from a model: KV-cached generation, temperature and top-k (used by the loop and the CLI)."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .model import GemmaLM

# What each sampling argument must be; the CLI checks its flags against the same rules.
EXPECTED = {
    "max_new_tokens": "an integer >= 0",
    "temperature": "a finite number >= 0 (0 for greedy decoding)",
    "top_k": "an integer >= 0 (0 to sample from the whole vocabulary)",
    "num_samples": "an integer >= 1",
}


def _valid(name: str, value) -> bool:
    if isinstance(value, bool):
        return False
    if name == "temperature":
        return isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0
    if name == "top_k" and value is None:
        return True
    return isinstance(value, numbers.Integral) and value >= (1 if name == "num_samples" else 0)


def invalid_arguments(**values) -> list[str]:
    """The names (keys of EXPECTED) of the given values that break their rule."""
    return [name for name, value in values.items() if not _valid(name, value)]


def check_arguments(**values) -> None:
    for name in invalid_arguments(**values):
        raise ValueError(f"{name}={values[name]!r}: expected {EXPECTED[name]}")


@torch.inference_mode()
def generate(model: GemmaLM, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
             stop_id: Optional[int] = None, use_cache: bool = True) -> torch.Tensor:
    """Continue `idx` [batch, T] by up to `max_new_tokens`; temperature 0 is greedy.

    With the cache each new token costs one position of attention; without it (use_cache=False)
    the whole sequence is recomputed every step (the reference the cache is tested against).
    """
    check_arguments(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
    vocab = model.cfg.vocab_size
    if not (isinstance(idx, torch.Tensor) and idx.dim() == 2 and min(idx.shape) >= 1
            and idx.dtype in (torch.int64, torch.int32)):
        raise ValueError(f"idx: expected an int64 or int32 tensor [batch >= 1, tokens >= 1], got "
                         f"{getattr(idx, 'dtype', type(idx).__name__)} {list(getattr(idx, 'shape', []))}")
    if idx.min() < 0 or idx.max() >= vocab:
        raise ValueError(f"idx: token ids must lie in [0, {vocab}) (the model's vocab_size), got "
                         f"{int(idx.min())}..{int(idx.max())}")
    was_training = model.training
    model.eval()
    cache = model.new_cache() if use_cache else None
    logits, _ = model(idx, cache=cache)
    out, finished = idx, torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits[:, -1, :].float(), temperature, top_k, generator)
        out = torch.cat([out, nxt], dim=1)
        finished |= nxt[:, 0] == stop_id
        if bool(finished.all()):
            break
        logits, _ = model(nxt, cache=cache) if use_cache else model(out)
    model.train(was_training)
    return out


def sample_next(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                generator: Optional[torch.Generator]) -> torch.Tensor:
    check_arguments(temperature=temperature, top_k=top_k)
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)


def cut_at(ids: list[int], prompt_len: int, stop_id: Optional[int]) -> list[int]:
    """The prompt and what follows it up to (not including) the first stop token."""
    new = ids[prompt_len:]
    return ids[:prompt_len] + (new[:new.index(stop_id)] if stop_id in new else new)
