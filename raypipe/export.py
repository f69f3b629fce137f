"""`python -m raypipe.export CHECKPOINT OUT_DIR [--force]`: a Hugging Face model directory.

Writes `config.json` (a `Gemma3ForCausalLM`, text-only Gemma 3), `model.safetensors` and, where
the data's tokenizer is a `tokenizers` file, `tokenizer.json` + `tokenizer_config.json`, so that
`transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)` loads it. transformers is not needed
to export, only to load.

Everything is written into a temporary sibling of OUT_DIR and renamed into place at the end: a
failure leaves OUT_DIR as it was. An existing non-empty OUT_DIR is replaced only with `--force`, and
never when it is, holds or lies inside a raypipe checkpoint, run directory or data directory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import Optional

from .checkpoint import MANIFEST, load_model, read_config, resolve_checkpoint, verify
from .datafiles import parse_meta
from .errors import UserError
from .model import is_sliding


class ExportError(UserError):
    """OUT_DIR cannot be written safely, or the checkpoint's tokenizer does not fit its data."""


def hf_config(checkpoint: Path, eot_id: Optional[int] = None) -> dict:
    cfg = read_config(checkpoint)
    m = cfg.model
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": m.vocab_size,
        "hidden_size": m.n_embd,
        "intermediate_size": m.mlp_hidden,
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": m.n_kv_head,
        "head_dim": m.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": m.norm_eps,
        "sliding_window": m.sliding_window,
        "layer_types": ["sliding_attention" if is_sliding(m, i) else "full_attention" for i in range(m.n_layer)],
        "query_pre_attn_scalar": m.query_pre_attn_scalar or m.head_dim,
        # Both spellings: transformers 4.x reads these two, 5.x folds them into rope_parameters.
        "rope_theta": m.rope_global_base,
        "rope_local_base_freq": m.rope_local_base,
        "rope_scaling": None,
        "max_position_embeddings": cfg.train.block_size,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
        # raypipe puts an end-of-text token between documents: it starts, ends and pads them.
        "bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id,
        "torch_dtype": "float32",
    }


# --- where the export may go ---------------------------------------------------------------------------

CHECKPOINT_DIR = re.compile(r"checkpoint_\d+$")


def raypipe_kind(d: Path) -> Optional[str]:
    """What raypipe keeps in directory `d` (a checkpoint, a run, prepared data), or None."""
    try:
        if (d / MANIFEST).exists():
            return f"a raypipe checkpoint (it holds {MANIFEST})"
        if (d / "summary.json").exists() or (d.is_dir() and any(CHECKPOINT_DIR.match(p.name) for p in d.iterdir())):
            return "a raypipe run directory (it holds summary.json or checkpoint_* directories)"
        if (d / "meta.json").exists() and ((d / "train.bin").exists() or any(d.glob("train-[0-9]*.bin"))):
            return "a prepared data directory (it holds meta.json and train.bin or train-NNNNN.bin shards)"
    except OSError:  # unreadable: nothing raypipe could have read there either
        pass
    return None


def check_out_dir(checkpoint: Path, out_dir: Path, force: bool) -> Path:
    """OUT_DIR, resolved, once it is safe to write there; otherwise an ExportError naming the path."""
    src, out = checkpoint.resolve(), out_dir.resolve()
    other = "choose an OUT_DIR outside it"
    if out == src or src in out.parents:
        where = "is" if out == src else "lies inside"
        raise ExportError(f"OUT_DIR {out_dir}: {where} the checkpoint being exported ({src}); {other}")
    if out in src.parents:
        raise ExportError(f"OUT_DIR {out_dir}: contains the checkpoint being exported ({src}); {other}")
    if out == Path(out.anchor) or out in Path.cwd().resolve().parents or out == Path.cwd().resolve():
        raise ExportError(f"OUT_DIR {out_dir}: is the current directory or one above it; choose a new directory")
    for d in (out, *out.parents):
        kind = raypipe_kind(d)
        if kind:
            where = "is" if d == out else f"lies inside {d}, which is"
            raise ExportError(f"OUT_DIR {out_dir}: {where} {kind}; export never writes there, even with "
                              f"--force: {other}")
    if out.exists() and not out.is_dir():
        raise ExportError(f"OUT_DIR {out_dir}: exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"OUT_DIR {out_dir}: exists and is not empty; pass --force to replace it "
                              "(it is replaced only once the export is complete), or choose a new directory")
        for root, dirs, _ in os.walk(out):
            for name in dirs:
                kind = raypipe_kind(Path(root) / name)
                if kind:
                    raise ExportError(f"OUT_DIR {out_dir}: holds {Path(root) / name}, {kind}; --force does not "
                                      "replace raypipe's files: choose another OUT_DIR")
    return out


