"""The token files' layout and their writer, with numpy alone: `python -m raypipe.prepare` writes data
without importing torch (1.2 s and 190 MB before its first byte); `raypipe.data` re-exports these.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Iterable, NamedTuple, Optional

import numpy as np

from .errors import UserError

SPLITS = ("train", "val")
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class DataError(UserError):
    """The data directory is missing, incomplete or does not fit the run; the message says how."""


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


# --- meta.json: every field the code reads, checked in one place before use ---------------------------

_MISSING = object()
_HEX = set("0123456789abcdef")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(where: str, key: str, value, expected: str) -> DataError:
    shown = json.dumps(value) if value is not _MISSING else ""
    found = "is missing" if value is _MISSING else f"is {shown if len(shown) <= 60 else shown[:56] + ' ...'}"
    return DataError(f"{where}: key '{key}' {found}; expected {expected}")


def check_meta(meta, where: str) -> dict:
    """`meta` (parsed meta.json) if it has the shape the code relies on, else a DataError naming `where`, the
    key and what is expected. Required: vocab_size, dtype, tokens.{train,val} and exactly one of
    sha256.{train,val} (single-file layout: train.bin, val.bin) or shards.{train,val} (sharded layout, see
    split_files); optional: eot_id, tokenizer.{kind,file,vocab_size}."""
    if not isinstance(meta, dict):
        kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(meta), "null")
        raise DataError(f"{where}: holds a JSON {kind}, expected an object with keys "
                        "vocab_size, dtype, tokens and sha256 (as `python -m raypipe.prepare` writes)")
    vocab = meta.get("vocab_size", _MISSING)
    if not (_is_int(vocab) and vocab > 0):
        raise _bad(where, "vocab_size", vocab, "a positive integer (the tokenizer's vocabulary size)")
    dtype = meta.get("dtype", _MISSING)
    if not (isinstance(dtype, str) and dtype in TOKEN_DTYPES):
        raise _bad(where, "dtype", dtype, f"one of {', '.join(TOKEN_DTYPES)}")
    if "sha256" in meta and "shards" in meta:
        raise DataError(f"{where}: holds both key 'sha256' (single-file layout) and key 'shards' (sharded layout); "
                        "expected exactly one of them")
    fields = [("tokens", "a token count (an integer >= 0)")]
    if "shards" not in meta:
        fields.append(("sha256", "a sha256 hex digest (64 characters 0-9a-f)"))
    for field, expected in fields:
        entries = meta.get(field, _MISSING)
        if not isinstance(entries, dict):
            other = " (or key 'shards' for a sharded directory)" if field == "sha256" else ""
            raise _bad(where, field, entries,
                       f"an object with one entry per split ({', '.join(SPLITS)}), each {expected}{other}")
        for split in SPLITS:
            value = entries.get(split, _MISSING)
            ok = (_is_int(value) and value >= 0) if field == "tokens" else _is_sha(value)
            if not ok:
                raise _bad(where, f"{field}.{split}", value, expected)
    if "shards" in meta:
        _check_shards(meta, where)
    eot = meta.get("eot_id")
    if eot is not None and not (_is_int(eot) and 0 <= eot < vocab):
        raise _bad(where, "eot_id", eot, f"null or a token id from 0 to vocab_size - 1 ({vocab - 1})")
    if "tokenizer" not in meta:
        return meta
    tok = meta["tokenizer"]
    if not isinstance(tok, dict):  # null too: readers take its fields with meta.get("tokenizer", {})
        raise _bad(where, "tokenizer", tok, 'an object such as {"kind": "bpe", "file": "tokenizer.json"}')
    if tok.get("kind") is not None and not isinstance(tok["kind"], str):
        raise _bad(where, "tokenizer.kind", tok["kind"], "a string (gpt2, bpe, byte or file)")
    file = tok.get("file")  # copied and opened beside meta.json: a plain file name, never a path
    if file is not None and not (isinstance(file, str) and file not in ("", ".", "..") and not set(file) & set("/\\")):
        raise _bad(where, "tokenizer.file", file, 'null or a file name beside meta.json, such as "tokenizer.json"')
    if tok.get("vocab_size") is not None and not (_is_int(tok["vocab_size"]) and tok["vocab_size"] > 0):
        raise _bad(where, "tokenizer.vocab_size", tok["vocab_size"], "a positive integer")
    return meta


def _is_sha(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _check_shards(meta: dict, where: str) -> None:
    """The sharded layout's `shards` (SHARDS rules: plain `{split}-NNNNN.bin` names, unique, tokens >= 1 summing
    to tokens[split], a sha256 each)."""
    shards = meta["shards"]
    if not isinstance(shards, dict):
        raise _bad(where, "shards", shards, f"an object with a list of shards per split ({', '.join(SPLITS)})")
    seen: set[str] = set()
    for split in SPLITS:
        entries = shards.get(split, _MISSING)
        if not (isinstance(entries, list) and entries):
            raise _bad(where, f"shards.{split}", entries,
                       'a non-empty list of {"file": ..., "tokens": ..., "sha256": ...} objects')
        for i, entry in enumerate(entries):
            key = f"shards.{split}[{i}]"
            if not isinstance(entry, dict):
                raise _bad(where, key, entry, 'an object {"file": ..., "tokens": ..., "sha256": ...}')
            file = entry.get("file", _MISSING)
            if not (isinstance(file, str) and re.fullmatch(rf"{split}-[0-9]{{5,}}\.bin", file)):
                raise _bad(where, f"{key}.file", file, f'a file name beside meta.json such as "{split}-{i:05d}.bin"')
            if file in seen:
                raise _bad(where, f"{key}.file", file, "a file name not listed before (each shard once)")
            seen.add(file)
            tokens = entry.get("tokens", _MISSING)
            if not (_is_int(tokens) and tokens >= 1):
                raise _bad(where, f"{key}.tokens", tokens, "a token count >= 1 (empty shards are not written)")
            if not _is_sha(entry.get("sha256", _MISSING)):
                raise _bad(where, f"{key}.sha256", entry.get("sha256", _MISSING), "a sha256 hex digest (64 characters 0-9a-f)")
        total = sum(e["tokens"] for e in entries)
        if total != meta["tokens"][split]:
            raise DataError(f"{where}: key 'shards.{split}' holds {total} tokens in all but key 'tokens.{split}' "
                            f"is {meta['tokens'][split]}; expected them equal")


class Shard(NamedTuple):
    """One token file of a split: its name beside meta.json, token count and sha256."""
    file: str
    tokens: int
    sha256: str


def split_files(meta: dict) -> dict[str, list[Shard]]:
    """The token files of each split, in order, for both layouts (meta checked by check_meta): the single-file
    layout is one shard per split, `{split}.bin`."""
    if "shards" in meta:
        return {split: [Shard(e["file"], e["tokens"], e["sha256"]) for e in meta["shards"][split]] for split in SPLITS}
    return {split: [Shard(f"{split}.bin", meta["tokens"][split], meta["sha256"][split])] for split in SPLITS}


def parse_meta(raw: bytes | str, where: str) -> dict:
    """meta.json's text -> its checked content (see check_meta)."""
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not valid JSON ({e}); expected the meta.json `python -m raypipe.prepare` writes") \
            from None
    return check_meta(meta, where)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_temporaries(out_dir: Path, log=print) -> None:
    """Remove the temporary siblings of `out_dir` left by writers that were killed (their process is gone).

    A temporary is named `.{name}.tmp-{host}-{pid}`, so its writer is known without opening it; one of
    another host, or of a process still running, is left alone (a pid reused since only keeps it longer).
    """
    host = socket.gethostname()
    for tmp in sorted(out_dir.parent.glob(f".{glob.escape(out_dir.name)}.tmp-*")):
        owner_host, _, pid = tmp.name[len(out_dir.name) + 6:].rpartition("-")
        if tmp.is_dir() and owner_host == host and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            log(f"[raypipe] removed {tmp}: an unfinished write of {out_dir} whose process ({pid}) is gone")


