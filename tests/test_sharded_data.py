"""Sharded data directories (train-00000.bin ... listed in meta.json's `shards`): checked, verified, sampled,
staged and trained on as the single-file layout is, with real files."""

import copy
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tiny_config
from raypipe.checkpoint import load_state
from raypipe.batches import BatchSampler
from raypipe.data import (VERIFIED, DataError, Shard, check_meta, read_meta, split_files, unigram_entropy, validate_data,
                          write_dataset)
from raypipe.loop import WorkerEnv, train
from raypipe.staging import stage_data

SHA = "ab" * 32


def write_sharded(out: Path, shards: dict[str, list], vocab_size: int = 500, dtype: str = "uint16", **extra) -> dict:
    """A sharded data directory from token arrays (one array per shard), its meta.json as prepare writes it."""
    out.mkdir(parents=True)
    meta = {"vocab_size": vocab_size, "dtype": dtype, "eot_id": None, "tokens": {}, "shards": {}, **extra}
    for split, arrays in shards.items():
        meta["shards"][split] = []
        for i, tokens in enumerate(arrays):
            raw = np.asarray(tokens, dtype=dtype).tobytes()
            (out / f"{split}-{i:05d}.bin").write_bytes(raw)
            meta["shards"][split].append({"file": f"{split}-{i:05d}.bin", "tokens": len(tokens),
                                          "sha256": hashlib.sha256(raw).hexdigest()})
        meta["tokens"][split] = sum(len(t) for t in arrays)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def good_meta() -> dict:
    return {"vocab_size": 500, "dtype": "uint16", "tokens": {"train": 300, "val": 50},
            "shards": {"train": [{"file": "train-00000.bin", "tokens": 200, "sha256": SHA},
                                 {"file": "train-00001.bin", "tokens": 100, "sha256": "cd" * 32}],
                       "val": [{"file": "val-00000.bin", "tokens": 50, "sha256": "ef" * 32}]}}


def test_check_meta_accepts_both_layouts_and_split_files_lists_them():
    meta = good_meta()
    assert check_meta(copy.deepcopy(meta), "d/meta.json") == meta
    files = split_files(meta)
    assert files == {"train": [Shard("train-00000.bin", 200, SHA), Shard("train-00001.bin", 100, "cd" * 32)],
                     "val": [Shard("val-00000.bin", 50, "ef" * 32)]}
    single = {"vocab_size": 500, "dtype": "uint16", "tokens": {"train": 300, "val": 50},
              "sha256": {"train": SHA, "val": "ef" * 32}}
    assert split_files(check_meta(single, "d/meta.json")) == {"train": [Shard("train.bin", 300, SHA)],
                                                              "val": [Shard("val.bin", 50, "ef" * 32)]}


def _set(path: str, value):
    """A change to good_meta: set (or with value None, delete) the key at `path` (a list of keys/indices)."""
    def change(meta):
        *parents, last = path
        target = meta
        for key in parents:
            target = target[key]
        if value is None:
            del target[last]
        else:
            target[last] = value
    return change


BAD = {
    "both layouts": (_set(["sha256"], {"train": SHA, "val": SHA}), r"key 'sha256' .* and key 'shards'"),
    "neither layout": (_set(["shards"], None), r"key 'sha256' is missing; .* key 'shards'"),
    "shards not an object": (_set(["shards"], [1]), r"key 'shards' is \[1\]"),
    "missing split list": (_set(["shards", "val"], None), r"key 'shards.val' is missing"),
    "empty split list": (_set(["shards", "train"], []), r"key 'shards.train' is \[\]; expected a non-empty list"),
    "entry not an object": (_set(["shards", "train", 1], "train-00001.bin"), r"key 'shards.train\[1\]' is "),
    "path escape": (_set(["shards", "train", 1, "file"], "../x.bin"), r"key 'shards.train\[1\].file' is \"../x.bin\""),
    "sub directory": (_set(["shards", "train", 0, "file"], "d/train-00000.bin"), r"'shards.train\[0\].file'"),
    "other split's file": (_set(["shards", "train", 1, "file"], "val-00000.bin"), r"'shards.train\[1\].file' is \"val-"),
    "short number": (_set(["shards", "train", 1, "file"], "train-1.bin"), r"'shards.train\[1\].file' is \"train-1.bin\""),
    "no file": (_set(["shards", "val", 0, "file"], None), r"'shards.val\[0\].file' is missing"),
    "duplicate file": (_set(["shards", "train", 1, "file"], "train-00000.bin"),
                       r"'shards.train\[1\].file' is \"train-00000.bin\"; expected a file name not listed before"),
    "tokens sum": (_set(["tokens", "train"], 301), r"'shards.train' holds 300 tokens .* 'tokens.train' is 301"),
    "tokens 0": (_set(["shards", "train", 1, "tokens"], 0), r"'shards.train\[1\].tokens' is 0; expected a token count >= 1"),
    "tokens bool": (_set(["shards", "val", 0, "tokens"], True), r"'shards.val\[0\].tokens' is true"),
    "bad sha": (_set(["shards", "train", 1, "sha256"], "AB" * 32), r"'shards.train\[1\].sha256' is \"ABAB"),
    "short sha": (_set(["shards", "val", 0, "sha256"], "ab"), r"'shards.val\[0\].sha256' is \"ab\""),
}


