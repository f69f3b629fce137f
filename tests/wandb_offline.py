"""Read back what an offline W&B run wrote: its `run-*.wandb` transaction log.

W&B 0.31 writes history and config only there (no wandb-summary.json offline). The file is a
7-byte header, then LevelDB log framing (32 KiB blocks of crc32/len/type chunks) around
`wandb_internal_pb2.Record` protobufs.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import zlib

_HEADER, _BLOCK, _CHUNK = b":W&B\xe1\xbe\x00", 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def offline_runs(wandb_dir: str) -> list[str]:
    """Run folders under the `dir=` given to wandb.init."""
    return sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*")))


def segments(wandb_dir: str, run_id: str) -> list[str]:
    """The folders of one run id, oldest first: a resumed run writes a new `offline-run-<time>-<id>`."""
    return [r for r in offline_runs(wandb_dir) if r.endswith(f"-{run_id}")]


def read_run_history(wandb_dir: str, run_id: str) -> list[dict]:
    """Every history row of run `run_id`, all its offline segments merged in the order they ran
    (what `wandb sync` uploads, one segment after the other)."""
    return [row for run_dir in segments(wandb_dir, run_id) for row in read_history(run_dir)]


def _records(run_dir: str):
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    data = open(path, "rb").read()
    assert data[:7] == _HEADER, f"{path}: not a W&B log"
    pos, parts = 7, None
    while pos + _CHUNK <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK:  # block trailer
            pos += left
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        payload = data[pos + _CHUNK: pos + _CHUNK + length]
        pos += _CHUNK + length
        if len(payload) < length:
            break
        if kind == 0 or zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            parts = None
            continue
        if kind == FIRST:
            parts = [payload]
            continue
        if kind == MIDDLE:
            parts = parts + [payload] if parts is not None else None
            continue
        if kind == LAST:
            if parts is None:
                continue
            payload, parts = b"".join(parts + [payload]), None
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def _key(item) -> str:
    return item.key or ".".join(item.nested_key)


def read_history(run_dir: str) -> list[dict]:
    return [{_key(i): json.loads(i.value_json) for i in r.history.item}
            for r in _records(run_dir) if r.WhichOneof("record_type") == "history"]


def read_config(run_dir: str) -> dict:
    config = {}
    for r in _records(run_dir):
        kind = r.WhichOneof("record_type")
        update = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        for item in update:
            config[_key(item)] = json.loads(item.value_json)
    config.pop("_wandb", None)
    return config


def read_group(run_dir: str) -> str:
    return next(r.run.run_group for r in _records(run_dir) if r.WhichOneof("record_type") == "run")
