"""Token memmaps: the on-disk layout, its validation, and where batch windows start (batches.py draws them).

A data directory holds `meta.json` (vocab size, dtype, token count per split, tokenizer) and the token
files (flat token ids, uint16 or uint32) in one of two layouts: `train.bin` and `val.bin`, or shards
`train-00000.bin`, ..., `val-00000.bin`, ... listed in meta.json's `shards` (datafiles.split_files gives
the files of a split for both; a single file is one shard).

Nothing here imports torch: the driver validates data before Ray starts without paying for it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

# The layout and the writer are in datafiles.py, without torch, for prepare; still importable from here.
from .datafiles import (TOKEN_DTYPES, SPLITS, DataError, DatasetWriter, Shard, check_meta,  # noqa: F401
                        dtype_for_vocab, parse_meta, split_files, write_dataset)


def read_meta(data_dir: str | Path) -> dict:
    """meta.json of a data directory, checked field by field (datafiles.check_meta) before anything uses it."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist; prepare it with "
                        "`python -m raypipe.prepare` or use data.source: embedded")
    if not meta_path.is_file():
        raise DataError(f"{meta_path} is missing: a data directory needs meta.json and its token files "
                        "(train.bin and val.bin, or train-NNNNN.bin and val-NNNNN.bin shards)")
    try:
        raw = meta_path.read_bytes()
    except OSError as e:
        raise DataError(f"{meta_path}: cannot be read ({e})") from None
    return parse_meta(raw, str(meta_path))


VERIFIED = ".verified.json"  # sidecar: which .bin files (by stat, ctime included) were already read in full
# Its entries are keyed by file name less ".bin" ("train" for train.bin, "train-00000" for a shard).


def validate_data(data_dir: str | Path, block_size: int, vocab_size: Optional[int] = None,
                  verify: bool = True) -> dict:
    """Check the directory against meta.json and the run; return the meta.

    Sizes, token counts and dtype are checked from `stat` alone. With `verify`, each `.bin` is also
    read once in full: its sha256 against meta.json and its largest token id against the vocabulary
    (an id past the embedding is a device-side assert on GPU, far from its cause). That read runs at
    about 1 GB/s, seconds for a multi-GB corpus, so its result is kept in `.verified.json` next to
    the data, keyed by each file's device, inode, size, mtime and ctime: later runs only `stat` the
    files. Any write to a file moves its ctime, which (unlike mtime) no user can set back, so a changed
    file is always read again. A read-only data directory is verified at every start instead.
    """
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    itemsize = np.dtype(TOKEN_DTYPES[meta["dtype"]]).itemsize
    if meta["vocab_size"] > np.iinfo(TOKEN_DTYPES[meta["dtype"]]).max + 1:
        raise DataError(f"{data_dir / 'meta.json'}: dtype {meta['dtype']} cannot hold vocab_size "
                        f"{meta['vocab_size']}; expected {dtype_for_vocab(meta['vocab_size'])}")
    sharded = "shards" in meta
    for split, shards in split_files(meta).items():
        for i, shard in enumerate(shards):
            path = data_dir / shard.file
            if not path.is_file():
                raise DataError(f"{path} is missing" + (f" (meta.json's shards.{split}[{i}])" if sharded else ""))
            size = path.stat().st_size
            if size % itemsize:
                raise DataError(f"{path}: {size} bytes is not a multiple of {itemsize} "
                                f"(meta.json says dtype {meta['dtype']}); the file is truncated or of another dtype")
            n, expected = size // itemsize, shard.tokens
            if n != expected:
                other = [d for d, t in TOKEN_DTYPES.items()
                         if d != meta["dtype"] and expected * np.dtype(t).itemsize == size]
                hint = f"; its size fits {other[0]}, not meta.json's dtype {meta['dtype']}" if other else ""
                raise DataError(f"{path}: holds {n} tokens but meta.json says {expected}{hint}")
        if window_starts(shards, block_size).sum() >= 1:
            continue
        if not sharded:
            raise DataError(f"{data_dir / shards[0].file}: {shards[0].tokens} tokens is not more than train.block_size "
                            f"({block_size}); a window of block_size + 1 tokens must fit (lower block_size or add data)")
        raise DataError(f"{data_dir}: no {split} shard holds more than train.block_size ({block_size}) tokens (the "
                        f"largest holds {max(sh.tokens for sh in shards)}); a window of block_size + 1 tokens must fit "
                        "in one shard (lower block_size or add data)")
    if vocab_size is not None and meta["vocab_size"] > vocab_size:
        raise DataError(f"{data_dir / 'meta.json'}: vocab_size {meta['vocab_size']} is larger than "
                        f"model.vocab_size ({vocab_size}); token ids would fall outside the embedding")
    if verify:
        verify_contents(data_dir, meta)
    return meta


