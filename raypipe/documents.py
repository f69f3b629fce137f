"""Documents: the input files of `python -m raypipe.prepare`, planned, read, decoded and split train/val.

Inputs are files, globs or directories of `.txt`, `.jsonl` and `.parquet`. Documents:
- `.txt`: with `--txt-split blank` (the default) a document ends at a blank line (one or more empty
  or whitespace-only lines); `line`: every line is a document; `eot`: a line holding only
  `<|endoftext|>` ends one (TinyStories' .txt release). Documents are stripped of surrounding
  whitespace, and whitespace-only ones are dropped.
- `.jsonl`: one JSON object per line, the document in `--text-column` (blank lines are skipped).
- `.parquet`: the string column `--text-column` (TinyStories on Hugging Face: `text`).
An empty document (an empty string or a null) contributes nothing, not even an end-of-text token;
it is counted and reported.

Planning cuts each file into tasks of whole documents (about CHUNK_BYTES of input, or one parquet row
group), reading only a few KB around each cut; a task is read on its own, in any process.

Bytes that are not UTF-8 are replaced by U+FFFD, counted, and reported (the count and the first
file and byte offset go to meta.json's `source`); a corpus is seldom worth failing for one bad byte,
but a silent change is never made. A lone surrogate in a `.jsonl` string (an escape such as `\\ud800`
without its pair: valid JSON, but no UTF-8 text) is treated the same way: each becomes U+FFFD and is
counted with the invalid bytes, whatever the tokenizer.

The split is by document and reproducible: a document goes to val when a keyed hash of its text
falls in the first `--val-fraction` of the hash range, so it does not depend on worker count or
chunking, and duplicates of a document all land on the same side. `--val INPUT...` takes val from
its own files instead.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import re
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from .errors import UserError

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


def check_split_options(txt_split: str, val_fraction: float, val_inputs) -> None:
    """--txt-split is known; --val-fraction is a fraction unless --val inputs make the split."""
    if txt_split not in TXT_SPLITS:
        raise PrepareError(f"--txt-split {txt_split!r}: expected one of {', '.join(TXT_SPLITS)}")
    if not val_inputs and not 0 < val_fraction < 1:
        raise PrepareError(f"--val-fraction {val_fraction}: expected a number between 0 and 1 (exclusive)")


def check_text_column(schema, name, opts: Options) -> None:
    """A parquet schema holds --text-column as strings, else a PrepareError naming the file."""
    import pyarrow as pa

    if opts.text_column not in schema.names:
        raise PrepareError(f"{name}: no column {opts.text_column!r} (--text-column); "
                           f"its columns are {', '.join(schema.names)}")
    typ = schema.field(opts.text_column).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise PrepareError(f"{name}: column {opts.text_column!r} is {typ}, expected a string column")


def check_input(path, opts: Options, fs=None, name=None) -> None:
    """Cheap checks before any long work: the text column exists (parquet schema, first jsonl record).
    `fs`: the pyarrow filesystem that holds `path` (None: the local one); `name`: the file in messages."""
    name = path if name is None else name
    fmt = FORMATS[Path(path).suffix]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path, filesystem=fs)
        except (OSError, pa.ArrowException) as e:
            raise PrepareError(f"{name}: not a readable parquet file ({e})") from None
        check_text_column(schema, name, opts)
    elif fmt == "jsonl":
        with open(path, "rb") if fs is None else fs.open_input_stream(path) as f:
            first = first_nonblank_line(f)
        if first is not None:
            number, line = first
            json_text(line.decode("utf-8", "replace"), opts.text_column, name, f"line {number}")


def first_nonblank_line(f) -> Optional[tuple[int, bytes]]:
    """(number, line with its newline) of the first non-blank line of a binary stream, read in chunks
    (pyarrow's streams have no readline); None if every line is blank."""
    head = b""
    while (chunk := f.read(1 << 16)) and not any(x.strip() for x in head.split(b"\n")[:-1]):
        head += chunk  # up to the end of the first non-blank line
    lines = head.split(b"\n")
    for number, line in enumerate(lines, 1):
        if line.strip():
            return number, line + (b"\n" if number < len(lines) else b"")
    return None


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


def json_text(line: str, column: str, path, where: str, obj=None) -> Optional[str]:
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


def from_arrow(arr, **counts) -> Documents:
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
        data = take_documents(data[offsets[0]:offsets[-1]], lengths, keep)
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


def txt_documents(data: bytes, txt_split: str, path: str, start: int = 0) -> Documents:
    """The documents of .txt bytes: a whole file, or the chunk of it that starts at byte `start`."""
    text, bad, first = _decode(data)
    return _from_strings([d for d in (p.strip() for p in _TEXT_SEPARATORS[txt_split].split(text)) if d],
                         nbytes=len(data), bad_bytes=bad, first_bad=f"{path} at byte {start + first}" if bad else "")


def read_documents(task: Task, opts: Options) -> Documents:
    """The documents of one task, in file order (see the module docstring for the rules)."""
    if task.fmt == "parquet":
        import pyarrow.parquet as pq

        d = from_arrow(pq.ParquetFile(task.path).read_row_group(task.start, columns=[opts.text_column]).column(0))
        d.nbytes = int(d.offsets[-1] - d.offsets[0])  # the text's bytes
        return d
    with open(task.path, "rb") as f:
        f.seek(task.start)
        data = f.read(task.end - task.start)
    if task.fmt == "txt":
        return txt_documents(data, opts.txt_split, task.path, task.start)
    if task.fmt == "jsonl" and (col := _jsonl_column(data, opts.text_column)) is not None:
        return from_arrow(col, nbytes=len(data))
    text, bad, first = _decode(data)
    counts = {"nbytes": len(data), "bad_bytes": bad, "first_bad": f"{task.path} at byte {task.start + first}" if bad else ""}
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
            doc = json_text(line, opts.text_column, task.path, where, obj)
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


def take_documents(tokens: np.ndarray, lengths: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The tokens of the documents where `keep`, in order: one slice per run of kept documents."""
    if keep.all():
        return tokens
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    edges = np.flatnonzero(np.diff(np.concatenate([[False], keep, [False]])))  # run starts and ends, alternating
    return np.concatenate([tokens[bounds[a]:bounds[b]] for a, b in zip(edges[::2], edges[1::2])] or [tokens[:0]])
