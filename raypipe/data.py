"""Token memmaps: the on-disk layout, its validation, and random-window batches (the seed's get_batch).

A data directory holds `train.bin` and `val.bin` (flat token ids, uint16 or uint32) and `meta.json`
(vocab size, dtype, token count per split, tokenizer). Batches are random windows of `block_size`
tokens; `y` is `x` shifted by one. A fresh memmap is opened per batch, as in the seed (a long-lived
memmap keeps pages resident and grows the process' memory).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

SPLITS = ("train", "val")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class DataError(ValueError):
    """The data directory is missing, incomplete or does not fit the run; the message says how."""


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


def read_meta(data_dir: str | Path) -> dict:
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist; prepare it with "
                        "`python -m raypipe.prepare` or use data.source: embedded")
    if not meta_path.is_file():
        raise DataError(f"{meta_path} is missing: a data directory needs train.bin, val.bin and meta.json")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{meta_path}: not valid JSON ({e})") from None
    for key in ("vocab_size", "dtype", "tokens"):
        if key not in meta:
            raise DataError(f"{meta_path}: missing key '{key}'")
    if meta["dtype"] not in DTYPES:
        raise DataError(f"{meta_path}: dtype {meta['dtype']!r} is not one of {', '.join(DTYPES)}")
    return meta


def validate_data(data_dir: str | Path, block_size: int, vocab_size: Optional[int] = None) -> dict:
    """Check the directory against meta.json and the run; return the meta. Cheap: sizes only."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    itemsize = np.dtype(DTYPES[meta["dtype"]]).itemsize
    for split in SPLITS:
        path = data_dir / f"{split}.bin"
        if not path.is_file():
            raise DataError(f"{path} is missing")
        size = path.stat().st_size
        if size % itemsize:
            raise DataError(f"{path}: {size} bytes is not a multiple of {itemsize} "
                            f"(meta.json says dtype {meta['dtype']}); the file is truncated or of another dtype")
        n = size // itemsize
        expected = meta["tokens"].get(split)
        if expected is not None and n != expected:
            raise DataError(f"{path}: holds {n} tokens but meta.json says {expected}")
        if n <= block_size:
            raise DataError(f"{path}: {n} tokens is not more than train.block_size ({block_size}); "
                            "a window of block_size + 1 tokens must fit (lower block_size or add data)")
    if vocab_size is not None and meta["vocab_size"] > vocab_size:
        raise DataError(f"{data_dir / 'meta.json'}: vocab_size {meta['vocab_size']} is larger than "
                        f"model.vocab_size ({vocab_size}); token ids would fall outside the embedding")
    return meta


def split_seed(seed: int, rank: int, split: str, stream: str = "batches") -> int:
    """A distinct, stable seed per (run seed, rank, split, stream): ranks never draw the same windows."""
    words = [seed, rank, SPLITS.index(split), sum(map(ord, stream))]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)


def get_batch(split: str, block_size: int, batch_size: int, device: torch.device | str,
              device_type: Optional[str] = None, *, data_dir: str | Path, dtype: str = "uint16",
              generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows from `{data_dir}/{split}.bin`: x [batch, block], y = x shifted by one (int64)."""
    device = torch.device(device)
    device_type = device_type or device.type
    data = np.memmap(Path(data_dir) / f"{split}.bin", dtype=DTYPES[dtype], mode="r")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).numpy()
    windows = data[starts[:, None] + np.arange(block_size + 1)]  # one gather, no per-sample loop
    windows = torch.from_numpy(windows.astype(np.int64))
    x, y = windows[:, :-1], windows[:, 1:]
    if device_type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous().to(device), y.contiguous().to(device)


class BatchSampler:
    """get_batch with its own seeded generator, so each rank and split draws its own stream."""

    def __init__(self, data_dir: str | Path, split: str, block_size: int, batch_size: int,
                 device: torch.device | str, seed: int, rank: int = 0, stream: str = "batches"):
        self.data_dir, self.split = Path(data_dir), split
        self.block_size, self.batch_size, self.device = block_size, batch_size, torch.device(device)
        self.dtype = read_meta(data_dir)["dtype"]
        self.seed = split_seed(seed, rank, split, stream)
        self.generator = torch.Generator().manual_seed(self.seed)

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return get_batch(self.split, self.block_size, self.batch_size, self.device,
                         data_dir=self.data_dir, dtype=self.dtype, generator=self.generator)


# --- writing -----------------------------------------------------------------------------------------


def write_dataset(out_dir: str | Path, splits: dict[str, Iterable[np.ndarray]], meta: dict,
                  extra_files: Optional[dict[str, str]] = None) -> dict:
    """Write `{split}.bin` from chunks of token ids, meta.json and `extra_files` (name: text), atomically.

    Everything goes to a sibling temporary directory that is renamed into place at the end, so an
    interrupted write never leaves a complete-looking directory. Returns the final meta.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise DataError(f"{out_dir} already exists; remove it or choose another data.dir")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        np_dtype = DTYPES[meta["dtype"]]
        meta = {**meta, "tokens": {}, "sha256": {}}
        for split, chunks in splits.items():
            digest, count = hashlib.sha256(), 0
            with open(tmp / f"{split}.bin", "wb") as f:
                for chunk in chunks:
                    arr = np.asarray(chunk)
                    if arr.size and int(arr.max()) >= meta["vocab_size"]:
                        raise DataError(f"{split}: token id {int(arr.max())} >= vocab_size {meta['vocab_size']}")
                    buf = arr.astype(np_dtype).tobytes()
                    f.write(buf)
                    digest.update(buf)
                    count += arr.size
            meta["tokens"][split], meta["sha256"][split] = count, digest.hexdigest()
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def unigram_entropy(data_dir: str | Path, split: str = "val") -> float:
    """Entropy (nats/token) of the split's token frequencies: the loss of a model that knows only them."""
    meta = read_meta(data_dir)
    tokens = np.memmap(Path(data_dir) / f"{split}.bin", dtype=DTYPES[meta["dtype"]], mode="r")
    counts = np.bincount(tokens, minlength=meta["vocab_size"]).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
