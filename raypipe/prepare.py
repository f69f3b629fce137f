"""`python -m raypipe.prepare`: text files -> train.bin / val.bin / meta.json (+ tokenizer.json).

    python -m raypipe.prepare INPUT... --out DIR --tokenizer {gpt2,bpe:VOCAB,byte,PATH/tokenizer.json}
        [--text-column text] [--val-fraction F | --val INPUT...] [--txt-split {blank,line,eot}]
        [--workers N] [--ray]

Inputs are files, globs or directories of `.txt`, `.jsonl` and `.parquet`; what a document is in each,
how bytes that are not UTF-8 are handled and how the train/val split is made: raypipe/documents.py.
Every non-empty document is followed by the end-of-text token. Tokenizing (local processes, or Ray
Data with --ray) and the streamed, atomic writing of the output: raypipe/tokenize_files.py. This
module is the CLI, `prepare()` that ties the pieces together, and the Ray Data executor.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .datafiles import TOKEN_DTYPES, dtype_for_vocab, remove_stale_temporaries
from .documents import TXT_SPLITS, Options, PrepareError, Task, check_input, expand_inputs, plan_tasks
from .errors import UserError
from .tokenize_files import Progress, Result, build_tokenizer, run_local, tokenize_task, write_token_files
from .tokenizer import EOT, SPEC_HELP, TokenizerSpec, parse_spec


def _ray_row(row: dict, opts: Options, spec: TokenizerSpec, dtype: str) -> dict:
    r = tokenize_task(Task(**row), opts, spec, dtype)
    return {**vars(r), "train": r.train.tobytes(), "val": r.val.tobytes()}


def run_ray(tasks: list[Task], opts: Options, spec: TokenizerSpec, dtype: str) -> Iterator[Result]:
    """The same tasks as a Ray Data pipeline (from_items -> map), results streamed back in order.

    Joins the cluster in RAY_ADDRESS or an already initialized Ray, else starts a local one. On a
    cluster the inputs must be at the same path on every node (shared storage).
    """
    from functools import partial

    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ordered, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        ds = ray.data.from_items([asdict(t) for t in tasks], override_num_blocks=max(1, len(tasks)))
        for row in ds.map(partial(_ray_row, opts=opts, spec=spec, dtype=dtype)).iter_rows():
            yield Result(**{**row, "train": np.frombuffer(row["train"], TOKEN_DTYPES[dtype]),
                            "val": np.frombuffer(row["val"], TOKEN_DTYPES[dtype])})
    finally:
        ctx.execution_options.preserve_order = ordered
        if started:
            ray.shutdown()


def prepare(inputs: list[str], out: str | Path, tokenizer: str = "byte", *, val_fraction: float = 0.01,
            val_inputs: Optional[list[str]] = None, text_column: str = "text", txt_split: str = "blank",
            seed: int = 0, eot: str = EOT, workers: Optional[int] = None, use_ray: bool = False,
            progress: bool = True, log=print) -> dict:
    """Tokenize `inputs` into `out` (train.bin, val.bin, meta.json, tokenizer.json); return the meta."""
    out = Path(out)
    parse_spec(tokenizer)  # an unknown spec fails before any reading
    if txt_split not in TXT_SPLITS:
        raise PrepareError(f"--txt-split {txt_split!r}: expected one of {', '.join(TXT_SPLITS)}")
    if not val_inputs and not 0 < val_fraction < 1:
        raise PrepareError(f"--val-fraction {val_fraction}: expected a number between 0 and 1 (exclusive)")
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
    if not workers:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    results = run_ray(tasks, opts, spec, dtype) if use_ray else run_local(tasks, opts, spec, dtype, workers)
    source = {"kind": "prepare", "inputs": [str(p) for p in train_paths], "val_inputs": [str(p) for p in val_paths],
              "val_fraction": None if val_paths else val_fraction, "seed": seed, "text_column": text_column,
              "txt_split": txt_split}
    return write_token_files(out, results, spec, dtype, source, Progress(len(tasks), enabled=progress), log)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raypipe.prepare",
                                 description="Tokenize text files into raypipe's train.bin / val.bin / meta.json.")
    ap.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt, .jsonl or .parquet files, globs or directories")
    ap.add_argument("--out", required=True, help="output directory (must not exist)")
    ap.add_argument("--tokenizer", required=True, help=SPEC_HELP)
    ap.add_argument("--text-column", default="text", help="jsonl key / parquet column of the text (default: text)")
    val = ap.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for val (default: 0.01)")
    val.add_argument("--val", nargs="+", metavar="INPUT", help="val from these inputs; all INPUTs are train")
    ap.add_argument("--txt-split", choices=TXT_SPLITS, default="blank",
                    help="what ends a .txt document: a blank line (default), every line, or a <|endoftext|> line")
    ap.add_argument("--seed", type=int, default=0, help="key of the train/val hash (default: 0)")
    ap.add_argument("--eot", default=EOT, help=f"end-of-text token of a tokenizer.json (default: {EOT})")
    ap.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: all cores)")
    ap.add_argument("--ray", action="store_true", help="run as a Ray Data pipeline (RAY_ADDRESS or a local Ray)")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    a = ap.parse_args(argv)
    try:
        prepare(a.inputs, a.out, a.tokenizer, val_fraction=a.val_fraction, val_inputs=a.val,
                text_column=a.text_column, txt_split=a.txt_split, seed=a.seed, eot=a.eot, workers=a.workers,
                use_ray=a.ray, progress=not a.quiet)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
