"""`python -m raypipe.prepare`: text files -> train.bin / val.bin / meta.json (+ tokenizer.json).

    python -m raypipe.prepare INPUT... --out DIR --tokenizer {gpt2,bpe:VOCAB,byte,PATH/tokenizer.json}
        [--text-column text] [--val-fraction F | --val INPUT...] [--txt-split {blank,line,eot}]
        [--workers N] [--ray]

Inputs are files, globs or directories of `.txt`, `.jsonl` and `.parquet`. Documents:
- `.txt`: with `--txt-split blank` (the default) a document ends at a blank line (one or more empty
  or whitespace-only lines); `line`: every line is a document; `eot`: a line holding only
  `<|endoftext|>` ends one (TinyStories' .txt release). Documents are stripped of surrounding
  whitespace, and whitespace-only ones are dropped.
- `.jsonl`: one JSON object per line, the document in `--text-column` (blank lines are skipped).
- `.parquet`: the string column `--text-column` (TinyStories on Hugging Face: `text`).
An empty document (an empty string or a null) contributes nothing, not even an end-of-text token;
it is counted and reported. Every other document is followed by the end-of-text token.

Bytes that are not UTF-8 are replaced by U+FFFD, counted, and reported (the count and the first
file and byte offset go to meta.json's `source`); a corpus is seldom worth failing for one bad byte,
but a silent change is never made. A lone surrogate in a `.jsonl` string (an escape such as `\ud800`
without its pair: valid JSON, but no UTF-8 text) is treated the same way: each becomes U+FFFD and is
counted with the invalid bytes, whatever the tokenizer.

The split is by document and reproducible: a document goes to val when a keyed hash of its text
falls in the first `--val-fraction` of the hash range, so it does not depend on worker count or
chunking, and duplicates of a document all land on the same side. `--val INPUT...` takes val from
its own files instead. Output is streamed: each chunk of ~1 MB of input is tokenized by a worker
and written as soon as it and all chunks before it are done, so memory stays flat however large the
corpus. Documents longer than tokenizer.PIECE_CHARS are encoded in pieces cut at whitespace (no
end-of-text between them), so one huge line does not take gigabytes in the tokenizer. The output
directory appears at once at the end (written in a temporary sibling, renamed); the temporary of a
killed prepare is removed by the next prepare of the same --out.
"""

from __future__ import annotations

import argparse
import codecs
import glob
import hashlib
import json
import mmap
import multiprocessing as mp
import os
import re
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from .datafiles import TOKEN_DTYPES, DataError, DatasetWriter, dtype_for_vocab, remove_stale_temporaries
from .errors import UserError
from .tokenizer import (EOT, SPEC_HELP, TokenizerError, TokenizerSpec, byte_spec, encode_utf8, encode_with_lengths,
                        file_spec, gpt2_spec, hf_spec, parse_spec, split_document, train_bpe)

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
TXT_SPLITS = ("blank", "line", "eot")
CHUNK_BYTES = 1 << 20  # one task: big enough to amortize a round trip, small enough that the last
# chunks do not leave a core idle for long

# What ends a document (txt) or a record (jsonl) in bytes, to cut files into chunks of whole
# documents, and in text, to split a chunk into documents.
_BYTE_SEPARATORS = {"blank": re.compile(rb"\n[ \t\r\f\v]*\n"), "line": re.compile(rb"\n"),
                    "eot": re.compile(rb"\n[ \t\r]*<\|endoftext\|>[ \t\r]*\n"), "jsonl": re.compile(rb"\n")}
_TEXT_SEPARATORS = {"blank": re.compile(r"\n[ \t\r\f\v]*\n"), "line": re.compile(r"\n"),
                    "eot": re.compile(r"(?m)^[ \t\r]*<\|endoftext\|>[ \t\r]*$")}


class PrepareError(UserError):
    """Bad inputs or options; the message names the file or flag and what is expected."""


@dataclass(frozen=True)
class Options:
    text_column: str = "text"
    txt_split: str = "blank"
    val_fraction: float = 0.01
    seed: int = 0


