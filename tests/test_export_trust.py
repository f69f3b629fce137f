"""Export never damages what it reads or replaces anything half-done; generate checks its flags first.

Real checkpoints from the plain loop (no Ray), real prepared data, transformers loading from local files.
"""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raypipe.corpus import stories
from raypipe.export import main as export_main
from raypipe.generate import main as generate_main
from raypipe.loop import WorkerEnv, train
from raypipe.model import GemmaLM
from raypipe.prepare import prepare
from raypipe.sampling import generate, sample_next

from helpers import tiny_config


def train_checkpoint(data_dir: Path, root: Path) -> Path:
    """A tiny model trained for a few steps; its checkpoint kept as root/run/checkpoint_0000010."""
    cfg = tiny_config(data_dir, root / "storage", max_steps=10, eval_interval=10, eval_batches=1, sample_tokens=0)
    cfg.wandb.mode = "disabled"
    run = root / "run"
    run.mkdir(parents=True)
    train(cfg, WorkerEnv(report=lambda metrics, ck: ck and ck.rename(run / ck.name), log=lambda _: None,
                         out_dir=root / "wandb"))
    return run / "checkpoint_0000010"


def digests(root: Path) -> dict:
    """Every file under `root` (hidden ones included) and its sha256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def siblings(path: Path) -> list[str]:
    """Hidden entries beside `path` that start with its name: temporary directories left behind."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


@pytest.fixture(scope="module")
def checkpoint(embedded_data, tmp_path_factory) -> Path:
    return train_checkpoint(embedded_data, tmp_path_factory.mktemp("export"))


# --- class 1: export never writes into what it reads, and replaces nothing half-done -----------------------


def copy_as(src: Path, dest: Path, kind: str) -> Path:
    """`dest` made into another checkpoint, a run directory or a data directory (real files copied)."""
    if kind == "checkpoint":
        shutil.copytree(src, dest)
    elif kind == "run":
        shutil.copytree(src, dest / "checkpoint_0000010")
        (dest / "summary.json").write_text(json.dumps({"best_checkpoint": str(dest / "checkpoint_0000010")}))
    return dest


@pytest.mark.parametrize("where", ["itself", "inside it", "its run directory", "another checkpoint",
                                   "inside another run directory", "a data directory", "one holding a checkpoint"])
@pytest.mark.parametrize("force", [False, True])
def test_export_never_writes_into_raypipe_directories(checkpoint, embedded_data, tmp_path, capsys, where, force):
    run = checkpoint.parent
    targets = {
        "itself": (checkpoint, checkpoint),
        "inside it": (checkpoint / "hf", checkpoint),
        "its run directory": (run, run),
        "another checkpoint": (copy_as(checkpoint, tmp_path / "other", "checkpoint"),) * 2,
        "inside another run directory": (copy_as(checkpoint, tmp_path / "run2", "run") / "hf", tmp_path / "run2"),
        "a data directory": (shutil.copytree(embedded_data, tmp_path / "data"),) * 2,
        "one holding a checkpoint": (copy_as(checkpoint, tmp_path / "box" / "old" / "ck", "checkpoint").parents[1],) * 2,
    }
    out, guarded = targets[where]
    before, source_before = digests(guarded), digests(checkpoint)
    assert export_main([str(checkpoint), str(out)] + ["--force"] * force) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: OUT_DIR {out}: ") and "choose" in err, err
    assert digests(guarded) == before and digests(checkpoint) == source_before  # byte-identical
    assert not (checkpoint / "hf").exists() and not siblings(out)


def test_export_from_a_run_directory_into_it_is_refused(checkpoint, capsys):
    before = digests(checkpoint.parent)
    assert export_main([str(checkpoint.parent), str(checkpoint.parent / "hf"), "--force"]) == 2
    assert f"lies inside {checkpoint.parent}, which is a raypipe run directory" in capsys.readouterr().err
    assert digests(checkpoint.parent) == before


