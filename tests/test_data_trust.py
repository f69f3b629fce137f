"""Data a user can rely on: changed token files are caught whatever their mtime says, a malformed meta.json
is a clear error naming the key, long documents are encoded in pieces (flat memory, same text, no
end-of-text inside), and a killed prepare leaves nothing that lasts."""

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from raypipe.data import VERIFIED, DataError, validate_data, write_dataset
from raypipe.prepare import prepare
from raypipe.staging import read_remote_meta, stage_data
from raypipe.tokenizer import PIECE_CHARS, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(progress=False, log=lambda _: None)


def small_data(root: Path, vocab: int = 1000) -> Path:
    ids = np.arange(5000) % vocab
    write_dataset(root / "d", {"train": [ids], "val": [ids[:500]]}, {"vocab_size": vocab, "dtype": "uint16"}, log=print)
    return root / "d"


def change_a_byte_keep_mtime(path: Path) -> tuple[str, str]:
    """Overwrite one token in place (same size) and set atime/mtime back: (sha256 before, after)."""
    before, st = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat()
    with open(path, "r+b") as f:
        f.seek(200)
        f.write(b"\x07\x00")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    return before, hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "WANDB_MODE": "offline"})


# --- class 2: a changed byte is caught even with its mtime set back -------------------------------------


def test_changed_byte_with_mtime_restored_is_refused_by_validate_data(tmp_path):
    data = small_data(tmp_path)
    validate_data(data, 16)  # verified once: .verified.json now vouches for the files
    assert json.loads((data / VERIFIED).read_text())["train"]["sha256"]
    expected, found = change_a_byte_keep_mtime(data / "train.bin")
    with pytest.raises(DataError) as e:
        validate_data(data, 16)
    assert f"{data / 'train.bin'}: sha256 {found} does not match meta.json's {expected}" in str(e.value)


def test_changed_byte_with_mtime_restored_is_refused_by_train_dry_run(tmp_path):
    data = small_data(tmp_path)
    args = ["-m", "raypipe.train", "--set", "data.source=prepared", "--set", f"data.dir={data}",
            "--storage-path", str(tmp_path / "runs"), "--dry-run"]
    ok = run_cli(*args)
    assert ok.returncode == 0, ok.stderr
    assert (data / VERIFIED).is_file()  # the cache a later start trusts
    change_a_byte_keep_mtime(data / "val.bin")
    refused = run_cli(*args)
    assert refused.returncode == 2, refused.stderr
    assert f"error: {data / 'val.bin'}: sha256 " in refused.stderr and "Traceback" not in refused.stderr


def test_a_damaged_node_cache_with_mtime_restored_is_copied_again(embedded_data, tmp_path):
    shared = tmp_path / "shared" / "stories"
    shutil.copytree(embedded_data, shared, ignore=shutil.ignore_patterns(VERIFIED))
    local = stage_data(str(shared), tmp_path / "cache")
    change_a_byte_keep_mtime(local / "train.bin")
    assert stage_data(str(shared), tmp_path / "cache") == local
    assert (local / "train.bin").read_bytes() == (shared / "train.bin").read_bytes()


# --- class 6, data side: a malformed meta.json names the key --------------------------------------------

