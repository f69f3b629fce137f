import pytest
import torch

from raypipe.config import ModelConfig
from raypipe.model import GemmaLM, fused_linear


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=300, n_layer=4, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, mlp_hidden=96,
                sliding_window=8, global_every=2, query_pre_attn_scalar=24)
    return ModelConfig(**{**base, **kw})


def test_shapes_and_loss():
    model = GemmaLM(small())
    x = torch.randint(0, 300, (2, 20))
    logits, loss = model(x, x)
    assert logits.shape == (2, 20, 300) and loss.ndim == 0
    assert model(x)[1] is None


def test_causal_and_sliding_window_are_real():
    """One sliding layer with window 8: position i sees tokens i-7..i, nothing later, nothing older."""
    torch.manual_seed(0)
    model = GemmaLM(small(n_layer=1, global_every=2)).eval()
    x = torch.randint(0, 300, (1, 24))
    changed = x.clone()
    changed[0, 4] = (x[0, 4] + 1) % 300
    with torch.no_grad():
        diff = (model(x)[0] - model(changed)[0]).abs().amax(-1)[0]
    assert diff[:4].max() == 0  # earlier positions never see a later token
    assert (diff[4:12] > 0).all()  # inside the window: 4..11 see position 4
    assert diff[12:].max() == 0  # beyond the window: 12 - 8 = 4 is out of sight
    # A global layer sees everything before it.
    glob = GemmaLM(small(n_layer=1, global_every=1)).eval()
    with torch.no_grad():
        assert ((glob(x)[0] - glob(changed)[0]).abs().amax(-1)[0, 4:] > 0).all()


def test_fused_projections_equal_separate_ones_and_train_each_weight():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    projections = [torch.nn.Linear(16, n, bias=False).double() for n in (8, 4, 4)]
    weights = [torch.randn(3, 5, n, dtype=torch.float64) for n in (8, 4, 4)]  # each output weighted differently

    def grads(outs):
        for p in projections:
            p.weight.grad = None
        sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        return [p.weight.grad.clone() for p in projections]

    fused = fused_linear(x, *projections)
    separate = [p(x) for p in projections]
    assert [o.shape for o in fused] == [o.shape for o in separate]
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b)
    for a, b in zip(grads(fused), grads(separate)):
        torch.testing.assert_close(a, b)


def test_tied_head_shares_the_embedding():
    model = GemmaLM(small(tie_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.num_params() == GemmaLM(small()).num_params() - 300 * 64


transformers = pytest.importorskip("transformers")


def hf_config(cfg: ModelConfig):
    layer_types = ["sliding_attention" if (i + 1) % cfg.global_every else "full_attention" for i in range(cfg.n_layer)]
    return transformers.Gemma3TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim, sliding_window=cfg.sliding_window, layer_types=layer_types,
        query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim, rope_theta=cfg.rope_global_base,
        rope_local_base_freq=cfg.rope_local_base, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=1024, attn_logit_softcapping=None, final_logit_softcapping=None)


@pytest.mark.parametrize("cfg, seq", [
    (small(), 40),  # block larger than the window, sliding and global layers mixed
    (small(n_layer=6, global_every=6, n_kv_head=1, sliding_window=64, query_pre_attn_scalar=None), 32),
    (small(tie_embeddings=True, n_kv_head=4, sliding_window=5, global_every=3), 17),
])
def test_logits_match_transformers_gemma3(cfg, seq):
    torch.manual_seed(0)
    hf = transformers.Gemma3ForCausalLM(hf_config(cfg)).eval()
    with torch.no_grad():
        for p in hf.parameters():  # random everything, norm gains included (they start at 0)
            p.normal_(0, 0.3)
    ours = GemmaLM(cfg).eval()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    x = torch.randint(0, cfg.vocab_size, (2, seq))
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)[0]).abs().max().item()
    assert diff < 1e-4


def test_recipe_parameter_count_matches_transformers():
    from pathlib import Path

    from raypipe.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "gemma3-270m.yaml").model
    with torch.device("meta"):
        ours, theirs = GemmaLM(cfg), transformers.Gemma3ForCausalLM(hf_config(cfg))
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters()) == 164_654_976