class DatasetWriter:
    """Streams chunks of token ids into `{split}.bin` as they come, then `commit` makes them appear at once.

    Everything goes to a sibling temporary directory that is renamed into place by `commit`, so an
    interrupted write never leaves a complete-looking directory (and one left by a killed writer is
    removed by the next writer of the same directory). Counts and sha256 are kept on the way, and every
    chunk is checked against the vocabulary before it is written.
    """

    def __init__(self, out_dir: str | Path, vocab_size: int, dtype: str, splits: Iterable[str] = SPLITS, log=print):
        self.out_dir, self.vocab_size, self.np_dtype = Path(out_dir), vocab_size, TOKEN_DTYPES[dtype]
        if self.out_dir.exists():
            raise DataError(f"{self.out_dir} already exists; remove it or choose another directory")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out_dir, log)
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.files = {split: open(self.tmp / f"{split}.bin", "wb") for split in splits}
        self.digests = {split: hashlib.sha256() for split in splits}
        self.counts = {split: 0 for split in splits}

    def write(self, split: str, chunk) -> None:
        arr = np.asarray(chunk)
        if arr.size and int(arr.max()) >= self.vocab_size:
            raise DataError(f"{split}: token id {int(arr.max())} >= vocab_size {self.vocab_size}")
        buf = memoryview(np.ascontiguousarray(arr, dtype=self.np_dtype)).cast("B")  # no copy when it fits
        self.files[split].write(buf)
        self.digests[split].update(buf)
        self.counts[split] += arr.size

    def commit(self, meta: dict, extra_files: Optional[dict[str, str]] = None) -> dict:
        """Write meta.json (with tokens and sha256 filled in) and `extra_files`, rename into place.

        Order: every other file is on disk (fsync) before meta.json is written, and meta.json before the
        rename, so a directory under the final name never holds a meta.json whose files are not all there
        (an interruption before the rename leaves only the temporary, removed by the next writer).
        """
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        meta = {**meta, "tokens": dict(self.counts),
                "sha256": {split: d.hexdigest() for split, d in self.digests.items()}}
        for name, text in (extra_files or {}).items():
            (self.tmp / name).write_text(text)
            _fsync(self.tmp / name)
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _fsync(self.tmp / "meta.json")
        try:
            os.rename(self.tmp, self.out_dir)  # fails, not merges, if out_dir appeared meanwhile (non-empty)
        except OSError as e:
            raise DataError(f"{self.out_dir}: cannot move the finished data into place ({e}); "
                            "was it created while this ran? remove it or choose another directory") from None
        try:  # the rename itself on disk; some file systems cannot fsync a directory
            _fsync(self.out_dir.parent)
        except OSError:
            pass
        return meta

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None or self.tmp.exists():  # an exception, or never committed
            self.abort()


def write_dataset(out_dir: str | Path, splits: dict[str, Iterable[np.ndarray]], meta: dict,
                  extra_files: Optional[dict[str, str]] = None, log=print) -> dict:
    """Write `{split}.bin` from chunks of token ids, meta.json and `extra_files` (name: text), atomically.

    Returns the final meta (with `tokens` and `sha256` filled in).
    """
    with DatasetWriter(out_dir, meta["vocab_size"], meta["dtype"], splits, log) as writer:
        for split, chunks in splits.items():
            for chunk in chunks:
                writer.write(split, chunk)
        return writer.commit(meta, extra_files)
