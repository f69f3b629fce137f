"""Data on a cluster: copy a data directory from a URI or shared path into a node-local cache.

Workers read their token memmaps from local disk (random windows over NFS or S3 would be slow or
impossible). `stage_data` copies `meta.json`, the token files of both splits (`train.bin` and `val.bin`,
or every shard meta.json lists) and the tokenizer file once per node into
`<cache>/<name>-<hash of meta.json>/`, verifies the copy against meta.json's sha256, and returns that
directory. Plain Python + pyarrow (any `pyarrow.fs` URI: s3://, gs://, hdfs://, file://, or a
local/shared path); no Ray here.

Concurrency: every worker of a node calls this at start-up. A file lock makes one of them copy while
the others wait; the copy goes to a temporary sibling that is renamed into place only once verified,
so a crash mid-copy never leaves a complete-looking directory. A later run whose meta.json is
byte-identical reuses the copy (its checksum check is then a `stat`, see `data.verify_contents`; a cached
file written to since, even with its mtime set back, has another ctime and is read in full again).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from .data import DataError, parse_meta, split_files, verify_contents

CACHE_ENV = "RAYPIPE_DATA_CACHE"  # a node's own cache directory (set in its `ray start` environment)
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "raypipe-data"


def is_uri(location: str) -> bool:
    return "://" in location


def staging_enabled(location: str, cache_dir: str | None) -> bool:
    """A URI is always staged; a path only when data.cache_dir asks for it (e.g. a shared FS)."""
    return is_uri(location) or cache_dir is not None


def node_cache_dir(cache_dir: str | None) -> Path:
    """This node's cache: $RAYPIPE_DATA_CACHE (nodes whose local disk is mounted elsewhere),
    else data.cache_dir, else <tmp>/raypipe-data."""
    return Path(os.environ.get(CACHE_ENV) or cache_dir or DEFAULT_CACHE).expanduser()


def _open(location: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(location if is_uri(location) else str(Path(location).resolve()))
    except (ValueError, OSError) as e:
        raise DataError(f"data.dir {location}: pyarrow cannot open it ({e})") from None


def read_remote_meta(location: str) -> tuple[dict, bytes]:
    """meta.json of a data location (parsed, raw bytes), without copying anything else."""
    fs, root = _open(location)
    try:
        with fs.open_input_stream(f"{root.rstrip('/')}/meta.json") as f:
            raw = f.read()
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"data.dir {location}: cannot read meta.json ({e}); a data directory holds "
                        "meta.json and its token files (python -m raypipe.prepare)") from None
    return parse_meta(raw, f"{location.rstrip('/')}/meta.json"), raw  # every field checked before use


def stage_data(location: str, cache_dir: Path) -> Path:
    """The verified node-local copy of `location` (copied now unless an identical one is cached)."""
    meta, raw = read_remote_meta(location)
    name = Path(location.rstrip("/")).name or "data"
    final = Path(cache_dir) / f"{name}-{hashlib.sha256(raw).hexdigest()[:16]}"
    if _usable(final, raw, meta):  # the common case after the first run: no lock, no copy
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one copier per node; the others wait here, then reuse its copy
        if _usable(final, raw, meta):
            return final
        shutil.rmtree(final, ignore_errors=True)  # a copy that no longer verifies
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # under the lock: copies of killed copiers
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            fs, root = _open(location)
            files = ["meta.json", *(shard.file for shards in split_files(meta).values() for shard in shards)]
            tokenizer_file = (meta.get("tokenizer") or {}).get("file")
            files += [tokenizer_file] if tokenizer_file else []
            for f in files:
                _copy(fs, f"{root.rstrip('/')}/{f}", tmp / f, location)
            if (tmp / "meta.json").read_bytes() != raw:
                raise DataError(f"{location}/meta.json changed during the copy; run again")
            try:
                verify_contents(tmp, meta)  # sha256 and token-id range; writes .verified.json for reuse
            except DataError as e:
                raise DataError(f"data.dir {location}: the copy in {final} does not verify: {e}") from None
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _usable(final: Path, raw: bytes, meta: dict) -> bool:
    try:
        if (final / "meta.json").read_bytes() != raw:
            return False
        verify_contents(final, meta)  # a stat when .verified.json matches; a full read otherwise
        return True
    except (OSError, DataError):
        return False


def _copy(fs: pafs.FileSystem, src: str, dst: Path, location: str) -> None:
    try:
        with fs.open_input_stream(src) as f, open(dst, "wb") as out:
            while block := f.read(16 << 20):
                out.write(block)
    except OSError as e:  # FileNotFoundError locally; S3 and others raise OSError
        raise DataError(f"data.dir {location}: cannot copy {src} ({e})") from None
