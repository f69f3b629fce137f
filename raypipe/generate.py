"""`python -m raypipe.generate CHECKPOINT --prompt "..."`: sample a continuation with a KV cache.

CHECKPOINT is a checkpoint directory or a run directory (its best checkpoint, from summary.json,
else its latest). The tokenizer travels inside the checkpoint (`tokenizer.json`, `data_meta.json`).
Every flag is checked before anything is loaded.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from .checkpoint import load_model, resolve_checkpoint
from .errors import UserError
from .sampling import EXPECTED, cut_at, generate, invalid_arguments
from .tokenizer import load_tokenizer


def check_device(text: str) -> torch.device:
    expected = "expected cpu, cuda, cuda:N or mps, one this machine has"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UserError(f"--device {text}: not a device name; {expected}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {text}: no CUDA device is available here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {text}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {text}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise UserError(f"--device {text}: {expected}")
    return device


def _shown(c: str) -> str:
    """A character of an argv string as the user typed it: Python keeps an undecodable byte b as U+DC00+b."""
    if "\udc80" <= c <= "\udcff":
        return f"\\x{ord(c) - 0xDC00:02x}"
    return f"\\u{ord(c):04x}" if "\ud800" <= c <= "\udfff" else c


def check_prompt(prompt: str) -> None:
    """A prompt that was not valid UTF-8 holds lone surrogates: refuse it rather than guess what was meant."""
    bad = [i for i, c in enumerate(prompt) if "\ud800" <= c <= "\udfff"]
    if bad:
        shown = "".join(map(_shown, prompt))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise UserError(f"--prompt '{shown}': not valid UTF-8 ({_shown(prompt[bad[0]])} at character {bad[0] + 1}); "
                        "expected UTF-8 text: check the encoding of the terminal or file it came from (e.g. LANG=C.UTF-8)")


def check_args(args: argparse.Namespace) -> torch.device:
    """Every flag's value, in the order given by --help; the device to run on."""
    values = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_k", "num_samples")}
    for name in invalid_arguments(**values):
        raise UserError(f"--{name.replace('_', '-')} {values[name]}: expected {EXPECTED[name]}")
    if not 0 <= args.seed < 2**64:
        raise UserError(f"--seed {args.seed}: expected an integer in [0, 2**64)")
    check_prompt(args.prompt)
    return check_device(args.device)


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
        device = check_args(args)
        ckpt = resolve_checkpoint(args.checkpoint)
        model = load_model(ckpt, device)
        tok = load_tokenizer(ckpt)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = tok.encode(args.prompt) or [tok.eot_id]
    idx = torch.tensor([ids] * args.num_samples, device=device)
    g = torch.Generator().manual_seed(args.seed)
    out = generate(model, idx, args.max_new_tokens, args.temperature, args.top_k or None, g, stop_id=tok.eot_id)
    for row in out.tolist():
        print(tok.decode(cut_at(row, len(ids), tok.eot_id)))
        print("---")
    return 0


if __name__ == "__main__":
    sys.exit(main())
