"""Where the Ray Data prepare (raypipe/prepare_ray.py) reads and writes, with pyarrow alone (no Ray here).

Inputs: paths (expanded as the local path expands them) or URIs of any pyarrow filesystem (file://, s3://,
gs://): a file, a directory (recursively) or a glob; each checked before any work as documents.check_input
does (the text column in a parquet schema, the first jsonl record), an unreachable store as a clear error.
Output: a local directory written in a temporary sibling renamed into place at the end, or a URI prefix that
holds no files yet; `Output.commit` deletes shards no summary lists (a retried task's), checks every listed
shard is there with its size, writes tokenizer.json and then meta.json last: an interrupted run never leaves
a meta.json that claims missing shards.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.fs as pafs

from .datafiles import SPLITS, check_meta, remove_stale_temporaries
from .documents import FORMATS, Options, PrepareError, check_input, expand_inputs
from .tokenizer import TokenizerSpec

SHARD_NAME = re.compile(r"(train|val)-[0-9]{5,}\.bin")


def is_uri(location: str) -> bool:
    return "://" in location


@dataclass(frozen=True)
class Source:
    """The input files of one reader call: one format, one filesystem, one forced split (None: by hash)."""
    fmt: str
    fs: pafs.FileSystem
    paths: tuple[str, ...]
    split: Optional[str]


# --- inputs: expanded and checked before any work -------------------------------------------------------


def _open_uri(uri: str, flag: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise PrepareError(f"{flag} {uri}: pyarrow cannot open it ({e})") from None


def _info(fs: pafs.FileSystem, what, label: str):
    """get_file_info, with an unreachable store (no network, no credentials) as a PrepareError."""
    try:
        return fs.get_file_info(what)
    except (pa.ArrowException, OSError) as e:
        raise PrepareError(f"{label}: cannot reach it ({e})") from None


def expand_uri(pattern: str, flag: str = "INPUT") -> list[tuple[pafs.FileSystem, str, str]]:
    """A URI of a file, a directory (recursively) or a glob -> (filesystem, path, URI) of each input file."""
    fs, path = _open_uri(pattern, flag)
    scheme = pattern.split("://", 1)[0]
    info = _info(fs, path, f"{flag} {pattern}")
    if info.type == pafs.FileType.File:
        found = [path]
    elif info.type == pafs.FileType.Directory:
        entries = _info(fs, pafs.FileSelector(path, recursive=True), f"{flag} {pattern}")
        found = sorted(e.path for e in entries if e.type == pafs.FileType.File and Path(e.path).suffix in FORMATS)
        if not found:
            raise PrepareError(f"{flag} {pattern}: directory holds no {', '.join(FORMATS)} files")
    else:
        parent = path.rsplit("/", 1)[0] if any(c in path for c in "*?[") else None
        entries = _info(fs, pafs.FileSelector(parent, recursive=True, allow_not_found=True),
                        f"{flag} {pattern}") if parent else []
        found = sorted(e.path for e in entries if e.type == pafs.FileType.File and fnmatch.fnmatch(e.path, path))
        if not found:
            raise PrepareError(f"{flag} {pattern}: no such file, directory or matching glob")
    for f in found:
        if Path(f).suffix not in FORMATS:
            raise PrepareError(f"{scheme}://{f}: unsupported input type {Path(f).suffix or '(no suffix)'!r}; "
                               f"expected one of {', '.join(FORMATS)}")
    return [(fs, f, f"{scheme}://{f}" if not f.startswith("/") or scheme != "file" else f"file://{f}") for f in found]


def expand(patterns: list[str], flag: str) -> list[tuple[pafs.FileSystem, str, str]]:
    """Paths (as the local path expands them) and URIs -> (filesystem, path, name for messages) per file."""
    local = pafs.LocalFileSystem()
    files = []
    for pattern in patterns:
        if is_uri(pattern):
            files += expand_uri(pattern, flag)
        else:
            files += [(local, str(p.resolve()), str(p)) for p in expand_inputs([pattern], flag)]
    return files


def check_file(fs: pafs.FileSystem, path: str, name: str, opts: Options) -> int:
    """documents.check_input over a pyarrow filesystem (the text column is there); returns the file's size."""
    size = _info(fs, path, name).size
    check_input(path, opts, fs, name)
    return size


def plan_sources(inputs: list[str], val_inputs: list[str], opts: Options) -> tuple[list[Source], list[str], list[str]]:
    """The reader calls, and the input names for meta.json's source; everything checked before work starts."""
    train, val = expand(inputs, "INPUT"), expand(val_inputs, "--val") if val_inputs else []
    both = sorted({(type(fs).__name__, p) for fs, p, _ in train} & {(type(fs).__name__, p) for fs, p, _ in val})
    if both:
        raise PrepareError(f"{both[0][1]} is both an INPUT and a --val input; val documents would also be trained on")
    total = sum(check_file(fs, p, name, opts) for fs, p, name in train + val)
    if not total:
        raise PrepareError(f"no input: {', '.join(n for *_, n in train + val)} hold no bytes")
    groups: dict = {}
    for files, split in ((train, "train" if val else None), (val, "val")):
        for fs, p, _ in files:
            groups.setdefault((FORMATS[Path(p).suffix], type(fs).__name__, id(fs), split), (fs, []))[1].append(p)
    sources = [Source(fmt, fs, tuple(paths), split) for (fmt, _, _, split), (fs, paths) in groups.items()]
    return sources, [n for *_, n in train], [n for *_, n in val]