@dataclass(frozen=True)
class Task:
    """A piece of one input: bytes [start, end) of a txt/jsonl file, or row group `start` of a parquet."""
    path: str
    fmt: str
    start: int
    end: int
    split: Optional[str] = None  # "val" for --val inputs, "train" for the others then; None: by hash


# --- inputs -------------------------------------------------------------------------------------------


def expand_inputs(patterns: Iterable[str], flag: str = "INPUT") -> list[Path]:
    """Files, globs and directories (recursively) -> the input files, in a stable order."""
    files: list[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in FORMATS)
            if not found:
                raise PrepareError(f"{flag} {pattern}: directory holds no {', '.join(FORMATS)} files")
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(f) for f in glob.glob(pattern, recursive=True) if Path(f).is_file())
            if not found:
                raise PrepareError(f"{flag} {pattern}: no such file, directory or matching glob")
        for f in found:
            if f.suffix not in FORMATS:
                raise PrepareError(f"{f}: unsupported input type {f.suffix or '(no suffix)'!r}; "
                                   f"expected one of {', '.join(FORMATS)}")
        files += found
    return files


def check_input(path: Path, opts: Options) -> None:
    """Cheap checks before any long work: the text column exists (parquet schema, first jsonl record)."""
    fmt = FORMATS[path.suffix]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as e:
            raise PrepareError(f"{path}: not a readable parquet file ({e})") from None
        if opts.text_column not in schema.names:
            raise PrepareError(f"{path}: no column {opts.text_column!r} (--text-column); "
                               f"its columns are {', '.join(schema.names)}")
        typ = schema.field(opts.text_column).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            raise PrepareError(f"{path}: column {opts.text_column!r} is {typ}, expected a string column")
    elif fmt == "jsonl":
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    _json_text(line.decode("utf-8", "replace"), opts.text_column, path, f"line {number}")
                    break


def plan_tasks(paths: list[Path], opts: Options, split: Optional[str] = None) -> Iterator[Task]:
    """Cut each file into tasks of whole documents; reads only a few KB around each cut."""
    for path in paths:
        fmt = FORMATS[path.suffix]
        if fmt == "parquet":
            import pyarrow.parquet as pq

            for group in range(pq.ParquetFile(path).num_row_groups):
                yield Task(str(path.resolve()), fmt, group, -1, split)
            continue
        sep = _BYTE_SEPARATORS["jsonl" if fmt == "jsonl" else opts.txt_split]
        size, start = path.stat().st_size, 0
        with open(path, "rb") as f:
            while start < size:
                end = _next_cut(f, start + CHUNK_BYTES, size, sep)
                yield Task(str(path.resolve()), fmt, start, end, split)
                start = end


def _next_cut(f, pos: int, size: int, sep: re.Pattern, window: int = 1 << 16) -> int:
    """The first offset >= pos just after a separator, or the end of the file."""
    while pos < size:
        f.seek(pos)
        buf = f.read(window)
        m = sep.search(buf)
        if m:
            return pos + m.end()
        if len(buf) < window:
            break
        pos += window - 256  # overlap: a separator may straddle two windows
    return size


# --- documents ----------------------------------------------------------------------------------------


class _BadBytes:
    """Counts bytes that are not UTF-8 while they are replaced by U+FFFD (a codecs error handler)."""
    count = 0

    @classmethod
    def handler(cls, err: UnicodeDecodeError):
        cls.count += err.end - err.start
        return "\ufffd", err.end


codecs.register_error("raypipe-count-replace", _BadBytes.handler)


def _decode(data: bytes) -> tuple[str, int, int]:
    """Text, number of invalid bytes replaced, offset of the first (-1 if none)."""
    try:
        return data.decode("utf-8"), 0, -1
    except UnicodeDecodeError as e:
        first = e.start
    _BadBytes.count = 0
    text = data.decode("utf-8", "raypipe-count-replace")
    return text, _BadBytes.count, first