def _scan(path: Path, np_dtype) -> tuple[str, int, int]:
    """sha256, largest token id and its position, in one streamed pass of 16 MB blocks."""
    digest, top, where, pos = hashlib.sha256(), -1, -1, 0
    block = 16 << 20
    with open(path, "rb") as f:
        while buf := f.read(block):
            digest.update(buf)
            arr = np.frombuffer(buf, dtype=np_dtype)
            if arr.size:
                i = int(arr.argmax())
                if int(arr[i]) > top:
                    top, where = int(arr[i]), pos + i
            pos += arr.size
    return digest.hexdigest(), top, where


def _stat_key(st: os.stat_result) -> dict:
    """What identifies a file's contents without reading it. ctime is in it because a write always moves
    it and nothing but the clock sets it (os.utime can restore mtime, not ctime)."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino, "device": st.st_dev}


def verify_contents(data_dir: str | Path, meta: dict) -> None:
    """Checksums and token-id range of each token file (see validate_data); cached in `.verified.json`."""
    data_dir = Path(data_dir)
    sidecar = data_dir / VERIFIED
    try:
        cache = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    fresh = {}
    for shard in (shard for shards in split_files(meta).values() for shard in shards):
        path, name = data_dir / shard.file, Path(shard.file).stem
        expected_sha = shard.sha256
        # Taken before the read: a write during it moves ctime past the key, so the next start reads again.
        key = {**_stat_key(path.stat()), "dtype": meta["dtype"], "sha256": expected_sha}
        entry = cache.get(name)
        if not (isinstance(entry, dict) and {k: entry.get(k) for k in key} == key
                and isinstance(entry.get("max_id"), int) and isinstance(entry.get("max_at"), int)):
            sha, top, where = _scan(path, TOKEN_DTYPES[meta["dtype"]])
            if sha != expected_sha:
                raise DataError(f"{path}: sha256 {sha} does not match meta.json's {expected_sha}; "
                                "the file was changed or belongs to another meta.json (prepare it again)")
            entry = {**key, "max_id": top, "max_at": where}
        if entry["max_id"] >= meta["vocab_size"]:
            raise DataError(f"{path}: token id {entry['max_id']} (at position {entry['max_at']}) is not below "
                            f"meta.json's vocab_size {meta['vocab_size']}; the data was made with another "
                            "tokenizer or meta.json is wrong")
        fresh[name] = entry
    if fresh != cache:
        try:  # best effort: a read-only data directory just verifies again next time
            tmp = data_dir / f"{VERIFIED}.tmp-{os.getpid()}"
            tmp.write_text(json.dumps(fresh, indent=2) + "\n")
            os.replace(tmp, sidecar)
        except OSError:
            pass


# Each sampler stream's own number in its seed. Named, not derived from the name (a sum of character
# codes, as these once were, gives anagrams the same windows); the numbers are those sums, so runs keep
# drawing the windows they always drew. A new stream takes a number of its own.
STREAMS = {"batches": 730, "eval": 424, "probe": 536}


def split_seed(seed: int, rank: int, split: str, stream: str = "batches", from_step: int = 0) -> int:
    """A distinct, stable seed per (run seed, rank, split, stream): ranks never draw the same windows.
    `from_step`: a stream begun anew at that step (a resume on another worker count), distinct from the
    stream the rank drew from step 0."""
    if stream not in STREAMS:
        raise ValueError(f"stream {stream!r}: expected one of {', '.join(STREAMS)} (add a new one to data.STREAMS)")
    words = [seed, rank, SPLITS.index(split), STREAMS[stream]] + ([from_step] if from_step else [])
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)


def window_starts(shards: list[Shard], block_size: int) -> np.ndarray:
    """Valid window starts per shard: a window of block_size + 1 tokens stays inside its shard."""
    return np.array([max(0, sh.tokens - block_size) for sh in shards], dtype=np.int64)


def unigram_entropy(data_dir: str | Path, split: str = "val") -> float:
    """Entropy (nats/token) of the split's token frequencies: the loss of a model that knows only them."""
    meta = read_meta(data_dir)
    counts = np.zeros(meta["vocab_size"], dtype=np.int64)
    for shard in split_files(meta)[split]:
        tokens = np.memmap(Path(data_dir) / shard.file, dtype=TOKEN_DTYPES[meta["dtype"]], mode="r")
        found = np.bincount(tokens, minlength=meta["vocab_size"])
        if found.size > counts.size:  # an id past vocab_size (unverified data): count it all the same
            counts = np.pad(counts, (0, found.size - counts.size))
        counts[:found.size] += found
    counts = counts.astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
