"""`python -m raypipe.prepare --ray` (raypipe/prepare_ray.py): Ray Data reads, tokenizes and writes shards; the same
documents and tokens per split as the local path, inputs refused before work starts, no meta.json that claims
missing shards, file:// URIs in and out."""

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_prepare import DOCS, write_corpus

from raypipe.datafiles import check_meta, split_files
from raypipe.documents import PrepareError
from raypipe.errors import UserError
from raypipe.prepare import prepare
from raypipe.prepare_io import Output
from raypipe.prepare_ray import prepare_ray
from raypipe.tokenizer import train_bpe

QUIET = dict(progress=False, log=lambda _: None)


def odd_corpus(root: Path) -> Path:
    """write_corpus's txt/jsonl/parquet (blank lines of several kinds, empty and null documents) plus invalid
    UTF-8 bytes, whitespace-only documents and duplicate documents, in several files of each format."""
    write_corpus(root)
    (root / "bad.txt").write_bytes(b"caf\xe9 au lait\n\n  \t\n\n" + DOCS[0].encode() + b"\n\n\xff\xfe\n\nend \xc3\n")
    dup = [{"text": DOCS[1]}, {"text": DOCS[1]}, {"text": DOCS[2]}, {"text": ""}]
    (root / "sub").mkdir()
    (root / "sub" / "dup.jsonl").write_text("\n".join(json.dumps(r) for r in dup) + "\n")
    pq.write_table(pa.table({"text": [DOCS[1], None, DOCS[3]] * 5}), root / "sub" / "dup.parquet", row_group_size=4)
    return root


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def documents_of(data: Path, meta: dict) -> dict[str, Counter]:
    """Each split's documents as token tuples (streams cut at end-of-text), counted: shard order does not matter."""
    out = {}
    for split, shards in split_files(meta).items():
        docs: Counter = Counter()
        for shard in shards:
            ids = np.fromfile(data / shard.file, dtype=meta["dtype"])
            assert ids.size == shard.tokens and ids[-1] == meta["eot_id"]  # a shard holds whole documents
            assert sha256_of(data / shard.file) == shard.sha256
            ends = np.flatnonzero(ids == meta["eot_id"])
            docs.update(tuple(ids[a:b].tolist()) for a, b in zip(np.r_[0, ends[:-1] + 1], ends))
        out[split] = docs
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = odd_corpus(tmp_path_factory.mktemp("corpus") / "in")
    train_bpe(DOCS, 400).save(str(root.parent / "tokenizer.json"))
    return root


@pytest.mark.parametrize("tokenizer, val", [("byte", False), ("tokenizer.json", False), ("byte", True)])
def test_same_documents_and_tokens_as_the_local_path(corpus, tmp_path, ray_cluster, tokenizer, val):
    tok = str(corpus.parent / tokenizer) if tokenizer.endswith(".json") else tokenizer
    inputs = [str(corpus / "a.txt"), str(corpus / "sub"), str(corpus / "bad.txt")] if val else [str(corpus)]
    kwargs = dict(val_inputs=[str(corpus / "b.jsonl"), str(corpus / "c.parquet")]) if val else dict(val_fraction=0.2)
    local = prepare(inputs, tmp_path / "local", tok, workers=1, **kwargs, **QUIET)
    ray_meta = prepare_ray(inputs, tmp_path / "ray", tok, shard_docs=60, **kwargs, **QUIET)

    assert check_meta(json.loads((tmp_path / "ray" / "meta.json").read_text()), "meta.json") == ray_meta
    assert len(ray_meta["shards"]["train"]) > 3  # several batches, so several writers' shards
    expected, got = documents_of(tmp_path / "local", local), documents_of(tmp_path / "ray", ray_meta)
    assert got == expected and sum(got["val"].values()) > 10
    assert max(got["train"].values()) >= 2  # the duplicates are there, on one side
    for key in ("vocab_size", "dtype", "eot_id", "tokens", "documents", "tokenizer"):
        assert ray_meta[key] == local[key], key
    for key in ("inputs", "val_inputs", "val_fraction", "seed", "empty_documents", "invalid_utf8_bytes"):
        assert ray_meta["source"][key] == local["source"][key], key
    assert local["source"]["invalid_utf8_bytes"] == 4 and local["source"]["empty_documents"] == 10
    assert ray_meta["source"]["first_invalid_utf8"] == local["source"]["first_invalid_utf8"]  # one file has them
    names = sorted(p.name for p in (tmp_path / "ray").iterdir())
    assert names == sorted(["meta.json"] + (["tokenizer.json"] if tok != "byte" else [])
                           + [s.file for shards in split_files(ray_meta).values() for s in shards])
    assert not list(tmp_path.glob(".ray.tmp-*"))


