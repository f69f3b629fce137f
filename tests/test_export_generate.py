"""Export to Hugging Face, reload with transformers, and sample with a KV cache."""

import json

import pytest
import torch

from raypipe.checkpoint import load_model
from raypipe.config import Config, ModelConfig
from raypipe.generate import load_tokenizer, main as generate_main
from raypipe.sampling import generate
from raypipe.loop import WorkerEnv, train
from raypipe.model import GemmaLM


@pytest.fixture(scope="module")
def trained_checkpoint(embedded_data, tmp_path_factory):
    """The embedded default's model shape, trained briefly by the plain loop (no Ray needed)."""
    cfg = Config()
    cfg.data.dir, cfg.data.num_stories = str(embedded_data), 3000
    cfg.train.max_steps, cfg.train.eval_interval, cfg.train.eval_batches, cfg.train.warmup_steps = 30, 15, 2, 5
    cfg.wandb.mode = "disabled"
    kept, logs = tmp_path_factory.mktemp("ckpt"), []

    def report(metrics, checkpoint):
        checkpoint.rename(kept / checkpoint.name)

    train(cfg, WorkerEnv(report=report, log=logs.append))
    return kept / "checkpoint_0000030", logs


def test_samples_are_logged_at_each_eval(trained_checkpoint):
    _, logs = trained_checkpoint
    samples = [line for line in logs if "sample @ step" in line]
    assert len(samples) == 2 * 2  # two evals, two samples each
    assert all("'Once upon a time" in line for line in samples)


def test_kv_cache_generation_equals_full_recompute():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, n_layer=3, n_embd=48, n_head=4, n_kv_head=2, head_dim=12, mlp_hidden=64,
                      sliding_window=6, global_every=3)
    model = GemmaLM(cfg)
    prompt = torch.randint(0, 97, (2, 9))  # longer than the window already
    cached = generate(model, prompt, 25, temperature=0)
    full = generate(model, prompt, 25, temperature=0, use_cache=False)
    assert cached.shape == (2, 34) and torch.equal(cached, full)
    g1, g2 = (torch.Generator().manual_seed(3) for _ in range(2))
    assert torch.equal(generate(model, prompt, 10, 1.0, 5, g1), generate(model, prompt, 10, 1.0, 5, g2, use_cache=False))


def test_generate_cli(trained_checkpoint, capsys):
    ckpt, _ = trained_checkpoint
    assert generate_main([str(ckpt), "--prompt", "Once upon a time", "--max-new-tokens", "20", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Once upon a time") and len(out.split("---")[0]) > len("Once upon a time")
    assert generate_main([str(ckpt.parent / "nothing-here")]) == 2


transformers = pytest.importorskip("transformers")


def test_export_loads_in_transformers_with_the_same_logits(trained_checkpoint, tmp_path, capsys):
    from raypipe.export import main as export_main

    ckpt, _ = trained_checkpoint
    assert export_main([str(ckpt), str(tmp_path / "hf")]) == 0
    assert {p.name for p in (tmp_path / "hf").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}

    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(ckpt).eval()
    assert type(theirs).__name__ == "Gemma3ForCausalLM"
    x = torch.randint(0, ours.cfg.vocab_size, (2, 128))  # 128 > the sliding window of 64
    with torch.no_grad():
        assert (theirs(x).logits - ours(x)[0]).abs().max().item() < 1e-4

    # The exported tokenizer is raypipe's, and both models continue a prompt the same way.
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tok = load_tokenizer(ckpt)
    prompt = "Once upon a time, there was a little"
    ids = tok.encode(prompt)
    assert hf_tok(prompt, add_special_tokens=False)["input_ids"] == ids
    idx = torch.tensor([ids])
    ours_out = generate(ours, idx, 20, temperature=0)
    with torch.no_grad():
        theirs_out = theirs.generate(idx, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(idx),
                                     eos_token_id=None, pad_token_id=tok.eot_id)
    assert theirs_out.tolist() == ours_out.tolist()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
