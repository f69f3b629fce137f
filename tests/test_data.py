import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raypipe.batches import BatchSampler, CudaPrefetcher, get_batch
from raypipe.data import DataError, read_meta, unigram_entropy, validate_data, write_dataset


def make_data(root: Path, n_train: int = 5000, n_val: int = 1000, vocab: int = 60000) -> Path:
    """Token i at position i (mod vocab): a window's values say exactly where it came from."""
    out = root / "ramp"
    write_dataset(out, {"train": [np.arange(n_train) % vocab], "val": [np.arange(n_val) % vocab]},
                  {"vocab_size": vocab, "dtype": "uint16"})
    return out


def test_windows_shapes_shift_and_bounds(tmp_path):
    data = make_data(tmp_path)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        x, y = get_batch("train", 64, 32, "cpu", data_dir=data, dtype="uint16", generator=g)
        assert x.shape == y.shape == (32, 64) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y[:, :-1], x[:, 1:])  # y is x shifted by one
        assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(32, 63, dtype=torch.int64))  # contiguous windows
        assert int(x.min()) >= 0 and int(y.max()) <= 4999  # never reads past the end
    # Every start position is reachable, the last one included.
    starts = torch.cat([get_batch("train", 64, 512, "cpu", data_dir=data, generator=g)[0][:, 0] for _ in range(40)])
    assert int(starts.max()) == 5000 - 64 - 1 and int(starts.min()) == 0


def test_ranks_and_streams_draw_different_windows(tmp_path):
    data = make_data(tmp_path)
    batches = {(rank, stream): BatchSampler(data, "train", 16, 8, "cpu", seed=1, rank=rank, stream=stream)()[0]
               for rank in (0, 1) for stream in ("batches", "eval")}
    assert not torch.equal(batches[0, "batches"], batches[1, "batches"])
    assert not torch.equal(batches[0, "batches"], batches[0, "eval"])
    again = BatchSampler(data, "train", 16, 8, "cpu", seed=1, rank=0)()
    assert torch.equal(again[0], batches[0, "batches"])  # and the same seed repeats


def test_meta_records_counts_and_checksums(tmp_path):
    meta = read_meta(make_data(tmp_path))
    assert meta["tokens"] == {"train": 5000, "val": 1000} and len(meta["sha256"]["train"]) == 64


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match=r"data directory .*nope does not exist"):
        validate_data(tmp_path / "nope", 16)


def test_bin_size_not_a_multiple_of_dtype(tmp_path):
    data = make_data(tmp_path)
    with open(data / "val.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(DataError, match=r"val.bin: 2001 bytes is not a multiple of 2 .*uint16"):
        validate_data(data, 16)


def test_block_size_must_be_smaller_than_each_split(tmp_path):
    data = make_data(tmp_path, n_val=100)
    validate_data(data, 99)
    with pytest.raises(DataError, match=r"val.bin: 100 tokens is not more than train.block_size \(100\)"):
        validate_data(data, 100)


def test_count_mismatch_and_vocab_too_large(tmp_path):
    data = make_data(tmp_path)
    with pytest.raises(DataError, match=r"vocab_size 60000 is larger than model.vocab_size \(512\)"):
        validate_data(data, 16, vocab_size=512)
    meta = json.loads((data / "meta.json").read_text())
    meta["tokens"]["train"] = 4999
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"train.bin: holds 5000 tokens but meta.json says 4999"):
        validate_data(data, 16)


def test_write_is_atomic_and_refuses_ids_outside_vocab(tmp_path):
    with pytest.raises(DataError, match="token id 70 >= vocab_size 50"):
        write_dataset(tmp_path / "bad", {"train": [np.arange(10), np.arange(60, 71)]},
                      {"vocab_size": 50, "dtype": "uint16"})
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_embedded_corpus_is_reused_and_beatable(embedded_data):
    meta = read_meta(embedded_data)
    assert meta["tokenizer"]["file"] == "tokenizer.json" and (embedded_data / "tokenizer.json").is_file()
    assert 0 < unigram_entropy(embedded_data) < np.log(meta["vocab_size"])
    from raypipe.config import DataConfig
    from raypipe.corpus import ensure_embedded_corpus

    same = DataConfig(dir=str(embedded_data), num_stories=3000)
    before = (embedded_data / "train.bin").stat().st_mtime_ns
    assert ensure_embedded_corpus(same, log=print) == meta and (embedded_data / "train.bin").stat().st_mtime_ns == before
    with pytest.raises(DataError, match="holds data built from"):
        ensure_embedded_corpus(DataConfig(dir=str(embedded_data), num_stories=10))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_prefetcher_same_batches_and_resume_position(tmp_path):
    data = make_data(tmp_path)
    reference = BatchSampler(data, "train", 16, 4, "cuda", seed=3)
    expected = [reference() for _ in range(6)]
    ahead = CudaPrefetcher(BatchSampler(data, "train", 16, 4, "cuda", seed=3), depth=2)
    for x, y in expected[:3]:
        got = ahead()
        assert torch.equal(got[0], x) and torch.equal(got[1], y)
    state = ahead.get_state()  # the thread has read past batch 3; the saved position must not be
    ahead.close()
    resumed = BatchSampler(data, "train", 16, 4, "cuda", seed=3)
    resumed.set_state(state)
    resumed_ahead = CudaPrefetcher(resumed)
    for x, y in expected[3:]:
        got = resumed_ahead()
        assert torch.equal(got[0], x) and torch.equal(got[1], y)
    resumed_ahead.close()


def test_every_stream_has_its_own_number_and_unknown_streams_are_refused():
    from raypipe.data import STREAMS, split_seed

    assert len(set(STREAMS.values())) == len(STREAMS)
    seeds = {split_seed(1, 0, "train", s) for s in STREAMS}
    assert len(seeds) == len(STREAMS)
    with pytest.raises(ValueError, match="stream 'lave': expected one of batches, eval, probe"):
        split_seed(1, 0, "train", "lave")  # an anagram of eval: once the same windows, now refused