@pytest.mark.parametrize("case", BAD)
def test_check_meta_refuses_a_bad_sharded_meta_naming_the_file_and_key(tmp_path, case):
    change, message = BAD[case]
    meta = good_meta()
    change(meta)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=message) as e:
        read_meta(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'meta.json'}: ")


@pytest.fixture
def sharded(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    data = tmp_path / "sharded"
    write_sharded(data, {"train": [rng.integers(0, 500, n) for n in (3000, 40, 2000)],
                         "val": [rng.integers(0, 500, n) for n in (700, 500)]})
    return data


def test_validate_and_verify_every_shard_once(sharded):
    meta = validate_data(sharded, block_size=64, vocab_size=512)
    verified = json.loads((sharded / VERIFIED).read_text())
    assert sorted(verified) == ["train-00000", "train-00001", "train-00002", "val-00000", "val-00001"]
    assert [verified[f"train-0000{i}"]["sha256"] for i in range(3)] == [s.sha256 for s in split_files(meta)["train"]]
    stats = {name: entry["ctime_ns"] for name, entry in verified.items()}
    validate_data(sharded, block_size=64)  # a stat of each shard; the sidecar is left as it was
    assert {name: e["ctime_ns"] for name, e in json.loads((sharded / VERIFIED).read_text()).items()} == stats


def test_missing_shard_is_named(sharded):
    (sharded / "train-00002.bin").unlink()
    with pytest.raises(DataError, match=r"train-00002.bin is missing \(meta.json's shards.train\[2\]\)"):
        validate_data(sharded, 64)


def test_truncated_shard_is_refused(sharded):
    with open(sharded / "val-00001.bin", "r+b") as f:
        f.truncate(998)
    with pytest.raises(DataError, match=r"val-00001.bin: holds 499 tokens but meta.json says 500"):
        validate_data(sharded, 64)
    with open(sharded / "val-00001.bin", "r+b") as f:
        f.truncate(997)
    with pytest.raises(DataError, match=r"val-00001.bin: 997 bytes is not a multiple of 2"):
        validate_data(sharded, 64)


def test_changed_shard_is_refused_even_after_a_verified_start(sharded):
    validate_data(sharded, 64)
    path = sharded / "train-00001.bin"
    data = np.fromfile(path, np.uint16)
    data[7] = (data[7] + 1) % 500  # same size, other bytes: only the sha256 tells
    data.tofile(path)
    with pytest.raises(DataError, match=r"train-00001.bin: sha256 [0-9a-f]{64} does not match meta.json's"):
        validate_data(sharded, 64)
    validate_data(sharded, 64, verify=False)  # sizes alone still pass


def test_token_id_outside_the_vocabulary_in_one_shard(tmp_path):
    bad = np.zeros(300, np.uint16)
    bad[123] = 500
    write_sharded(tmp_path / "d", {"train": [np.ones(300), bad], "val": [np.ones(300)]}, vocab_size=500)
    with pytest.raises(DataError, match=r"train-00001.bin: token id 500 \(at position 123\) is not below .*vocab_size 500"):
        validate_data(tmp_path / "d", 16)


def test_a_split_needs_one_shard_longer_than_block_size(tmp_path):
    write_sharded(tmp_path / "d", {"train": [np.ones(300)], "val": [np.ones(64), np.ones(60)]})
    with pytest.raises(DataError, match=rf"{tmp_path / 'd'}: no val shard holds more than train.block_size \(64\) "
                                        r"tokens \(the largest holds 64\)"):
        validate_data(tmp_path / "d", 64)
    validate_data(tmp_path / "d", 63)  # one window in val-00000.bin; val-00001.bin is never drawn


def test_one_shard_draws_the_batches_of_the_single_file(tmp_path):
    rng = np.random.default_rng(1)
    tokens = {"train": rng.integers(0, 500, 5000), "val": rng.integers(0, 500, 900)}
    single = tmp_path / "single"
    write_dataset(single, {s: [t] for s, t in tokens.items()}, {"vocab_size": 500, "dtype": "uint16"}, log=lambda _: None)
    write_sharded(tmp_path / "sharded", {s: [t] for s, t in tokens.items()})
    for split in ("train", "val"):
        a = BatchSampler(single, split, 32, 16, "cpu", seed=5)
        b = BatchSampler(tmp_path / "sharded", split, 32, 16, "cpu", seed=5)
        for _ in range(5):
            (xa, ya), (xb, yb) = a(), b()
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # ... and the windows `randint(len(data) - block_size)` always drew from a single file
    g = torch.Generator().manual_seed(BatchSampler(single, "train", 32, 16, "cpu", seed=5).seed)
    starts = torch.randint(5000 - 32, (16,), generator=g).numpy()
    x, y = BatchSampler(tmp_path / "sharded", "train", 32, 16, "cpu", seed=5)()
    assert np.array_equal(x.numpy(), tokens["train"][starts[:, None] + np.arange(32)])
    assert np.array_equal(y.numpy(), tokens["train"][starts[:, None] + np.arange(1, 33)])
    assert unigram_entropy(single, "train") == unigram_entropy(tmp_path / "sharded", "train")


def test_windows_never_cross_a_shard_boundary(tmp_path):
    write_sharded(tmp_path / "d", {"train": [np.zeros(200), np.ones(300)], "val": [np.ones(100)]})
    sampler = BatchSampler(tmp_path / "d", "train", 16, 64, "cpu", seed=0)
    firsts = []
    for _ in range(50):
        x, y = sampler()
        windows = torch.cat([x, y[:, -1:]], dim=1)
        assert (windows == windows[:, :1]).all()  # all zeros (A) or all ones (B), never both
        firsts.append(windows[:, 0])
    assert set(torch.cat(firsts).tolist()) == {0, 1}


def test_every_start_of_every_shard_is_drawn_and_nothing_past_it(tmp_path):
    # consecutive ids per shard: a window is a run of +1 steps, inside one shard's id range
    write_sharded(tmp_path / "d", {"train": [np.arange(0, 100), np.arange(1000, 1100)], "val": [np.arange(100)]},
                  vocab_size=2000)
    sampler = BatchSampler(tmp_path / "d", "train", 8, 256, "cpu", seed=0)
    starts = set()
    for _ in range(20):
        x, y = sampler()
        windows = torch.cat([x, y[:, -1:]], dim=1)
        assert (windows.diff(dim=1) == 1).all()
        starts |= set(windows[:, 0].tolist())
    assert starts == set(range(0, 92)) | set(range(1000, 1092))


def test_shards_are_drawn_in_proportion_to_their_window_starts(tmp_path):
    block = 32
    sizes = {0: block + 1000, 1: block + 3000, 2: block, 3: block + 6000}  # shard 2: no window fits
    write_sharded(tmp_path / "d", {"train": [np.full(n, value) for value, n in sizes.items()], "val": [np.ones(100)]})
    sampler = BatchSampler(tmp_path / "d", "train", block, 128, "cpu", seed=0)
    firsts = torch.cat([sampler()[0][:, 0] for _ in range(100)])
    counts = torch.bincount(firsts, minlength=4).tolist()
    assert counts[2] == 0
    n = len(firsts)
    for value, expected in ((0, 0.1), (1, 0.3), (3, 0.6)):
        assert abs(counts[value] / n - expected) < 5 * math.sqrt(expected * (1 - expected) / n), (value, counts)


def test_unigram_entropy_counts_every_shard(tmp_path):
    write_sharded(tmp_path / "d", {"train": [np.ones(100)], "val": [np.zeros(300), np.ones(100)]})
    p = np.array([0.75, 0.25])
    assert unigram_entropy(tmp_path / "d", "val") == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)
    assert unigram_entropy(tmp_path / "d", "train") == 0.0


