"""`python -m raypipe.generate CHECKPOINT --prompt "..."`: sample a continuation with a KV cache.

CHECKPOINT is a checkpoint directory or a run directory (its best checkpoint, from summary.json,
else its latest). The tokenizer travels inside the checkpoint (`tokenizer.json`, `data_meta.json`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from .checkpoint import CheckpointError, load_model, resolve_checkpoint
from .sampling import cut_at, generate
from .tokenizer import load_tokenizer


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
