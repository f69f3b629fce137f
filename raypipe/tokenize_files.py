"""Tokenizing the planned tasks and writing the token files, for `python -m raypipe.prepare`.

A task (raypipe.documents) is read, split and tokenized by `tokenize_task`, in this process or in a
pool of local processes (`run_local`) that hand their tokens back through shared memory; the CLI adds
a Ray Data executor with the same contract. Output is streamed: each chunk of ~1 MB of input is
tokenized by a worker and written as soon as it and all chunks before it are done, so memory stays flat
however large the corpus. Documents longer than tokenizer.PIECE_CHARS are encoded in pieces cut at
whitespace (no end-of-text between them), so one huge line does not take gigabytes in the tokenizer.
The output directory appears at once at the end (written in a temporary sibling, renamed); the
temporary of a killed prepare is removed by the next prepare of the same --out.
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from .datafiles import TOKEN_DTYPES, DatasetWriter
from . import documents
from .documents import Options, PrepareError, Task, read_documents, take_documents, val_mask
from .tokenizer import (EOT, TokenizerSpec, byte_spec, encode_utf8, encode_with_lengths, file_spec, gpt2_spec, hf_spec,
                        parse_spec, split_document, train_bpe)


@dataclass
class Result:
    train: np.ndarray
    val: np.ndarray
    docs_train: int
    docs_val: int
    nbytes: int
    empty: int
    bad_bytes: int
    first_bad: str


def tokenize_task(task: Task, opts: Options, spec: TokenizerSpec, dtype: str) -> Result:
    d = read_documents(task, opts)
    is_val = val_mask(d, task, opts)
    if spec.kind == "byte":  # straight from the UTF-8 bytes, no str per document
        tokens, lengths = encode_utf8(d.data, d.offsets, spec.eot_id, TOKEN_DTYPES[dtype]), np.diff(d.offsets) + 1
    else:
        tokens, lengths = encode_with_lengths(spec, d.strings(), TOKEN_DTYPES[dtype])
    n_val = int(is_val.sum())
    return Result(take_documents(tokens, lengths, ~is_val), take_documents(tokens, lengths, is_val), len(d) - n_val, n_val,
                  d.nbytes, d.empty, d.bad_bytes, d.first_bad)


# --- running the tasks: in-process or a process pool (the CLI adds Ray Data) ---------------------------

_WORKER: tuple = ()  # (opts, spec, dtype, shared memory or None, tokens per slot), set in each worker


def _init_worker(*args) -> None:
    global _WORKER
    _WORKER = args


def _slot(shared, dtype: str, size: int, index: int) -> np.ndarray:
    return np.frombuffer(shared, TOKEN_DTYPES[dtype], size, index * size * np.dtype(TOKEN_DTYPES[dtype]).itemsize)


def _work(task: Task, slot: int) -> Result:
    """Tokenize in a worker. The tokens go back through the task's slot of shared memory when they fit
    (pickling them through the pool's pipe cost more CPU than the byte tokenizer itself); only counts
    travel in the Result then."""
    opts, spec, dtype, shared, size = _WORKER
    r = tokenize_task(task, opts, spec, dtype)
    n = r.train.size
    if shared is not None and n + r.val.size <= size:
        out = _slot(shared, dtype, size, slot)
        out[:n], out[n:n + r.val.size] = r.train, r.val
        r.train, r.val = n, r.val.size
    return r


@contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def local_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one): the default worker count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_local(tasks: Iterable[Task], opts: Options, spec: TokenizerSpec, dtype: str, workers: int) -> Iterator[Result]:
    """Results in task order. At most 2 tasks per worker are in flight, so memory does not grow with
    the corpus (Pool.imap would read ahead without bound). A result's arrays may be views of shared
    memory: use them before asking for the next result."""
    if workers <= 1:
        for task in tasks:
            yield tokenize_task(task, opts, spec, dtype)
        return
    # fork: workers inherit the imports, the spec and the shared memory. One tokenizer thread per
    # worker process: the processes already fill the cores.
    fork = "fork" in mp.get_all_start_methods()
    # A chunk of n bytes rarely makes more than n tokens (read at call time: a test sets smaller chunks).
    in_flight, size = 2 * workers, 2 * documents.CHUNK_BYTES
    # Task i's tokens come back in slot i % in_flight: results are taken in order, so a slot is read
    # (written to the .bin) before the task that reuses it is submitted. An anonymous shared mapping
    # made before the fork is the same memory in every worker.
    shared = mmap.mmap(-1, in_flight * size * np.dtype(TOKEN_DTYPES[dtype]).itemsize) if fork else None
    ctx = mp.get_context("fork" if fork else None)
    with _env(TOKENIZERS_PARALLELISM="false"):
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(opts, spec, dtype, shared, size))

    def take(pending: deque) -> Result:
        slot, job = pending.popleft()
        r = job.get()
        if isinstance(r.train, int):  # in shared memory: views, used before the slot is reused
            out = _slot(shared, dtype, size, slot)
            r.train, r.val = out[:r.train], out[r.train:r.train + r.val]
        return r

    with pool:
        pending: deque = deque()
        for i, task in enumerate(tasks):
            pending.append((i % in_flight, pool.apply_async(_work, (task, i % in_flight))))
            if len(pending) >= in_flight:
                yield take(pending)
        while pending:
            yield take(pending)


# --- progress -----------------------------------------------------------------------------------------


class Progress:
    """One status line: documents, tokens, MB read and MB/s; redrawn on a terminal, else every 10 s."""

    def __init__(self, total_tasks: int, stream=sys.stderr, enabled: bool = True):
        self.total, self.stream, self.enabled = total_tasks, stream, enabled
        self.tty = enabled and stream.isatty()
        self.tasks = self.docs = self.tokens = self.nbytes = 0
        self.start = self.last = time.perf_counter()

    def update(self, r: Result) -> None:
        self.count(r.docs_train + r.docs_val, r.train.size + r.val.size, r.nbytes)

    def count(self, docs: int, tokens: int, nbytes: int) -> None:
        """One more finished piece of work; redraws the line at most 5 times a second (every 10 s to a file)."""
        self.tasks += 1
        self.docs += docs
        self.tokens += tokens
        self.nbytes += nbytes
        now = time.perf_counter()
        if self.enabled and now - self.last >= (0.2 if self.tty else 10):
            self.last = now
            self._draw(now)

    def line(self, now: Optional[float] = None) -> str:
        secs = max((now or time.perf_counter()) - self.start, 1e-9)
        return (f"[prepare] {self.tasks}/{self.total} chunks  {self.docs:,} docs  {self.tokens:,} tokens  "
                f"{self.nbytes / 1e6:,.1f} MB  {self.nbytes / 1e6 / secs:,.1f} MB/s  "
                f"{self.tokens / secs:,.0f} tokens/s")

    def _draw(self, now: float) -> None:
        self.stream.write(("\r" if self.tty else "") + self.line(now) + ("" if self.tty else "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            if self.tty:
                self.stream.write("\n")


# --- the tokenizer and the writer -----------------------------------------------------------------------


def build_tokenizer(tokenizer: str, train_tasks: list[Task], opts: Options, eot: str = EOT,
                    log=print) -> TokenizerSpec:
    kind, arg = parse_spec(tokenizer)
    if kind == "byte":
        return byte_spec()
    if kind == "gpt2":
        return gpt2_spec()
    if kind == "file":
        return file_spec(arg, eot)

    def train_docs() -> Iterator[list[str]]:  # streamed: the trainer keeps word counts, not the text
        for task in train_tasks:
            d = read_documents(task, opts)
            # Long documents in pieces, as they are encoded: the trainer's memory grows with its longest input.
            docs = [piece for t, v in zip(d.strings(), val_mask(d, task, opts)) if not v for piece in split_document(t)]
            if docs:
                yield docs

    start = time.perf_counter()
    spec = hf_spec(train_bpe(train_docs(), arg), "bpe")
    log(f"[prepare] trained a byte-level BPE, vocab {spec.vocab_size}, in {time.perf_counter() - start:.1f} s")
    return spec


def write_token_files(out: Path, results: Iterable[Result], spec: TokenizerSpec, dtype: str, source: dict,
                      bar: Progress, log=print) -> dict:
    """Write `results` (in task order) into `out` as they come; return the meta. `source` describes the inputs
    and options for meta.json (its counts are added here); an empty split fails before anything appears."""
    inputs = ", ".join(source["inputs"] + source["val_inputs"])
    docs = {"train": 0, "val": 0}
    empty = bad = 0
    first_bad = ""
    with DatasetWriter(out, spec.vocab_size, dtype, log=log) as writer:
        for r in results:
            writer.write("train", r.train)
            writer.write("val", r.val)
            docs["train"] += r.docs_train
            docs["val"] += r.docs_val
            empty, bad, first_bad = empty + r.empty, bad + r.bad_bytes, first_bad or r.first_bad
            bar.update(r)
        bar.close()
        total = docs["train"] + docs["val"]
        if total == 0:
            raise PrepareError(f"no documents in {inputs}: every document is empty ({empty} empty records)")
        for split in ("train", "val"):
            if docs[split] == 0:
                how = ("the --val inputs hold no documents" if split == "val" and source["val_inputs"] else
                       f"none of the {total} documents fell in it (--val-fraction {source['val_fraction']}); "
                       "raise --val-fraction or pass --val FILES")
                raise PrepareError(f"the {split} split is empty: {how}")
        source = {**source, "empty_documents": empty, "invalid_utf8_bytes": bad, "first_invalid_utf8": first_bad or None}
        meta = {"vocab_size": spec.vocab_size, "dtype": dtype, "eot_id": spec.eot_id, "source": source,
                "documents": docs, "tokenizer": spec.meta()}
        meta = writer.commit(meta, {"tokenizer.json": spec.json} if spec.json else None)
    log(f"[prepare] {out}: {docs['train']:,} train / {docs['val']:,} val documents, "
        f"{meta['tokens']['train']:,} / {meta['tokens']['val']:,} tokens, vocab {spec.vocab_size} ({dtype})"
        + (f"; {empty:,} empty documents skipped" if empty else "")
        + (f"; {bad:,} invalid UTF-8 bytes or lone surrogates replaced by U+FFFD (first: {first_bad})" if bad else ""))
    return meta