def sibling(out: Path, what: str) -> Path:
    """A new hidden directory beside `out` (same file system, so a rename moves it; mode from the umask)."""
    path = out.parent / f".{out.name}.{what}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    return path


def put_in_place(tmp: Path, out: Path) -> None:
    """Rename the complete `tmp` to `out`; an existing `out` is moved aside first and removed last."""
    if not (out.is_dir() and any(out.iterdir())):
        os.replace(tmp, out)  # absent, or an empty directory: one rename
        return
    old = sibling(out, "old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old)


# --- writing -------------------------------------------------------------------------------------------


def read_data_meta(checkpoint: Path) -> dict:
    """The checkpoint's copy of the data's meta.json, checked as the data's own is ({} if it has none)."""
    path = checkpoint / "data_meta.json"
    return parse_meta(path.read_bytes(), str(path)) if path.is_file() else {}


def eot_token(tokenizer_json: Path, eot_id: int) -> str:
    """The end-of-text token's text: whatever `prepare --eot` chose, as the tokenizer spells id `eot_id`."""
    from tokenizers import Tokenizer

    try:
        token = Tokenizer.from_file(str(tokenizer_json)).id_to_token(eot_id)
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise ExportError(f"{tokenizer_json}: not a Hugging Face tokenizer.json ({e})") from None
    if token is None:
        raise ExportError(f"{tokenizer_json}: has no token with id {eot_id}, the end-of-text id in data_meta.json: "
                          "the tokenizer is not the one the data was prepared with")
    return token


def write_export(checkpoint: Path, out: Path) -> list[str]:
    """The export's files into the new directory `out`; returns notes about what could not be included."""
    from safetensors.torch import save_file

    meta = read_data_meta(checkpoint)
    eot_id = meta.get("eot_id")
    tok_file = meta.get("tokenizer", {}).get("file")
    has_tok = bool(tok_file) and eot_id is not None and (checkpoint / tok_file).is_file()
    eot = eot_token(checkpoint / tok_file, eot_id) if has_tok else None
    model = load_model(checkpoint, verified=True)  # export() verified it before anything was read
    state = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    if not model.cfg.tie_embeddings:
        state["lm_head.weight"] = model.lm_head.weight.detach().contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(checkpoint, eot_id), indent=2) + "\n")

    notes = []
    if eot is not None:
        shutil.copyfile(checkpoint / tok_file, out / "tokenizer.json")
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot, "eos_token": eot,
            "pad_token": eot, "model_max_length": read_config(checkpoint).train.block_size}, indent=2) + "\n")
    elif meta.get("tokenizer", {}).get("kind") == "gpt2":
        notes.append("tokenizer: GPT-2's BPE; load it with AutoTokenizer.from_pretrained('gpt2') or tiktoken")
    else:
        notes.append(f"tokenizer: {meta.get('tokenizer')!r} has no Hugging Face tokenizer file; none written")
    return notes


def export(checkpoint: str | Path, out_dir: str | Path, force: bool = False) -> list[str]:
    """Write the model directory through a temporary sibling; return notes about what could not be included."""
    checkpoint = resolve_checkpoint(checkpoint)
    verify(checkpoint)  # every file as written, before any of them is read
    out = check_out_dir(checkpoint, Path(out_dir), force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = sibling(out, "export")
    except OSError as e:
        raise ExportError(f"OUT_DIR {out_dir}: cannot write beside it ({e})") from None
    try:
        notes = write_export(checkpoint, tmp)
        put_in_place(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a read-only file system: the user's to fix
            raise ExportError(f"OUT_DIR {out_dir}: could not be written ({e}); it was left as it was") from None
        raise
    return notes


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raypipe.export", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its best checkpoint)")
    p.add_argument("out_dir", help="a new (or empty) directory for the Hugging Face files")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty OUT_DIR once the export is complete (never a raypipe directory)")
    args = p.parse_args(argv)
    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
        notes = export(checkpoint, args.out_dir, force=args.force)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = ", ".join(sorted(p.name for p in Path(args.out_dir).iterdir()))
    print(f"exported {checkpoint} -> {args.out_dir} ({files})")
    for note in notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
