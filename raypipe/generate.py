"""`python -m raypipe.generate CHECKPOINT --prompt "..."`: sample a continuation with a KV cache.

CHECKPOINT is a checkpoint directory or a run directory (its best checkpoint, from summary.json,
else its latest). The tokenizer travels inside the checkpoint (`tokenizer.json`, `data_meta.json`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import MANIFEST, CheckpointError, latest_checkpoint, load_model
from .model import GemmaLM
from .tokenizer import load_tokenizer


@torch.inference_mode()
def generate(model: GemmaLM, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
             stop_id: Optional[int] = None, use_cache: bool = True) -> torch.Tensor:
    """Continue `idx` [batch, T] by up to `max_new_tokens`; temperature 0 is greedy.

    With the cache each new token costs one position of attention; without it (use_cache=False)
    the whole sequence is recomputed every step (the reference the cache is tested against).
    """
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
    if temperature <= 0:
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


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given, or a run directory's best (else latest complete) checkpoint."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    summary = path / "summary.json"
    if summary.is_file():
        best = json.loads(summary.read_text()).get("best_checkpoint")
        if best and Path(best).is_dir():
            return Path(best)
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise CheckpointError(f"{path}: neither a checkpoint ({MANIFEST}) nor a run directory with a complete checkpoint")
    return latest


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raypipe.generate", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its best checkpoint)")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=50, help="0 to sample from the whole vocabulary")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        model = load_model(ckpt, args.device)
        tok = load_tokenizer(ckpt)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = tok.encode(args.prompt) or [tok.eot_id]
    idx = torch.tensor([ids] * args.num_samples, device=args.device)
    g = torch.Generator().manual_seed(args.seed)
    out = generate(model, idx, args.max_new_tokens, args.temperature, args.top_k or None, g, stop_id=tok.eot_id)
    for row in out.tolist():
        print(tok.decode(cut_at(row, len(ids), tok.eot_id)))
        print("---")
    return 0


if __name__ == "__main__":
    sys.exit(main())