@pytest.mark.parametrize("as_uri", [False, True])
def test_staging_copies_and_verifies_every_shard(sharded, tmp_path, as_uri):
    meta = json.loads((sharded / "meta.json").read_text())
    meta["tokenizer"] = {"kind": "file", "file": "tokenizer.json"}
    (sharded / "meta.json").write_text(json.dumps(meta))
    (sharded / "tokenizer.json").write_text('{"stand-in": true}')
    location = sharded.as_uri() if as_uri else str(sharded)
    local = stage_data(location, tmp_path / "cache")
    names = ["meta.json", "tokenizer.json", "train-00000.bin", "train-00001.bin", "train-00002.bin",
             "val-00000.bin", "val-00001.bin"]
    assert sorted(p.name for p in local.iterdir()) == sorted(names + [VERIFIED])
    for name in names:
        assert (local / name).read_bytes() == (sharded / name).read_bytes()
    assert sorted(json.loads((local / VERIFIED).read_text())) == sorted(n[:-4] for n in names if n.endswith(".bin"))
    validate_data(local, 64)

    inode = (local / "val-00001.bin").stat().st_ino
    assert stage_data(location, tmp_path / "cache") == local and (local / "val-00001.bin").stat().st_ino == inode

    with open(local / "train-00002.bin", "r+b") as f:  # a cached shard changed, same size: copied again
        f.write(b"\x01\x00")
    assert stage_data(location, tmp_path / "cache") == local
    assert (local / "train-00002.bin").read_bytes() == (sharded / "train-00002.bin").read_bytes()

    shutil.rmtree(local)
    with open(sharded / "train-00001.bin", "r+b") as f:  # the source's shard no longer matches meta.json
        f.write(b"\x01\x00")
    with pytest.raises(DataError, match=r"the copy in .* does not verify: .*train-00001.bin: sha256 .* does not match"):
        stage_data(location, tmp_path / "cache")
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".lock"]  # no copy, no temporary left