# --- output ---------------------------------------------------------------------------------------------


def write_file(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """One whole file; on local disk synced before it counts as written."""
    if isinstance(fs, pafs.LocalFileSystem):
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


class Output:
    """The output directory or URI prefix, checked at once (before any work); shards are written under `root`."""

    def __init__(self, out: str, log):
        self.out, self.log = out, log
        if is_uri(out):
            self.fs, self.root = _open_uri(out, "--out")
            self.root = self.root.rstrip("/")
            held = _info(self.fs, pafs.FileSelector(self.root, recursive=True, allow_not_found=True), f"--out {out}")
            if held:
                raise PrepareError(f"--out {out} already holds files ({held[0].path}, ...); choose an empty prefix")
            self.tmp = None
        else:
            final = Path(out).absolute()
            if final.exists():
                raise PrepareError(f"--out {out} already exists; remove it or choose another directory")
            final.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(final, log)  # left by a killed prepare of the same --out
            self.tmp = final.parent / f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}"
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.fs, self.root = pafs.LocalFileSystem(), str(self.tmp)
        self.fs.create_dir(self.root, recursive=True)

    def shard_files(self) -> dict[str, int]:
        """Shard files under the output now: name -> size."""
        entries = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return {e.base_name: e.size for e in entries if e.type == pafs.FileType.File and SHARD_NAME.fullmatch(e.base_name)}

    def commit(self, meta: dict, itemsize: int, extra: dict[str, str]) -> None:
        """Orphan shards deleted, every listed shard checked present with its size, then meta.json, last."""
        listed = {s["file"]: s["tokens"] * itemsize for split in SPLITS for s in meta["shards"][split]}
        present = self.shard_files()
        for name in sorted(set(present) - set(listed)):  # a retried task's shard: no summary lists it
            self.fs.delete_file(f"{self.root}/{name}")
        for name, size in listed.items():
            if present.get(name) != size:
                raise PrepareError(f"{self.out}: shard {name} is {'missing' if name not in present else 'of the wrong size'}; "
                                   "nothing was committed")
        for name, text in extra.items():
            write_file(self.fs, f"{self.root}/{name}", text.encode())
        write_file(self.fs, f"{self.root}/meta.json", (json.dumps(meta, indent=2) + "\n").encode())
        if self.tmp is not None:
            try:
                os.rename(self.tmp, self.out)  # fails, not merges, if --out appeared meanwhile
            except OSError as e:
                raise PrepareError(f"{self.out}: cannot move the finished data into place ({e}); "
                                   "was it created while this ran? remove it or choose another directory") from None

    def abort(self) -> None:
        """After a failure: the temporary directory, or the shards written under the (empty at start) prefix."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            for name in self.shard_files():
                self.fs.delete_file(f"{self.root}/{name}")
        except (pa.ArrowException, OSError) as e:
            self.log(f"[prepare] could not remove the shards of the failed run under {self.out} ({e})")



def sharded_meta(rows: list[dict], spec: TokenizerSpec, dtype: str, train_names: list[str], val_names: list[str],
          opts: Options) -> dict:
    """meta.json of the sharded layout from the summary rows; an empty split fails as the local path does."""
    docs = {split: sum(r[f"docs_{split}"] for r in rows) for split in SPLITS}
    empty = sum(r["empty"] for r in rows)
    total = docs["train"] + docs["val"]
    if total == 0:
        raise PrepareError(f"no documents in {', '.join(train_names + val_names)}: every document is empty "
                           f"({empty} empty records)")
    for split in SPLITS:
        if docs[split] == 0:
            how = ("the --val inputs hold no documents" if split == "val" and val_names else
                   f"none of the {total} documents fell in it (--val-fraction {opts.val_fraction}); "
                   "raise --val-fraction or pass --val FILES")
            raise PrepareError(f"the {split} split is empty: {how}")
    shards = {split: sorted(({"file": r[f"{split}_file"], "tokens": r[f"{split}_tokens"], "sha256": r[f"{split}_sha256"]}
                             for r in rows if r[f"{split}_file"]), key=lambda s: s["file"]) for split in SPLITS}
    firsts = [r["first_bad"] for r in rows if r["first_bad"]]
    source = {"kind": "prepare", "inputs": train_names, "val_inputs": val_names,
              "val_fraction": None if val_names else opts.val_fraction, "seed": opts.seed,
              "text_column": opts.text_column, "txt_split": opts.txt_split, "engine": "ray-data",
              "empty_documents": empty, "invalid_utf8_bytes": sum(r["bad"] for r in rows),
              "first_invalid_utf8": min(firsts) if firsts else None}
    meta = {"vocab_size": spec.vocab_size, "dtype": dtype, "eot_id": spec.eot_id, "source": source, "documents": docs,
            "tokenizer": spec.meta(), "tokens": {split: sum(s["tokens"] for s in shards[split]) for split in SPLITS},
            "shards": shards}
    return check_meta(meta, "meta.json")