SHA = "0" * 64
MALFORMED = {  # name: (a change to meta.json, or its whole text; the key the message must name)
    "not json": ('{"vocab_size": 1000,', "not valid JSON"),
    "an array": ("[1000, 2000]", "holds a JSON array, expected an object"),
    "a string": ('"meta"', "holds a JSON string, expected an object"),
    "null": ("null", "holds a JSON null, expected an object"),
    "no vocab_size": ({"vocab_size": None}, "key 'vocab_size' is missing"),
    "vocab_size text": ({"vocab_size": "1000"}, "key 'vocab_size' is \"1000\""),
    "vocab_size bool": ({"vocab_size": True}, "key 'vocab_size' is true"),
    "vocab_size negative": ({"vocab_size": -3}, "key 'vocab_size' is -3"),
    "no dtype": ({"dtype": None}, "key 'dtype' is missing"),
    "dtype int8": ({"dtype": "int8"}, "key 'dtype' is \"int8\"; expected one of uint16, uint32"),
    "dtype list": ({"dtype": ["uint16"]}, "key 'dtype' is [\"uint16\"]"),
    "no tokens": ({"tokens": None}, "key 'tokens' is missing"),
    "tokens list": ({"tokens": [5000, 500]}, "key 'tokens' is [5000, 500]"),
    "tokens.train text": ({"tokens": {"train": "5000", "val": 500}}, "key 'tokens.train' is \"5000\""),
    "tokens.val missing": ({"tokens": {"train": 5000}}, "key 'tokens.val' is missing"),
    "no sha256": ({"sha256": None}, "key 'sha256' is missing"),
    "sha256 text": ({"sha256": SHA}, "key 'sha256' is \"000"),
    "sha256.train number": ({"sha256": {"train": 12, "val": SHA}}, "key 'sha256.train' is 12"),
    "sha256.val short": ({"sha256": {"train": SHA, "val": "abc"}}, "key 'sha256.val' is \"abc\""),
    "eot_id text": ({"eot_id": "7"}, "key 'eot_id' is \"7\""),
    "eot_id past vocab": ({"eot_id": 1000}, "key 'eot_id' is 1000; expected null or a token id from 0 to"),
    "tokenizer text": ({"tokenizer": "bpe"}, "key 'tokenizer' is \"bpe\""),
    "tokenizer null": ('{"vocab_size": 1000, "dtype": "uint16", "tokens": {"train": 5000, "val": 500}, '
                       '"sha256": {"train": "%s", "val": "%s"}, "tokenizer": null}' % (SHA, SHA), "key 'tokenizer' is null"),
    "tokenizer.kind number": ({"tokenizer": {"kind": 3}}, "key 'tokenizer.kind' is 3"),
    "tokenizer.file a path": ({"tokenizer": {"kind": "bpe", "file": "../../etc/passwd"}}, "key 'tokenizer.file' is"),
    "tokenizer.file number": ({"tokenizer": {"kind": "bpe", "file": 7}}, "key 'tokenizer.file' is 7"),
    "tokenizer.vocab_size text": ({"tokenizer": {"kind": "bpe", "vocab_size": "x"}}, "key 'tokenizer.vocab_size' is"),
}


def write_malformed(data: Path, change) -> Path:
    path = data / "meta.json"
    if isinstance(change, str):
        path.write_text(change)
    else:
        meta = {**json.loads(path.read_text()), **change}
        path.write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))
    return path


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_meta_json_names_the_file_and_key(tmp_path, case):
    change, expected = MALFORMED[case]
    data = small_data(tmp_path)
    meta_path = write_malformed(data, change)
    for check in (lambda: validate_data(data, 16), lambda: read_remote_meta(str(data)),
                  lambda: read_remote_meta(f"file://{data}")):
        with pytest.raises(DataError) as e:
            check()
        assert str(meta_path) in str(e.value) and expected in str(e.value) and "expected" in str(e.value)
    shutil.copy(meta_path, data / "data_meta.json")  # as a checkpoint carries it, for prompts
    with pytest.raises(DataError, match="data_meta.json") as e:
        load_tokenizer(data)
    assert expected in str(e.value)


def test_malformed_meta_json_is_exit_2_in_the_train_cli(tmp_path):
    data = small_data(tmp_path)
    write_malformed(data, {"tokens": {"train": "lots", "val": 500}})
    r = run_cli("-m", "raypipe.train", "--set", "data.source=prepared", "--set", f"data.dir={data}",
                "--storage-path", str(tmp_path / "runs"), "--dry-run")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"error: {data / 'meta.json'}: key 'tokens.train' is \"lots\"; expected a token count" in r.stderr


# --- class 8: long documents are encoded in pieces --------------------------------------------------------


