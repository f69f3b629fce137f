"""python -m raypipe.prepare on corpora written here, in each format, and the checks training relies on."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import raypipe.documents as documents
import raypipe.tokenize_files as tokenize_files
from raypipe.corpus import stories
from raypipe.data import DataError, VERIFIED, read_meta, validate_data, write_dataset
from raypipe.documents import PrepareError
from raypipe.prepare import main, prepare
from raypipe.tokenizer import TokenizerError, byte_spec, gpt2_spec

DOCS = stories(600, seed=7)
QUIET = dict(progress=False, log=lambda _: None)


def byte_docs(data_dir: Path, split: str) -> list[str]:
    """Decode a byte-tokenized split back into its documents (256 is the end-of-text id)."""
    ids = np.fromfile(data_dir / f"{split}.bin", dtype=np.uint16)
    assert ids.size and ids[-1] == 256  # every document, the last included, ends with end-of-text
    ends = np.flatnonzero(ids == 256)
    starts = np.r_[0, ends[:-1] + 1]
    return [ids[a:b].astype(np.uint8).tobytes().decode("utf-8") for a, b in zip(starts, ends)]


def write_corpus(root: Path) -> list[str]:
    """The same kind of stories in txt, jsonl and parquet, with empty documents in each; returns the
    documents prepare must find, in order."""
    root.mkdir(parents=True, exist_ok=True)
    txt, jsonl, parquet = DOCS[:200], DOCS[200:400], DOCS[400:]
    # Blank lines of several kinds separate documents; surrounding whitespace is not part of them.
    (root / "a.txt").write_text("\n\n" + "\n\n".join(txt[:100]) + "\n\n\n  \n" + "\n \t\n".join(txt[100:]) + "\n")
    records = [{"text": t, "id": i} for i, t in enumerate(jsonl)]
    records[5:5] = [{"text": ""}, {"text": None}]  # empty documents
    (root / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    pq.write_table(pa.table({"text": parquet[:50] + ["", None] + parquet[50:], "n": list(range(202))}),
                   root / "c.parquet", row_group_size=64)
    return txt + jsonl + parquet


def assert_split_of(expected: list[str], train: list[str], val: list[str]) -> None:
    assert sorted(train + val) == sorted(expected)
    order = {d: i for i, d in enumerate(expected)}  # each split keeps the input order
    assert [order[d] for d in train] == sorted(order[d] for d in train)
    assert [order[d] for d in val] == sorted(order[d] for d in val)


def test_all_formats_byte_exact_with_empty_documents(tmp_path):
    expected = write_corpus(tmp_path / "in")
    meta = prepare([str(tmp_path / "in")], tmp_path / "out", "byte", val_fraction=0.2, workers=2, **QUIET)
    out = tmp_path / "out"
    train, val = byte_docs(out, "train"), byte_docs(out, "val")
    assert_split_of(expected, train, val)
    assert 0.1 < len(val) / len(expected) < 0.3  # the hash split is near the asked fraction
    assert meta == read_meta(out) and meta["documents"] == {"train": len(train), "val": len(val)}
    assert meta["source"]["empty_documents"] == 4 and meta["source"]["invalid_utf8_bytes"] == 0
    assert meta["tokens"]["train"] == sum(len(d.encode()) + 1 for d in train)
    assert (meta["vocab_size"], meta["dtype"], meta["eot_id"]) == (257, "uint16", 256)
    assert meta["tokenizer"] == {"kind": "byte", "file": None, "vocab_size": 257}
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    validate_data(out, block_size=64)  # what training checks first


@pytest.mark.parametrize("mode, text, docs", [
    ("line", "one\n\ntwo  \r\nthree\n", ["one", "two", "three"]),
    ("blank", "a\nb\n\n\nc\n  \nd", ["a\nb", "c", "d"]),
    ("eot", "Once.\n\nThe end.\n<|endoftext|>\nTwo.\n <|endoftext|> \nThree <|endoftext|> inline\n<|endoftext|>\n",
     ["Once.\n\nThe end.", "Two.", "Three <|endoftext|> inline"]),
])
def test_txt_split_rules(tmp_path, mode, text, docs):
    (tmp_path / "t.txt").write_text(text)
    (tmp_path / "v.txt").write_text("held out\n")
    prepare([str(tmp_path / "t.txt")], tmp_path / "out", "byte", val_inputs=[str(tmp_path / "v.txt")],
            txt_split=mode, workers=1, **QUIET)
    assert byte_docs(tmp_path / "out", "train") == docs
    assert byte_docs(tmp_path / "out", "val") == ["held out"]


def test_chunk_cuts_never_split_a_document(tmp_path, monkeypatch):
    expected = write_corpus(tmp_path / "in")
    (tmp_path / "in" / "e.txt").write_text("\n<|endoftext|>\n".join(DOCS[:150]) + "\n<|endoftext|>\n")
    one = prepare([str(tmp_path / "in")], tmp_path / "one", "byte", txt_split="eot", workers=1, **QUIET)
    monkeypatch.setattr(documents, "CHUNK_BYTES", 700)  # dozens of chunks per file
    many = prepare([str(tmp_path / "in")], tmp_path / "many", "byte", txt_split="eot", workers=2, **QUIET)
    assert one["sha256"] == many["sha256"] and one["documents"] == many["documents"]
    # The blank-line and jsonl cuts, against what the documents must be.
    blank = prepare([str(tmp_path / "in" / n) for n in ("a.txt", "b.jsonl")], tmp_path / "blank", "byte",
                    workers=2, **QUIET)
    assert_split_of(expected[:400], byte_docs(tmp_path / "blank", "train"), byte_docs(tmp_path / "blank", "val"))
    assert blank["documents"]["train"] + blank["documents"]["val"] == 400


def test_rerun_gives_identical_bytes_and_tokenizer_json_reuses_them(tmp_path):
    write_corpus(tmp_path / "in")
    inputs = [str(tmp_path / "in" / "*")]  # a glob
    a = prepare(inputs, tmp_path / "a", "bpe:400", val_fraction=0.1, workers=1, **QUIET)
    prepare(inputs, tmp_path / "b", "bpe:400", val_fraction=0.1, workers=2, **QUIET)
    for name in ("train.bin", "val.bin", "meta.json", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a["tokenizer"] == {"kind": "bpe", "file": "tokenizer.json", "vocab_size": 400} and a["eot_id"] == 0
    # The same tokenizer.json given as a path encodes the same corpus to the same tokens.
    c = prepare(inputs, tmp_path / "c", str(tmp_path / "a" / "tokenizer.json"), val_fraction=0.1, **QUIET)
    assert c["sha256"] == a["sha256"] and c["tokenizer"]["kind"] == "file"
    # Another seed draws another val set.
    prepare(inputs, tmp_path / "d", "byte", val_fraction=0.1, seed=1, **QUIET)
    prepare(inputs, tmp_path / "e", "byte", val_fraction=0.1, **QUIET)
    assert byte_docs(tmp_path / "d", "val") != byte_docs(tmp_path / "e", "val")


def test_non_utf8_bytes_are_replaced_and_reported(tmp_path, capsys):
    good = "A cat sat.\n\n"
    (tmp_path / "bad.txt").write_bytes(good.encode() + b"Caf\xe9 \xff\xfe ok \xe2\x82 cut\n\nLast one.\n")
    (tmp_path / "v.txt").write_text("val doc")
    meta = prepare([str(tmp_path / "bad.txt")], tmp_path / "out", "byte", val_inputs=[str(tmp_path / "v.txt")],
                   progress=False)
    assert byte_docs(tmp_path / "out", "train") == ["A cat sat.", "Caf\ufffd \ufffd\ufffd ok \ufffd cut", "Last one."]
    assert meta["source"]["invalid_utf8_bytes"] == 5  # bytes: a cut 3-byte sequence is 2 bytes, one U+FFFD
    assert meta["source"]["first_invalid_utf8"] == f"{(tmp_path / 'bad.txt').resolve()} at byte {len(good) + 3}"
    assert "5 invalid UTF-8 bytes or lone surrogates replaced by U+FFFD" in capsys.readouterr().out


@pytest.mark.parametrize("tokenizer", ["byte", "bpe:300"])
def test_lone_surrogates_are_replaced_and_reported(tmp_path, capsys, monkeypatch, tokenizer):
    # A lone surrogate escape is valid JSON but no UTF-8 text: like an invalid byte it becomes U+FFFD,
    # counted and reported, for every tokenizer (the tokenizers library raised a TypeError on one).
    odd = ('{"text": "lone \\ud800 high, lone \\uDFFF low, a pair \\ud83d\\ude00, an escaped \\\\ud800"}\n',
           '{"id": "\\udc00", "text": "another key holds the surrogate"}\n')  # not the text: nothing replaced
    fixed = "lone \ufffd high, lone \ufffd low, a pair \U0001F600, an escaped \\ud800"
    lines = [json.dumps({"text": d}) + "\n" for d in DOCS[:100]]
    lines[20:20], lines[60:60] = [odd[0]], [odd[1]]
    (tmp_path / "s.jsonl").write_text("".join(lines))
    monkeypatch.setattr(documents, "CHUNK_BYTES", 3000)  # chunks with a surrogate record by record, others not
    meta = prepare([str(tmp_path / "s.jsonl")], tmp_path / "s", tokenizer, val_fraction=0.2, workers=1, progress=False)
    at = len("".join(lines[:20]).encode())  # the record's first byte
    where = f"{(tmp_path / 's.jsonl').resolve()}: a lone surrogate in the record at byte {at}"
    assert meta["source"]["invalid_utf8_bytes"] == 2 and meta["source"]["first_invalid_utf8"] == where
    assert f"2 invalid UTF-8 bytes or lone surrogates replaced by U+FFFD (first: {where})" in capsys.readouterr().out
    # The same corpus with U+FFFD already in place goes through pyarrow's reader (the surrogates sent their
    # chunk record by record): the same tokens in the same splits, only the count differs.
    lines[20], lines[60] = json.dumps({"text": fixed}) + "\n", odd[1].replace("\\udc00", "\\ufffd")
    (tmp_path / "f.jsonl").write_text("".join(lines))
    assert documents._jsonl_column((tmp_path / "f.jsonl").read_bytes(), "text") is not None
    assert documents._jsonl_column((tmp_path / "s.jsonl").read_bytes(), "text") is None
    clean = prepare([str(tmp_path / "f.jsonl")], tmp_path / "f", tokenizer, val_fraction=0.2, workers=1, **QUIET)
    assert clean["source"]["invalid_utf8_bytes"] == 0 and clean["documents"] == meta["documents"]
    for name in ("train.bin", "val.bin") + (("tokenizer.json",) if tokenizer != "byte" else ()):
        assert (tmp_path / "s" / name).read_bytes() == (tmp_path / "f" / name).read_bytes(), name
    if tokenizer == "byte":
        out = (tmp_path / "s" / "train.bin").read_bytes() + (tmp_path / "s" / "val.bin").read_bytes()
        ids = np.frombuffer(out, np.uint16)
        assert bytes([0xEF, 0, 0xBF, 0, 0xBD, 0]) in out and not np.isin(ids, [0xED]).any()  # no surrogate bytes
        assert fixed in byte_docs(tmp_path / "s", "train") + byte_docs(tmp_path / "s", "val")
    # A re-run gives the same bytes.
    again = prepare([str(tmp_path / "s.jsonl")], tmp_path / "again", tokenizer, val_fraction=0.2, workers=2, **QUIET)
    assert again == meta
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "s" / name).read_bytes()


def test_missing_text_column_names_file_and_columns(tmp_path, capsys):
    pq.write_table(pa.table({"story": ["x"], "id": [1]}), tmp_path / "s.parquet")
    with pytest.raises(PrepareError, match=r"s.parquet: no column 'text' \(--text-column\); its columns are story, id"):
        prepare([str(tmp_path / "s.parquet")], tmp_path / "out", "byte", **QUIET)
    (tmp_path / "s.jsonl").write_text('{"story": "x", "id": 1}\n')
    with pytest.raises(PrepareError, match=r"s.jsonl: line 1 has no key 'text' .*its keys are story, id"):
        prepare([str(tmp_path / "s.jsonl")], tmp_path / "out", "byte", **QUIET)
    # The CLI: exit status 2 and the message, nothing written.
    assert main([str(tmp_path / "s.parquet"), "--out", str(tmp_path / "out"), "--tokenizer", "byte",
                 "--text-column", "body"]) == 2
    assert "no column 'body'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_failure_mid_way_leaves_nothing(tmp_path, monkeypatch):
    lines = [json.dumps({"text": d}) for d in DOCS[:300]]
    lines[250] = json.dumps({"body": "wrong key"})  # past the first record, so found while writing
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(documents, "CHUNK_BYTES", 2000)  # several chunks written before the bad one
    with pytest.raises(PrepareError, match=r"c.jsonl: the record at byte \d+ has no key 'text'.*keys are body"):
        prepare([str(tmp_path / "c.jsonl")], tmp_path / "out", "byte", workers=2, **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]  # no out, no temporary directory


def test_empty_inputs_are_clear_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(PrepareError, match=r"no input: .*empty.txt hold no bytes"):
        prepare([str(tmp_path / "empty.txt")], tmp_path / "out", "byte", **QUIET)
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": null}\n')
    with pytest.raises(PrepareError, match=r"no documents in .*blank.jsonl: every document is empty \(2 empty"):
        prepare([str(tmp_path / "blank.jsonl")], tmp_path / "out", "byte", **QUIET)
    with pytest.raises(PrepareError, match=r"nothing.txt: no such file, directory or matching glob"):
        prepare([str(tmp_path / "nothing.txt")], tmp_path / "out", "byte", **QUIET)
    (tmp_path / "few.txt").write_text("one\n\ntwo\n")
    with pytest.raises(PrepareError, match=r"val split is empty: none of the 2 documents.*--val-fraction"):
        prepare([str(tmp_path / "few.txt")], tmp_path / "out", "byte", val_fraction=0.01, **QUIET)
    with pytest.raises(PrepareError, match=r"few.txt is both an INPUT and a --val input"):
        prepare([str(tmp_path)], tmp_path / "out", "byte", val_inputs=[str(tmp_path / "few.txt")], **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.jsonl", "empty.txt", "few.txt"]


def test_tokenizer_specs_are_checked_first(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello\n\nworld\n")
    for spec, msg in [("gpt3", r"unknown --tokenizer 'gpt3': expected gpt2, bpe:VOCAB"),
                      ("bpe:100", r"at least 257"), ("bpe:x", r"at least 257"),
                      (str(tmp_path / "no" / "tokenizer.json"), r"no such file")]:
        with pytest.raises(TokenizerError, match=msg):
            prepare([str(tmp_path / "a.txt")], tmp_path / "out", spec, **QUIET)
    assert main([str(tmp_path / "a.txt"), "--out", str(tmp_path / "out"), "--tokenizer", "word"]) == 2
    assert "unknown --tokenizer 'word'" in capsys.readouterr().err


def test_tokenizer_json_without_eot_lists_its_specials(tmp_path):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.add_special_tokens(["</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("a\n")
    with pytest.raises(TokenizerError, match=r"no end-of-text token '<\|endoftext\|>'; pass --eot .*</s>"):
        prepare([str(tmp_path / "a.txt")], tmp_path / "out", str(tmp_path / "tokenizer.json"), **QUIET)


def test_gpt2_offline_without_cache_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    # Offline for urllib whatever this machine's network: every https request goes to a closed port.
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    start = time.perf_counter()
    with pytest.raises(TokenizerError, match=r"not cached in .*cache.*TIKTOKEN_CACHE_DIR.*bpe:VOCAB.*byte") as e:
        gpt2_spec()
    assert time.perf_counter() - start < 5
    assert str(tmp_path / "cache") in str(e.value)


def test_cli_end_to_end(tmp_path):
    write_corpus(tmp_path / "in")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "raypipe.prepare", str(tmp_path / "in" / "a.txt"),
                        str(tmp_path / "in" / "c.parquet"), "--out", str(out), "--tokenizer", "bpe:300",
                        "--val", str(tmp_path / "in" / "b.jsonl"), "--workers", "2"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert r.returncode == 0, r.stderr
    assert "docs" in r.stderr and "MB/s" in r.stderr  # the progress line
    meta = read_meta(out)
    assert meta["documents"] == {"train": 400, "val": 200} and (out / "tokenizer.json").is_file()
    assert meta["source"]["val_fraction"] is None and meta["source"]["val_inputs"][0].endswith("b.jsonl")


# --- what training refuses (validate_data runs in the driver before any worker starts) ----------------


def small_data(root: Path, vocab: int = 1000, dtype: str = "uint16") -> Path:
    ids = np.arange(5000) % vocab
    return write_dataset(root / "d", {"train": [ids], "val": [ids[:500]]}, {"vocab_size": vocab, "dtype": dtype}) and root / "d"


def edit_meta(data: Path, **changes) -> None:
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, **changes}))


def test_training_refuses_token_ids_outside_the_vocab(tmp_path):
    data = small_data(tmp_path)
    edit_meta(data, vocab_size=500)  # the files hold ids up to 999
    with pytest.raises(DataError, match=r"train.bin: token id 999 \(at position 999\) is not below meta.json's vocab_size 500"):
        validate_data(data, 16)


def test_training_refuses_changed_files_and_caches_verification(tmp_path):
    data = small_data(tmp_path)
    validate_data(data, 16)
    entry = json.loads((data / VERIFIED).read_text())["train"]
    assert entry["size"] == 10_000 and entry["max_id"] == 999  # later starts only stat the files
    with open(data / "train.bin", "r+b") as f:  # same size, other content
        f.seek(100)
        f.write(b"\x01\x00")
    with pytest.raises(DataError, match=r"train.bin: sha256 .* does not match meta.json's"):
        validate_data(data, 16)
    validate_data(data, 16, verify=False)  # sizes alone still pass


def test_training_refuses_a_dtype_mismatch(tmp_path):
    data = small_data(tmp_path, dtype="uint32")
    edit_meta(data, dtype="uint16")
    with pytest.raises(DataError, match=r"train.bin: holds 10000 tokens but meta.json says 5000; its size fits uint32"):
        validate_data(data, 16)
    edit_meta(data, dtype="uint16", vocab_size=70_000)
    with pytest.raises(DataError, match=r"dtype uint16 cannot hold vocab_size 70000; expected uint32"):
        validate_data(data, 16)


# --- the fast paths give what the plain ones give -------------------------------------------------------


def test_import_does_not_load_torch():
    # prepare's start-up was 1.2 s of torch import before its first byte; the writer needs numpy only.
    code = "import sys, raypipe.prepare; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


JSONL_ODD = {  # a chunk of each kind the pyarrow reader leaves to the record-by-record parser
    "blank line": '{"text": "a b"}\n\n{"text": "c"}\n',
    "blank first line": ' \n{"text": "d"}\n',
    "null": '{"text": null}\n{"text": "e"}\n',
    "two values on a line": '{"text": "f"} {"text": "g"}\n',
    "two values and a blank line": '{"text": "f"} {"text": "g"}\n\n{"text": "h"}\n',  # as many rows as lines
    "lone surrogate": '{"text": "h\\ud800i"}\n',
    "number": '{"text": 5}\n',
}


def test_jsonl_reader_takes_clean_chunks_only():
    clean = "".join(json.dumps({"text": d, "id": i, "meta": {"x": [1, None]}}) + "\n" for i, d in enumerate(DOCS[:50]))
    col = documents._jsonl_column(clean.encode(), "text")
    assert col is not None and col.to_pylist() == DOCS[:50]
    assert documents._jsonl_column(clean.encode()[:-1], "text") is not None  # the last line may lack its newline
    for kind, text in JSONL_ODD.items():
        assert documents._jsonl_column(text.encode(), "text") is None, kind
    assert documents._jsonl_column(b'{"text": "caf\xe9"}\n', "text") is None  # invalid UTF-8: replaced and counted
    assert documents._jsonl_column(b'{"body": "x"}\n', "text") is None  # a missing key: named in the error


@pytest.mark.parametrize("tokenizer", ["byte", "bpe:300"])
def test_jsonl_reader_and_record_parser_give_the_same_bytes(tmp_path, monkeypatch, tokenizer):
    errors = ["number", "two values on a line", "two values and a blank line"]  # errors in both parsers
    odd = {k: v for k, v in JSONL_ODD.items() if k not in errors}
    lines = [json.dumps({"text": d}) + "\n" for d in DOCS[:300]]
    for i, text in enumerate(odd.values()):  # odd records among clean ones, in chunks of their own and not
        lines.insert(40 * (i + 1), text)
    lines.insert(20, '{"text": ""}\n')
    (tmp_path / "c.jsonl").write_text("".join(lines))
    monkeypatch.setattr(documents, "CHUNK_BYTES", 3000)
    fast = prepare([str(tmp_path / "c.jsonl")], tmp_path / "fast", tokenizer, val_fraction=0.2, workers=2, **QUIET)
    monkeypatch.setattr(documents, "_jsonl_column", lambda data, column: None)  # every chunk record by record
    plain = prepare([str(tmp_path / "c.jsonl")], tmp_path / "plain", tokenizer, val_fraction=0.2, workers=2, **QUIET)
    assert fast == plain and fast["source"]["empty_documents"] == 2
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


def test_arrow_documents_drop_nulls_and_empties_of_a_slice():
    import pyarrow as pa

    for typ in (pa.string(), pa.large_string()):
        arr = pa.array(["zz", "a", None, "", "bé", None, "c", "tail"], typ).slice(1, 6)
        d = documents.from_arrow(arr)
        assert d.strings() == ["a", "bé", "c"] and d.empty == 3
        assert [d.data[a:b].tobytes().decode() for a, b in zip(d.offsets, d.offsets[1:])] == ["a", "bé", "c"]


def test_workers_send_tokens_through_shared_memory(tmp_path, monkeypatch):
    import mmap

    write_corpus(tmp_path / "in")
    monkeypatch.setattr(documents, "CHUNK_BYTES", 5000)  # txt/jsonl chunks fit a slot; parquet row groups (~30 KB) do not
    opts, spec = documents.Options(val_fraction=0.2), byte_spec()
    tasks = list(documents.plan_tasks(documents.expand_inputs([str(tmp_path / "in")]), opts))
    via = {"slot": 0, "pipe": 0}
    for task, r in zip(tasks, tokenize_files.run_local(tasks, opts, spec, "uint16", workers=2)):
        expected = tokenize_files.tokenize_task(task, opts, spec, "uint16")
        assert np.array_equal(r.train, expected.train) and np.array_equal(r.val, expected.val)
        base = r.train  # array -> ... -> memoryview -> the shared mapping; else unpickled from the pipe
        while isinstance(base, (np.ndarray, memoryview)):
            base = base.obj if isinstance(base, memoryview) else base.base
        fits = r.train.size + r.val.size <= 2 * documents.CHUNK_BYTES  # a slot's size
        assert isinstance(base, mmap.mmap) == fits, task
        via["slot" if fits else "pipe"] += 1
    assert via["slot"] > 5 and via["pipe"] >= 3  # the parquet row groups of 64 documents do not fit