def test_non_empty_out_dir_needs_force_and_is_replaced_whole(checkpoint, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export_main([str(checkpoint), str(out)]) == 2
    assert f"error: OUT_DIR {out}: exists and is not empty; pass --force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"

    assert export_main([str(checkpoint), str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]
    assert not siblings(out)
    # An empty directory needs no --force; a file in OUT_DIR's place is never replaced.
    (tmp_path / "empty").mkdir()
    assert export_main([str(checkpoint), str(tmp_path / "empty")]) == 0 and (tmp_path / "empty" / "config.json").is_file()
    (tmp_path / "file").write_text("x")
    assert export_main([str(checkpoint), str(tmp_path / "file"), "--force"]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err and (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("fault", [RuntimeError("fault while writing"), OSError(28, "No space left on device")])
@pytest.mark.parametrize("existing", [False, True])
def test_a_fault_mid_export_leaves_out_dir_as_it_was(checkpoint, tmp_path, monkeypatch, capsys, fault, existing):
    import safetensors.torch

    out = tmp_path / "hf"
    if existing:  # a previous export, to be replaced with --force
        assert export_main([str(checkpoint), str(out)]) == 0
    before = digests(out) if existing else None

    def half_write(tensors, filename, metadata=None):  # a fault after part of the file is on disk
        Path(filename).write_bytes(b"\0" * 1000)
        raise fault

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    argv = [str(checkpoint), str(out), "--force"]
    if isinstance(fault, OSError):  # the user's to fix: a clear error
        assert export_main(argv) == 2
        assert capsys.readouterr().err.startswith(f"error: OUT_DIR {out}: could not be written ([Errno 28]")
    else:
        with pytest.raises(RuntimeError, match="fault while writing"):
            export_main(argv)
    assert (digests(out) == before) if existing else not out.exists()
    assert not siblings(out)


# --- class 10: the end-of-text token prepare chose is the exported bos/eos/pad ---------------------------


@pytest.fixture(scope="module")
def eot_checkpoint(tmp_path_factory) -> tuple[Path, int]:
    """Data prepared with a tokenizer.json whose end-of-text is `</s>` (and which also has <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("eot")
    docs = stories(800, seed=3)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    tok.save(str(root / "tokenizer.json"))
    (root / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    meta = prepare([str(root / "corpus.txt")], root / "data", str(root / "tokenizer.json"), val_fraction=0.1,
                   eot="</s>", workers=1, progress=False, log=lambda _: None)
    assert meta["eot_id"] == tok.token_to_id("</s>") == 2
    return train_checkpoint(root / "data", root), meta["eot_id"]


def test_export_uses_the_datas_end_of_text_token(eot_checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    ckpt, eot_id = eot_checkpoint
    out = tmp_path / "hf"
    assert export_main([str(ckpt), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (eot_id,) * 3
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["pad_token"]) == ("</s>",) * 3

    # transformers, from the local directory only, sees one end-of-text id in the model and the tokenizer.
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (eot_id,) * 3
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (eot_id,) * 3
    assert model.generation_config.eos_token_id == eot_id


# --- class 10: generate checks every flag before loading anything ----------------------------------------


BAD_FLAGS = [
    (["--top-k", "-1"], "--top-k -1: expected an integer >= 0"),
    (["--num-samples", "0"], "--num-samples 0: expected an integer >= 1"),
    (["--num-samples", "-2"], "--num-samples -2: expected an integer >= 1"),
    (["--max-new-tokens", "-5"], "--max-new-tokens -5: expected an integer >= 0"),
    (["--temperature", "-0.5"], "--temperature -0.5: expected a finite number >= 0"),
    (["--temperature", "nan"], "--temperature nan: expected a finite number >= 0"),
    (["--temperature", "inf"], "--temperature inf: expected a finite number >= 0"),
    (["--seed", "-1"], "--seed -1: expected an integer in [0, 2**64)"),
    (["--device", "gpu"], "--device gpu: not a device name; expected cpu, cuda, cuda:N or mps"),
    (["--device", "meta"], "--device meta: expected cpu, cuda, cuda:N or mps"),
    (["--device", "cuda:99"], "--device cuda:99: "),
    (["--prompt", "caf\udce9 au lait"], "--prompt 'caf\\xe9 au lait': not valid UTF-8 (\\xe9 at character 4)"),
    (["--prompt", "a\ud800"], "--prompt 'a\\ud800': not valid UTF-8 (\\ud800 at character 2)"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_generate_refuses_bad_flags_before_loading(checkpoint, tmp_path, capsys, flags, message):
    # A checkpoint that does not exist: the flag must be refused first, whatever follows.
    assert generate_main([str(tmp_path / "no-checkpoint")] + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert generate_main([str(checkpoint)] + flags) == 2  # and with a real one


def test_generate_accepts_the_boundary_values(checkpoint, capsys):
    argv = [str(checkpoint), "--prompt", "Once", "--top-k", "0", "--temperature", "0", "--device", "cpu"]
    assert generate_main(argv + ["--max-new-tokens", "0", "--num-samples", "2"]) == 0
    assert capsys.readouterr().out == "Once\n---\nOnce\n---\n"  # nothing new, two samples
    assert generate_main(argv + ["--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("Once")


def test_generate_cli_refuses_an_invalid_utf8_prompt_from_argv(checkpoint):
    # The bytes a shell passes when the prompt is Latin-1: Python decodes them with surrogateescape.
    r = subprocess.run([sys.executable, "-m", "raypipe.generate", str(checkpoint), "--prompt", b"caf\xe9"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, LC_ALL="C.UTF-8"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: --prompt 'caf\\xe9': not valid UTF-8") and "Traceback" not in r.stderr


# --- the library refuses the same values, naming the argument -------------------------------------------


@pytest.mark.parametrize("kwargs, name", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"), (dict(top_k=-3), "top_k"), (dict(top_k=True), "top_k"),
])
def test_library_sampling_refuses_bad_values(kwargs, name):
    from raypipe.config import ModelConfig

    model = GemmaLM(ModelConfig(vocab_size=50, n_layer=1, n_embd=16, n_head=2, n_kv_head=1, head_dim=8,
                                mlp_hidden=32, sliding_window=4, global_every=1))
    args = dict(max_new_tokens=3, temperature=1.0, top_k=None) | kwargs
    with pytest.raises(ValueError, match=rf"^{name}="):
        generate(model, torch.zeros(1, 2, dtype=torch.long), **args)
    if name != "max_new_tokens":
        with pytest.raises(ValueError, match=rf"^{name}="):
            sample_next(torch.zeros(1, 50), args["temperature"], args["top_k"], None)
    for idx in (torch.zeros(0, 2, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 2),
                torch.full((1, 2), 50)):
        with pytest.raises(ValueError, match=r"^idx: "):
            generate(model, idx, 3)