def _json_text(line: str, column: str, path, where: str, obj=None) -> Optional[str]:
    """The text of one jsonl record (None for a null), or an error naming the file and the record."""
    if obj is None:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrepareError(f"{path}: {where} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise PrepareError(f"{path}: {where} is a JSON {type(obj).__name__}, expected an object "
                           f"with a {column!r} key")
    if column not in obj:
        raise PrepareError(f"{path}: {where} has no key {column!r} (--text-column); its keys are "
                           f"{', '.join(obj) or '(none)'}")
    text = obj[column]
    if text is not None and not isinstance(text, str):
        raise PrepareError(f"{path}: {where}: {column!r} is a {type(text).__name__}, expected a string")
    return text


@dataclass
class Documents:
    """The non-empty documents of one task, in file order: their UTF-8 bytes back to back and their bounds."""
    data: np.ndarray  # uint8
    offsets: np.ndarray  # int64, one more than documents: document i is data[offsets[i]:offsets[i + 1]]
    texts: object  # the same documents as a list of str, or the pyarrow array they came from (with empties)
    nbytes: int = 0  # input bytes
    empty: int = 0  # empty documents dropped
    bad_bytes: int = 0  # invalid UTF-8 bytes and lone surrogates replaced
    first_bad: str = ""  # "file at byte N", or "file: a lone surrogate in the record at byte N"

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def strings(self) -> list[str]:
        return self.texts if isinstance(self.texts, list) else [t for t in self.texts.to_pylist() if t]


def _from_strings(texts: list[str], **counts) -> Documents:
    """Raises UnicodeEncodeError for a lone surrogate (see _replace_surrogates)."""
    parts = [t.encode("utf-8") for t in texts]
    offsets = np.cumsum([0] + [len(p) for p in parts], dtype=np.int64)
    return Documents(np.frombuffer(b"".join(parts), np.uint8), offsets, texts, **counts)


def _from_arrow(arr, **counts) -> Documents:
    """From a pyarrow string array, without copying its text; nulls and empty strings are dropped (counted)."""
    import pyarrow as pa

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()
    n, first = len(arr), arr.offset
    offsets = np.frombuffer(arr.buffers()[1], np.int64 if pa.types.is_large_string(arr.type) else np.int32)
    offsets = offsets[first:first + n + 1].astype(np.int64)
    data = np.frombuffer(arr.buffers()[2], np.uint8) if arr.buffers()[2] else np.zeros(0, np.uint8)
    keep = np.diff(offsets) > 0
    if arr.null_count:  # the validity bitmap, least significant bit first
        keep &= np.unpackbits(np.frombuffer(arr.buffers()[0], np.uint8), bitorder="little")[first:first + n].astype(bool)
    if not keep.all():
        lengths = np.diff(offsets)
        data = _take(data[offsets[0]:offsets[-1]], lengths, keep)
        offsets = np.concatenate([[0], np.cumsum(lengths[keep])])
        counts["empty"] = counts.get("empty", 0) + n - int(keep.sum())
    return Documents(data, offsets, arr, **counts)


_SURROGATE = re.compile(r"[\ud800-\udfff]")  # json.loads joins a pair of escapes, so any left is lone


def _replace_surrogates(docs: list[str], doc_lines: list[int], text: str, task: Task, counts: dict, first: int) -> None:
    """Lone surrogates (valid JSON escapes such as "\\ud800", but no UTF-8 text) -> U+FFFD in `docs`,
    counted with the invalid bytes. The first is reported by its record (doc_lines[i]: the non-blank line of
    `text` that docs[i] came from) unless an invalid byte of the chunk (at `first`; -1 if none) comes before."""
    replaced, first_doc = 0, -1
    for i, doc in enumerate(docs):
        fixed, n = _SURROGATE.subn("\ufffd", doc)
        if n:
            docs[i], replaced = fixed, replaced + n
            first_doc = i if first_doc < 0 else first_doc
    if not replaced:
        return
    pos = nth = 0
    for line in text.split("\n"):  # as read_documents cuts lines
        if line.strip():
            if nth == doc_lines[first_doc]:
                break
            nth += 1
        pos += len(line) + 1
    where = len(text[:pos].encode("utf-8"))  # exact unless an invalid byte (then reported) comes before
    if first < 0 or where < first:
        counts["first_bad"] = f"{task.path}: a lone surrogate in the record at byte {task.start + where}"
    counts["bad_bytes"] += replaced


