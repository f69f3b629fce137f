"""raypipe/staging.py without Ray: data copied once per node into a local cache, verified, reused."""

import json
import multiprocessing
import shutil
from pathlib import Path

import pytest

from raypipe.data import DataError
from raypipe.staging import node_cache_dir, stage_data, staging_enabled


@pytest.fixture
def shared(embedded_data, tmp_path) -> Path:
    """A copy of the session's data standing in for shared storage (NFS, a bucket)."""
    src = tmp_path / "shared" / "stories"
    shutil.copytree(embedded_data, src, ignore=shutil.ignore_patterns(".verified.json"))
    return src


def test_copy_is_verified_then_reused(shared, tmp_path):
    cache = tmp_path / "cache"
    local = stage_data(str(shared), cache)
    assert local.parent == cache and local.name.startswith("stories-")
    for name in ("meta.json", "train.bin", "val.bin", "tokenizer.json"):
        assert (local / name).read_bytes() == (shared / name).read_bytes()
        assert (local / name).stat().st_ino != (shared / name).stat().st_ino  # a copy, not a link
    assert json.loads((local / ".verified.json").read_text())["train"]["sha256"]
    inode = (local / "train.bin").stat().st_ino
    assert stage_data(f"file://{shared}", cache) == local  # a URI of the same data: the same copy
    assert (local / "train.bin").stat().st_ino == inode  # reused, not copied again
    assert sorted(p.name for p in cache.iterdir()) == [f".{local.name}.lock", local.name]

    # Other data (another meta.json) gets its own directory beside it.
    meta = json.loads((shared / "meta.json").read_text())
    meta["source"]["note"] = "another corpus"
    (shared / "meta.json").write_text(json.dumps(meta))
    assert stage_data(str(shared), cache) != local


def test_a_damaged_cached_copy_is_copied_again(shared, tmp_path):
    local = stage_data(str(shared), tmp_path / "cache")
    with open(local / "val.bin", "r+b") as f:  # same size, other bytes: only the sha256 tells
        f.write(b"\x01\x00")
    assert stage_data(str(shared), tmp_path / "cache") == local
    assert (local / "val.bin").read_bytes() == (shared / "val.bin").read_bytes()


def test_a_source_that_does_not_match_its_checksums_is_refused(shared, tmp_path):
    with open(shared / "train.bin", "r+b") as f:
        f.write(b"\x01\x00")
    with pytest.raises(DataError, match=r"train.bin: sha256 .* does not match meta.json"):
        stage_data(str(shared), tmp_path / "cache")
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".lock"]  # no copy, no temporary left


def test_missing_or_unverifiable_data_is_refused(shared, tmp_path):
    with pytest.raises(DataError, match="cannot read meta.json"):
        stage_data(str(tmp_path / "nowhere"), tmp_path / "cache")
    meta = json.loads((shared / "meta.json").read_text())
    del meta["sha256"]
    (shared / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"stories/meta.json: key 'sha256' is missing; expected an object"):
        stage_data(str(shared), tmp_path / "cache")


def _stage(src, cache, barrier, results):
    barrier.wait()  # all start together, as the workers of one node do
    local = stage_data(src, Path(cache))
    results.put((str(local), (local / "train.bin").stat().st_ino))


def test_concurrent_workers_of_one_node_make_one_copy(shared, tmp_path):
    """Four processes at once: one copies, the others wait for it and reuse its copy."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_stage, args=(str(shared), str(tmp_path / "cache"), barrier, results))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * 4
    found = {results.get(timeout=5) for _ in procs}
    assert len(found) == 1  # one directory, one train.bin inode: nobody replaced another's copy
    assert not list((tmp_path / "cache").glob(".*tmp*"))


def test_which_runs_stage_and_where(monkeypatch, tmp_path):
    assert not staging_enabled("/data/x", None)  # one machine: read in place
    assert staging_enabled("/nfs/data/x", "/tmp/c") and staging_enabled("s3://b/x", None)
    monkeypatch.delenv("RAYPIPE_DATA_CACHE", raising=False)
    assert node_cache_dir("/tmp/c") == Path("/tmp/c")
    monkeypatch.setenv("RAYPIPE_DATA_CACHE", str(tmp_path))  # a node's own disk wins over the config
    assert node_cache_dir("/tmp/c") == tmp_path


def test_dry_run_reads_only_meta_json_of_a_uri(shared, tmp_path, capsys):
    from raypipe.train import main

    args = ["--dry-run", "--set", "data.source=prepared", "--storage-path", str(tmp_path / "runs")]
    assert main([*args, "--set", f"data.dir=file://{shared}"]) == 0
    assert f"data: file://{shared} copied to each node's cache at start" in capsys.readouterr().out
    assert main([*args, "--set", f"data.dir=file://{tmp_path}/nowhere"]) == 2
    assert "cannot read meta.json" in capsys.readouterr().err