def test_bpe_is_trained_in_a_ray_task_and_used(corpus, tmp_path, ray_cluster):
    meta = prepare_ray([str(corpus / "b.jsonl")], tmp_path / "out", "bpe:300", val_fraction=0.2, **QUIET)
    assert meta["tokenizer"] == {"kind": "bpe", "file": "tokenizer.json", "vocab_size": 300}
    docs = documents_of(tmp_path / "out", meta)
    assert sum(docs["train"].values()) + sum(docs["val"].values()) == 200


def test_file_uris_in_and_out(corpus, tmp_path, ray_cluster):
    out = f"file://{tmp_path}/bucket/corpus-v1"
    meta = prepare_ray([f"file://{corpus}/a.txt", f"file://{corpus}/sub/*.jsonl"], out, "byte", val_fraction=0.2,
                       **QUIET)
    assert meta["source"]["inputs"] == [f"file://{corpus}/a.txt", f"file://{corpus}/sub/dup.jsonl"]
    assert meta["documents"]["train"] + meta["documents"]["val"] == 200 + 3
    local = prepare([str(corpus / "a.txt"), str(corpus / "sub" / "dup.jsonl")], tmp_path / "local", "byte",
                    val_fraction=0.2, workers=1, **QUIET)
    assert documents_of(tmp_path / "bucket" / "corpus-v1", meta) == documents_of(tmp_path / "local", local)
    with pytest.raises(PrepareError, match=r"corpus-v1 already holds files .*choose an empty prefix"):
        prepare_ray([f"file://{corpus}/a.txt"], out, "byte", **QUIET)