_BLANK_LINE = re.compile(rb"\n[ \t\r]*\n")  # a "^" alternative would make the search 30x slower


def _jsonl_column(data: bytes, column: str):
    """The text column of a jsonl chunk through pyarrow's C++ JSON reader (about twice json.loads' speed,
    and it keeps the text as UTF-8 bytes), or None for any chunk the record-by-record path must judge:
    invalid UTF-8, a blank line, a line that is not one object with a string under `column`, a null."""
    import pyarrow as pa
    import pyarrow.json as pj

    try:
        data.decode("utf-8")  # pyarrow would not replace and count invalid bytes
    except UnicodeDecodeError:
        return None
    if _BLANK_LINE.search(data) or re.match(rb"[ \t\r]*\n", data):
        return None
    try:
        table = pj.read_json(pa.BufferReader(data), read_options=pj.ReadOptions(use_threads=False, block_size=len(data) + 1),
                             parse_options=pj.ParseOptions(explicit_schema=pa.schema([(column, pa.string())]),
                                                           unexpected_field_behavior="ignore"))
    except (pa.ArrowException, ValueError):
        return None
    col = table.column(0)
    lines = data.count(b"\n") + (not data.endswith(b"\n"))
    if table.num_rows != lines or col.null_count:  # two values on a line; a missing key or a null
        return None
    return col


def read_documents(task: Task, opts: Options) -> Documents:
    """The documents of one task, in file order (see the module docstring for the rules)."""
    if task.fmt == "parquet":
        import pyarrow.parquet as pq

        d = _from_arrow(pq.ParquetFile(task.path).read_row_group(task.start, columns=[opts.text_column]).column(0))
        d.nbytes = int(d.offsets[-1] - d.offsets[0])  # the text's bytes
        return d
    with open(task.path, "rb") as f:
        f.seek(task.start)
        data = f.read(task.end - task.start)
    if task.fmt == "jsonl" and (col := _jsonl_column(data, opts.text_column)) is not None:
        return _from_arrow(col, nbytes=len(data))
    text, bad, first = _decode(data)
    counts = {"nbytes": len(data), "bad_bytes": bad, "first_bad": f"{task.path} at byte {task.start + first}" if bad else ""}
    if task.fmt == "txt":
        return _from_strings([d for d in (p.strip() for p in _TEXT_SEPARATORS[opts.txt_split].split(text)) if d], **counts)
    lines = [line for line in text.split("\n") if line.strip()]
    try:  # one parse of the whole chunk: far fewer Python calls than json.loads per line
        records = json.loads("[" + ",".join(lines) + "]")
        if len(records) != len(lines):
            raise ValueError("a line holds more than one value")
    except ValueError:
        records = None  # parse line by line below, to name the bad record
    docs, doc_lines, empty = [], [], 0
    for i, line in enumerate(lines):
        obj = records[i] if records is not None else None
        if not (isinstance(obj, dict) and isinstance(obj.get(opts.text_column), str)):
            # Only here (a null, or an error to report) is the record's byte offset worth computing.
            where = f"the record at byte {task.start + len(text[:text.index(line)].encode('utf-8'))}"
            doc = _json_text(line, opts.text_column, task.path, where, obj)
        else:
            doc = obj[opts.text_column]
        if doc:
            docs.append(doc)
            doc_lines.append(i)
        else:
            empty += 1
    try:
        return _from_strings(docs, empty=empty, **counts)
    except UnicodeEncodeError:  # a lone surrogate: replaced and counted like an invalid byte
        _replace_surrogates(docs, doc_lines, text, task, counts, first)
        return _from_strings(docs, empty=empty, **counts)