def long_line(chars: int, spaces: bool, seed: int = 0) -> str:
    """One document of about `chars` characters: words (with single newlines), or letters alone."""
    rng = random.Random(seed)
    if not spaces:
        return "".join(rng.choices("abcdefgh", k=chars))
    words = ["the", "cat", "sat", "on", "a", "mat,", "and", "Lily", "said:", "\"yes!\"", "42", "end.\nThe", "  big"]
    return " ".join(rng.choices(words, k=chars // 4))[:chars].strip()


@pytest.mark.parametrize("spaces", [True, False], ids=["words", "no-whitespace"])
def test_a_long_document_is_split_for_encoding_without_eot_inside(tmp_path, spaces):
    line = long_line(4 * PIECE_CHARS, spaces)
    assert "\n\n" not in line and len(line) > 3 * PIECE_CHARS  # one document, several pieces
    (tmp_path / "long.txt").write_text(line + "\n")
    (tmp_path / "val.txt").write_text("A short story.\n")
    meta = prepare([str(tmp_path / "long.txt")], tmp_path / "out", "bpe:400", val_inputs=[str(tmp_path / "val.txt")],
                   workers=1, **QUIET)
    ids = np.fromfile(tmp_path / "out" / "train.bin", np.uint16).tolist()
    assert meta["documents"]["train"] == 1
    assert ids[-1] == meta["eot_id"] and meta["eot_id"] not in ids[:-1]  # one end-of-text: after the document
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert tok.decode(ids[:-1]) == line
    if spaces:  # cut at whitespace, where the pre-tokenizer splits anyway: the whole document's tokens
        assert ids[:-1] == tok.encode(line).ids


def test_an_8mb_line_keeps_prepare_memory_flat(tmp_path):
    """Peak RSS of a real `python -m raypipe.prepare --tokenizer bpe:N` on one long line (before: about
    200 bytes of memory per byte of the line, 6.5 GB for 30 MB)."""
    line = long_line(8_000_000, spaces=True, seed=1)
    (tmp_path / "long.txt").write_text(line + "\n")
    (tmp_path / "val.txt").write_text("A short story.\n")
    code = ("import resource, runpy, sys\n"
            "sys.argv = ['prepare', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('raypipe.prepare', run_name='__main__')\n"
            "finally:\n    print('peak_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")
    r = run_cli("-c", code, str(tmp_path / "long.txt"), "--val", str(tmp_path / "val.txt"), "--out",
                str(tmp_path / "out"), "--tokenizer", "bpe:500", "--workers", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    peak_mb = int(r.stderr.split("peak_kb")[1].split()[0]) / 1024
    # about 290 MB alone, up to 540 MB late in a full run (the interpreter's state varies); 1,590 MB before
    assert peak_mb < 800, f"peak RSS {peak_mb:.0f} MB for an 8 MB line"


# --- class 8: a killed prepare's temporary directory is removed by the next one ---------------------------


def test_a_sigkilled_prepare_leaves_a_temporary_the_next_prepare_removes(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(12):  # about 24 MB: seconds of BPE encoding, time enough to be killed mid-write
        (src / f"{i:02}.txt").write_text("\n\n".join(long_line(2000, True, seed=i * 1000 + j) for j in range(1000)))
    out = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-m", "raypipe.prepare", str(src), "--out", str(out),
                             "--tokenizer", "bpe:300", "--workers", "1", "--quiet"], cwd=ROOT)
    tmp = out.parent / f".data.tmp-{socket.gethostname()}-{proc.pid}"
    deadline = time.monotonic() + 120
    while not (tmp / "train.bin").is_file() or not (tmp / "train.bin").stat().st_size:
        assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp.is_dir() and not out.exists()  # nothing under the final name, meta.json least of all

    # Temporaries of a live writer (this process) and of another host are not touched.
    live = out.parent / f".data.tmp-{socket.gethostname()}-{os.getpid()}"
    elsewhere = out.parent / f".data.tmp-another-host-{proc.pid}"
    live.mkdir()
    elsewhere.mkdir()
    (tmp_path / "small.txt").write_text("One story.\n\nAnother story.\n\nA third one.\n")
    r = run_cli("-m", "raypipe.prepare", str(tmp_path / "small.txt"), "--out", str(out), "--tokenizer", "byte",
                "--val-fraction", "0.5", "--quiet")
    assert r.returncode == 0, r.stderr
    removed = [line for line in r.stdout.splitlines() if line.startswith("[raypipe] removed")]
    assert removed == [f"[raypipe] removed {tmp}: an unfinished write of {out} whose process ({proc.pid}) is gone"]
    assert not tmp.exists() and live.is_dir() and elsewhere.is_dir()
    validate_data(out, 2)