@pytest.mark.parametrize("where", ["local", "uri"])
def test_a_failing_run_leaves_no_meta_json_and_no_shards(tmp_path, ray_cluster, where):
    """A bad record far into a file fails in a worker after other shards were written: nothing is left."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("\n\n".join(DOCS[:300]))
    lines = [json.dumps({"text": d}) for d in DOCS[:300]] + ['{"text": 5}']
    (tmp_path / "in" / "b.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out" if where == "local" else f"file://{tmp_path}/out"
    refused = r"a .jsonl input holds a record pyarrow's JSON reader refuses .*without --ray names the file"
    with pytest.raises(PrepareError, match=refused):
        prepare_ray([str(tmp_path / "in")], out, "byte", shard_docs=20, **QUIET)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_commit_deletes_orphans_and_refuses_missing_shards(tmp_path):
    """Output.commit, as the driver calls it: a shard no summary lists (a retried task's) is deleted, a listed
    shard that is not there stops the commit before meta.json."""
    def shard(name: str, tokens: int) -> dict:
        np.arange(tokens, dtype=np.uint16).tofile(tmp_path / "out" / name)
        return {"file": name, "tokens": tokens, "sha256": sha256_of(tmp_path / "out" / name)}

    out = Output(f"file://{tmp_path}/out", log=lambda _: None)
    meta = {"vocab_size": 300, "dtype": "uint16", "tokens": {"train": 10, "val": 3},
            "shards": {"train": [shard("train-00000.bin", 10)], "val": [shard("val-00001.bin", 3)]}}
    shard("val-00000.bin", 5)  # the orphan
    out.commit(check_meta(meta, "meta.json"), 2, {})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "train-00000.bin", "val-00001.bin"]

    out = Output(str(tmp_path / "local"), log=lambda _: None)
    (Path(out.root) / "train-00000.bin").write_bytes(b"\0" * 20)
    with pytest.raises(PrepareError, match=r"shard val-00001.bin is missing; nothing was committed"):
        out.commit(meta, 2, {})
    assert not (tmp_path / "local").exists() and not (Path(out.root) / "meta.json").exists()
    out.abort()
    assert not list(tmp_path.glob(".local.tmp-*"))


@pytest.mark.slow  # an unreachable store is retried for a few seconds
def test_bad_inputs_fail_before_work_starts(corpus, tmp_path):
    """No Ray is started for these (the session's may be up or not: the output is what is checked)."""
    (tmp_path / "x.csv").write_text("a,b\n")
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "nocol.parquet")
    (tmp_path / "nokey.jsonl").write_text('\n{"body": "a"}\n')
    (tmp_path / "exists").mkdir()
    cases = [
        ([str(tmp_path / "missing.txt")], {}, r"INPUT .*missing.txt: no such file, directory or matching glob"),
        ([f"file://{tmp_path}/missing.txt"], {}, r"INPUT file://.*missing.txt: no such file"),
        ([str(tmp_path / "x.csv")], {}, r"x.csv: unsupported input type '.csv'; expected one of .txt, .jsonl, .parquet"),
        ([f"file://{tmp_path}/x.csv"], {}, r"file://.*x.csv: unsupported input type '.csv'"),
        ([f"file://{tmp_path}/nocol.parquet"], {}, r"nocol.parquet: no column 'text' \(--text-column\); its columns are body"),
        ([str(tmp_path / "nokey.jsonl")], {}, r"nokey.jsonl: line 2 has no key 'text' \(--text-column\)"),
        ([str(corpus / "a.txt")], {"val_inputs": [str(corpus)]}, r"a.txt is both an INPUT and a --val input"),
        ([str(corpus / "a.txt")], {"val_fraction": 1.5}, r"--val-fraction 1.5: expected a number between 0 and 1"),
        ([str(corpus / "a.txt")], {"tokenizer": "nope"}, r"unknown --tokenizer 'nope'"),
        ([str(corpus / "a.txt")], {"out": str(tmp_path / "exists")}, r"--out .*exists already exists"),
        (["s3://bkt/x.jsonl?endpoint_override=127.0.0.1:9&scheme=http"], {}, r"INPUT s3://bkt/x.jsonl.*: cannot reach it"),
    ]
    for inputs, kw, message in cases:
        kw = {"out": str(tmp_path / "out"), "tokenizer": "byte", **kw}
        with pytest.raises(UserError, match=message):
            prepare_ray(inputs, kw.pop("out"), kw.pop("tokenizer"), **kw, **QUIET)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.slow  # a Ray of its own starts
def test_cli_starts_its_own_ray_and_prints_progress(corpus, tmp_path):
    """The command as a user types it, no Ray running for it (RAY_ADDRESS unset): a local Ray is started."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    r = subprocess.run([sys.executable, "-m", "raypipe.prepare", str(corpus / "a.txt"), "--out", str(tmp_path / "out"),
                        "--tokenizer", "byte", "--ray", "--workers", "1", "--val-fraction", "0.2"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**env, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "docs" in r.stderr and "MB/s" in r.stderr and "tokens/s" in r.stderr  # the progress line
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert sum(meta["documents"].values()) == 200
    bad = subprocess.run([sys.executable, "-m", "raypipe.prepare", str(tmp_path / "nowhere.txt"), "--out",
                          str(tmp_path / "out2"), "--tokenizer", "byte", "--ray"], capture_output=True, text=True,
                         timeout=120, env={**env, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert bad.returncode == 2 and bad.stderr.startswith("error: INPUT") and "Traceback" not in bad.stderr