def val_mask(docs: Documents, task: Task, opts: Options) -> np.ndarray:
    """Which documents go to val: all or none for --val inputs and the others then, else by a keyed hash
    of each document's UTF-8 bytes."""
    if task.split is not None:
        return np.full(len(docs), task.split == "val")
    keyed = hashlib.blake2b(digest_size=8, key=opts.seed.to_bytes(8, "little"))  # copied: the key is hashed once
    view, bounds, digests = memoryview(docs.data), docs.offsets.tolist(), []
    for a, b in pairwise(bounds):
        h = keyed.copy()
        h.update(view[a:b])
        digests.append(h.digest())
    return np.frombuffer(b"".join(digests), "<u8") < np.uint64(int(opts.val_fraction * 2**64))


def _take(tokens: np.ndarray, lengths: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The tokens of the documents where `keep`, in order: one slice per run of kept documents."""
    if keep.all():
        return tokens
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    edges = np.flatnonzero(np.diff(np.concatenate([[False], keep, [False]])))  # run starts and ends, alternating
    return np.concatenate([tokens[bounds[a]:bounds[b]] for a, b in zip(edges[::2], edges[1::2])] or [tokens[:0]])


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
    return Result(_take(tokens, lengths, ~is_val), _take(tokens, lengths, is_val), len(d) - n_val, n_val,
                  d.nbytes, d.empty, d.bad_bytes, d.first_bad)


# --- running the tasks: in-process, a process pool, or Ray Data ---------------------------------------

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
    in_flight, size = 2 * workers, 2 * CHUNK_BYTES  # a chunk of n bytes rarely makes more than n tokens
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


# --- progress -----------------------------------------------------------------------------------------


class Progress:
    """One status line: documents, tokens, MB read and MB/s; redrawn on a terminal, else every 10 s."""

    def __init__(self, total_tasks: int, stream=sys.stderr, enabled: bool = True):
        self.total, self.stream, self.enabled = total_tasks, stream, enabled
        self.tty = enabled and stream.isatty()
        self.tasks = self.docs = self.tokens = self.nbytes = 0
        self.start = self.last = time.perf_counter()

    def update(self, r: Result) -> None:
        self.tasks += 1
        self.docs += r.docs_train + r.docs_val
        self.tokens += r.train.size + r.val.size
        self.nbytes += r.nbytes
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


# --- the whole preparation ----------------------------------------------------------------------------


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
    bar = Progress(len(tasks), enabled=progress)
    docs = {"train": 0, "val": 0}
    empty = bad = 0
    first_bad = ""
    with DatasetWriter(out, spec.vocab_size, dtype, log=log) as writer:
        results = run_ray(tasks, opts, spec, dtype) if use_ray else run_local(tasks, opts, spec, dtype, workers)
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
            raise PrepareError(f"no documents in {', '.join(map(str, train_paths + val_paths))}: "
                               f"every document is empty ({empty} empty records)")
        for split in ("train", "val"):
            if docs[split] == 0:
                how = ("the --val inputs hold no documents" if split == "val" and val_paths else
                       f"none of the {total} documents fell in it (--val-fraction {val_fraction}); "
                       "raise --val-fraction or pass --val FILES")
                raise PrepareError(f"the {split} split is empty: {how}")
        source = {"kind": "prepare", "inputs": [str(p) for p in train_paths], "val_inputs": [str(p) for p in val_paths],
                  "val_fraction": None if val_paths else val_fraction, "seed": seed, "text_column": text_column,
                  "txt_split": txt_split, "empty_documents": empty, "invalid_utf8_bytes": bad,
                  "first_invalid_utf8": first_bad or None}
        meta = {"vocab_size": spec.vocab_size, "dtype": dtype, "eot_id": spec.eot_id, "source": source,
                "documents": docs, "tokenizer": spec.meta()}
        meta = writer.commit(meta, {"tokenizer.json": spec.json} if spec.json else None)
    log(f"[prepare] {out}: {docs['train']:,} train / {docs['val']:,} val documents, "
        f"{meta['tokens']['train']:,} / {meta['tokens']['val']:,} tokens, vocab {spec.vocab_size} ({dtype})"
        + (f"; {empty:,} empty documents skipped" if empty else "")
        + (f"; {bad:,} invalid UTF-8 bytes or lone surrogates replaced by U+FFFD (first: {first_bad})" if bad else ""))
    return meta


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
    except (PrepareError, TokenizerError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
