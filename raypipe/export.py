"""`python -m raypipe.export CHECKPOINT OUT_DIR`: a Hugging Face model directory.

Writes `config.json` (a `Gemma3ForCausalLM`, text-only Gemma 3), `model.safetensors` and, where
the data's tokenizer is a `tokenizers` file, `tokenizer.json` + `tokenizer_config.json`, so that
`transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)` loads it. transformers is not needed
to export, only to load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

from .checkpoint import CheckpointError, load_model, read_config, resolve_checkpoint
from .model import is_sliding

EOT = "<|endoftext|>"


def hf_config(checkpoint: Path) -> dict:
    cfg = read_config(checkpoint)
    m = cfg.model
    meta_path = checkpoint / "data_meta.json"
    eot = json.loads(meta_path.read_text()).get("eot_id") if meta_path.is_file() else None
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
        "bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot,
        "torch_dtype": "float32",
    }


def export(checkpoint: str | Path, out_dir: str | Path) -> list[str]:
    """Write the model directory; return notes about what could not be included."""
    from safetensors.torch import save_file

    checkpoint, out_dir = resolve_checkpoint(checkpoint), Path(out_dir)
    model = load_model(checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    if not model.cfg.tie_embeddings:
        state["lm_head.weight"] = model.lm_head.weight.detach().contiguous()
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(checkpoint), indent=2) + "\n")

    notes = []
    meta_path = checkpoint / "data_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    tok_file = meta.get("tokenizer", {}).get("file")
    if tok_file and (checkpoint / tok_file).is_file():
        shutil.copyfile(checkpoint / tok_file, out_dir / "tokenizer.json")
        (out_dir / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT,
            "pad_token": EOT, "model_max_length": read_config(checkpoint).train.block_size}, indent=2) + "\n")
    elif meta.get("tokenizer", {}).get("kind") == "gpt2":
        notes.append("tokenizer: GPT-2's BPE; load it with AutoTokenizer.from_pretrained('gpt2') or tiktoken")
    else:
        notes.append(f"tokenizer: {meta.get('tokenizer')!r} has no Hugging Face tokenizer file; none written")
    return notes


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raypipe.export", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its best checkpoint)")
    p.add_argument("out_dir")
    args = p.parse_args(argv)
    try:
        notes = export(args.checkpoint, args.out_dir)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {resolve_checkpoint(args.checkpoint)} -> {args.out_dir} "
          "(config.json, model.safetensors)")
    for note in notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