def shard_like(embedded_data: Path, out: Path, pieces: dict[str, list[int]]) -> Path:
    """The session's data, each split cut into shards at `pieces` (token offsets), tokenizer alongside."""
    meta = read_meta(embedded_data)
    tokens = {s: np.fromfile(embedded_data / f"{s}.bin", np.uint16) for s in ("train", "val")}
    keep = {k: v for k, v in meta.items() if k not in ("tokens", "sha256", "vocab_size", "dtype")}
    write_sharded(out, {s: np.split(tokens[s], pieces[s]) for s in tokens}, meta["vocab_size"], meta["dtype"], **keep)
    if (meta.get("tokenizer") or {}).get("file"):
        shutil.copy(embedded_data / meta["tokenizer"]["file"], out)
    return out


def run(data: Path, storage: Path) -> tuple[dict, list[float]]:
    cfg = tiny_config(data, storage, max_steps=12, eval_interval=6)
    cfg.wandb.mode, cfg.train.sample_tokens = "disabled", 0
    kept = storage / "kept"
    kept.mkdir(parents=True)
    summary = train(cfg, WorkerEnv(report=lambda m, ck: ck and ck.rename(kept / ck.name), log=lambda _: None))
    return summary, load_state(kept / "checkpoint_0000012")["step_losses"]


def test_training_on_a_sharded_directory(embedded_data, tmp_path):
    n = read_meta(embedded_data)["tokens"]
    sharded = shard_like(embedded_data, tmp_path / "sharded", {"train": [n["train"] // 3, n["train"] // 3 + 20],
                                                               "val": [n["val"] // 2]})
    assert [len(s) for s in split_files(validate_data(sharded, 32, 512)).values()] == [3, 2]
    summary, losses = run(sharded, tmp_path / "run")
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert all(math.isfinite(h[k]) for h in summary["history"] for k in ("train_loss", "val_loss"))
    assert summary["final_val_loss"] < summary["history"][0]["val_loss"] < 6.3  # ln(512) = 6.24 at init


def test_one_shard_per_split_trains_bit_identically_to_the_single_file(embedded_data, tmp_path):
    one = shard_like(embedded_data, tmp_path / "one", {"train": [], "val": []})
    validate_data(one, 32, 512)
    (a, la), (b, lb) = run(embedded_data, tmp_path / "a"), run(one, tmp_path / "b")
    assert la == lb
    keys = ("step", "train_loss", "val_loss", "step_loss", "grad_norm")
    assert [[h[k] for k in keys] for h in a["history"]] == [[h[k] for k in keys] for h in b["history"]]


def test_export_knows_a_sharded_directory_as_prepared_data(sharded):
    from raypipe.export import raypipe_kind

    assert raypipe_kind(sharded) == "a prepared data directory (it holds meta.json and train.bin or train-NNNNN.bin shards)"
    (sharded / "meta.json").unlink()
    assert raypipe_kind(sharded) is None
