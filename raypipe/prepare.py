"""`python -m raypipe.prepare`: text files -> train.bin / val.bin / meta.json (+ tokenizer.json).

    python -m raypipe.prepare INPUT... --out DIR --tokenizer {gpt2,bpe:VOCAB,byte,PATH/tokenizer.json}
        [--text-column text] [--val-fraction F | --val INPUT...] [--txt-split {blank,line,eot}]
        [--workers N] [--ray [--shard-docs N]]

Inputs are files, globs or directories of `.txt`, `.jsonl` and `.parquet`; what a document is in each,
how bytes that are not UTF-8 are handled and how the train/val split is made: raypipe/documents.py.
Every non-empty document is followed by the end-of-text token. Tokenizing in local processes and the
streamed, atomic writing of the output: raypipe/tokenize_files.py. With --ray, a Ray Data pipeline reads
INPUT paths or URIs, tokenizes and writes a sharded directory or URI prefix in parallel on the cluster:
raypipe/prepare_ray.py. This module is the CLI and `prepare()` that ties the pieces together.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from .datafiles import dtype_for_vocab, remove_stale_temporaries
from .documents import TXT_SPLITS, Options, PrepareError, check_input, check_split_options, expand_inputs, plan_tasks
from .errors import UserError
from .tokenize_files import Progress, build_tokenizer, local_cores, run_local, write_token_files
from .tokenizer import EOT, SPEC_HELP, parse_spec


def prepare(inputs: list[str], out: str | Path, tokenizer: str = "byte", *, val_fraction: float = 0.01,
            val_inputs: Optional[list[str]] = None, text_column: str = "text", txt_split: str = "blank",
            seed: int = 0, eot: str = EOT, workers: Optional[int] = None, use_ray: bool = False,
            shard_docs: int = 16_384, progress: bool = True, log=print) -> dict:
    """Tokenize `inputs` into `out` (train.bin, val.bin, meta.json, tokenizer.json); return the meta.
    With `use_ray`: a Ray Data pipeline writing a sharded directory or URI prefix (raypipe/prepare_ray.py)."""
    if use_ray:
        from .prepare_ray import prepare_ray

        return prepare_ray(inputs, out, tokenizer, val_fraction=val_fraction, val_inputs=val_inputs,
                           text_column=text_column, txt_split=txt_split, seed=seed, eot=eot, workers=workers,
                           shard_docs=shard_docs, progress=progress, log=log)
    out = Path(out)
    parse_spec(tokenizer)  # an unknown spec fails before any reading
    check_split_options(txt_split, val_fraction, val_inputs)
    if out.exists():
        raise PrepareError(f"--out {out} already exists; remove it or choose another directory")
    remove_stale_temporaries(out, log)  # left by a killed prepare of the same --out: freed before long work
    opts = Options(text_column, txt_split, val_fraction, seed)
    train_paths = expand_inputs(inputs)
    val_paths = expand_inputs(val_inputs, "--val") if val_inputs else []
    both = sorted({p.resolve() for p in train_paths} & {p.resolve() for p in val_paths})
    if both:  # e.g. a directory INPUT that also holds the validation files
        raise PrepareError(f"{both[0]} is both an INPUT and a --val input; val documents would also be trained on")
    for path in train_paths + val_paths:
        check_input(path, opts)
    forced = "train" if val_paths else None
    tasks = list(plan_tasks(train_paths, opts, forced)) + list(plan_tasks(val_paths, opts, "val"))
    if not tasks:
        raise PrepareError(f"no input: {', '.join(map(str, train_paths + val_paths))} "
                           "hold no bytes (or no parquet row groups)")
    train_tasks = [t for t in tasks if t.split != "val"]
    spec = build_tokenizer(tokenizer, train_tasks, opts, eot, log)
    dtype = dtype_for_vocab(spec.vocab_size)
    results = run_local(tasks, opts, spec, dtype, workers or local_cores())
    source = {"kind": "prepare", "inputs": [str(p) for p in train_paths], "val_inputs": [str(p) for p in val_paths],
              "val_fraction": None if val_paths else val_fraction, "seed": seed, "text_column": text_column,
              "txt_split": txt_split}
    return write_token_files(out, results, spec, dtype, source, Progress(len(tasks), enabled=progress), log)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raypipe.prepare",
                                 description="Tokenize text files into raypipe's train.bin / val.bin / meta.json.")
    ap.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt, .jsonl or .parquet files, globs or directories")
    ap.add_argument("--out", required=True, help="output directory (must not exist); with --ray also a URI "
                    "(an empty prefix)")
    ap.add_argument("--tokenizer", required=True, help=SPEC_HELP)
    ap.add_argument("--text-column", default="text", help="jsonl key / parquet column of the text (default: text)")
    val = ap.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for val (default: 0.01)")
    val.add_argument("--val", nargs="+", metavar="INPUT", help="val from these inputs; all INPUTs are train")
    ap.add_argument("--txt-split", choices=TXT_SPLITS, default="blank",
                    help="what ends a .txt document: a blank line (default), every line, or a <|endoftext|> line")
    ap.add_argument("--seed", type=int, default=0, help="key of the train/val hash (default: 0)")
    ap.add_argument("--eot", default=EOT, help=f"end-of-text token of a tokenizer.json (default: {EOT})")
    ap.add_argument("--workers", type=int, default=None,
                    help="tokenizing processes, with --ray actors (default: all cores; with --ray: the cluster's CPUs)")
    ap.add_argument("--ray", action="store_true", help="a Ray Data pipeline (RAY_ADDRESS or a local Ray): INPUTs "
                    "and --out may be URIs (s3://, gs://, file://), the output is sharded")
    ap.add_argument("--shard-docs", type=int, default=16_384, help="with --ray: documents per batch, so per shard")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    a = ap.parse_args(argv)
    try:
        prepare(a.inputs, a.out, a.tokenizer, val_fraction=a.val_fraction, val_inputs=a.val,
                text_column=a.text_column, txt_split=a.txt_split, seed=a.seed, eot=a.eot, workers=a.workers,
                use_ray=a.ray, shard_docs=a.shard_docs, progress=not a.quiet)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
