"""The training step's own kernels (raypipe/kernels.py) and attention paths against PyTorch's plain ones.

CPU: the plain expressions are what runs (bit-equal to the model before the kernels), the
matmul attention equals SDPA, and the fused output head's chunk loop (with its PyTorch row step)
equals the plain head. GPU (skipped here): each Triton kernel against its reference, forward
and gradients, at bf16 tolerances, and the whole compiled model with and without them.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from raypipe import kernels
from raypipe.config import ModelConfig
from raypipe.model import GemmaLM, matmul_attention

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.triton), reason="needs a GPU and Triton")


def small_model(**changes) -> ModelConfig:
    return dataclasses.replace(ModelConfig(vocab_size=300, n_layer=2, n_embd=64, head_dim=16, mlp_hidden=96,
                                           sliding_window=8), **changes)


@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (4, 2), (2, 2)])
def test_matmul_attention_equals_sdpa(heads, kv_heads):
    torch.manual_seed(0)
    B, T, D = 3, 13, 8
    q = torch.randn(B, T, heads, D).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(B, T, kv_heads, D).transpose(1, 2).requires_grad_() for _ in range(2))
    ours = matmul_attention(q, k, v, 0.3)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=heads != kv_heads)
    ref = ref.transpose(1, 2).reshape(B, T, heads * D)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_model_attention_paths_agree_and_auto_is_sdpa_on_cpu():
    torch.manual_seed(0)
    idx = torch.randint(0, 300, (2, 8))  # T == sliding_window: every layer is plain causal
    outs = {}
    for attention in ("sdpa", "matmul", "auto"):
        torch.manual_seed(1)
        model = GemmaLM(small_model(attention=attention))
        logits, loss = model(idx, idx)
        loss.backward()
        outs[attention] = (logits, loss, model.layers[0].self_attn.q_proj.weight.grad)
    for a, b in zip(outs["matmul"], outs["sdpa"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(outs["auto"], outs["sdpa"]))  # CPU: auto is SDPA itself


def test_plain_expressions_run_on_cpu_bit_equal():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 40), torch.randint(0, 40, (6,))
    assert torch.equal(kernels.cross_entropy(logits, targets), F.cross_entropy(logits, targets))
    gate_up = torch.randn(5, 2 * 12)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(kernels.gated_gelu(gate_up), F.gelu(gate, approximate="tanh") * up)


def plain_head_loss(h, weight, targets, vocab):
    return F.cross_entropy(F.linear(h, weight[:vocab]).float(), targets)


@pytest.mark.parametrize("chunk_rows", [4, 10, 64])
def test_linear_cross_entropy_equals_the_plain_head_whatever_the_chunks(chunk_rows):
    """The chunked loop with its gradients made in the forward (here the PyTorch row step it uses off the
    GPU): the loss and both gradients of the plain matmul + cross-entropy, padded weight rows unseen."""
    torch.manual_seed(0)
    N, C, vocab, padded = 10, 8, 13, 16
    h, weight = torch.randn(N, C), torch.randn(padded, C)
    weight[vocab:] = 100.0  # padding rows: seen, they would dominate every softmax
    targets = torch.randint(0, vocab, (N,))
    a = h.clone().requires_grad_(), weight.clone().requires_grad_()
    b = h.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = kernels.linear_cross_entropy(*a, targets, vocab, chunk_rows=chunk_rows)
    ref = plain_head_loss(*b, targets, vocab)
    torch.testing.assert_close(ours, ref)
    (ours * 0.3).backward()
    (ref * 0.3).backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)
    assert torch.all(a[1].grad[vocab:] == 0)
    with torch.no_grad():  # evaluation: the loss alone, the same
        torch.testing.assert_close(kernels.linear_cross_entropy(h, weight, targets, vocab, chunk_rows=chunk_rows), ref)


@pytest.mark.parametrize("tied", [False, True])
def test_the_fused_head_trains_the_model_as_the_plain_head(tied):
    torch.manual_seed(0)
    cfg = small_model(vocab_size=300, vocab_pad_multiple=128, tie_embeddings=tied)
    idx = torch.randint(0, 300, (3, 8))
    results = []
    for head in (False, True):
        torch.manual_seed(1)
        model = GemmaLM(dataclasses.replace(cfg, fused_head=head))
        logits, loss = model(idx, idx)
        loss.backward()
        results.append((logits, loss, {n: p.grad for n, p in model.named_parameters()}))
        with torch.no_grad():
            torch.testing.assert_close(model(idx, idx)[1], loss)
    (logits, loss_a, grads_a), (no_logits, loss_b, grads_b) = results
    assert logits.shape == (3, 8, 300) and no_logits is None
    torch.testing.assert_close(loss_b, loss_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("name", ["attention", "fused_kernels", "fused_head"])
def test_compute_switches_are_checked(name):
    from raypipe.config import ConfigError, load_config

    value = "flash" if name == "attention" else "maybe"
    with pytest.raises(ConfigError, match=f"model.{name}"):
        load_config(None, [f"model.{name}={value}"])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("vocab,padded", [(50257, 50304), (1000, 1000), (5000, 5120)])
def test_cross_entropy_kernel_matches_reference(vocab, padded):
    torch.manual_seed(0)
    logits = (torch.randn(512, padded, device="cuda") * 3).to(torch.bfloat16)
    logits[:, vocab:] = float("-inf")  # the padded columns, as the model's output head makes them
    targets = torch.randint(0, vocab, (512,), device="cuda")
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    ours, ref = kernels.cross_entropy(a, targets), kernels.cross_entropy_reference(b, targets)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    (ours * 0.25).backward()
    (ref * 0.25).backward()
    torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=1e-6, rtol=1.6e-2)
    assert torch.all(a.grad[:, vocab:] == 0)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("vocab,padded,chunk_rows", [(50257, 50304, 384), (1000, 1024, 8192)])
def test_linear_cross_entropy_kernel_matches_the_plain_head(vocab, padded, chunk_rows):
    torch.manual_seed(0)
    h = torch.randn(1000, 640, device="cuda").to(torch.bfloat16)
    weight = (torch.randn(padded, 640, device="cuda") * 0.05).to(torch.bfloat16)
    weight[vocab:] = 0  # as the model pads it
    targets = torch.randint(0, vocab, (1000,), device="cuda")
    a = h.clone().requires_grad_(), weight.clone().requires_grad_()
    b = h.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = kernels.linear_cross_entropy(*a, targets, vocab, chunk_rows=chunk_rows)
    ref = plain_head_loss(*b, targets, vocab)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    (ours * 0.25).backward()
    (ref * 0.25).backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad.float(), y.grad.float(), atol=1e-5, rtol=1.6e-2)
    assert torch.all(a[1].grad[vocab:] == 0)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("rows,hidden", [(1000, 2048), (7, 96)])
def test_gated_gelu_kernel_matches_reference(rows, hidden):
    torch.manual_seed(0)
    gate_up = (torch.randn(rows, 2 * hidden, device="cuda") * 2).to(torch.bfloat16)
    a, b = gate_up.clone().requires_grad_(), gate_up.clone().requires_grad_()
    ours, ref = kernels.gated_gelu(a), kernels.gated_gelu_reference(b)
    torch.testing.assert_close(ours, ref, atol=1e-2, rtol=1.6e-2)
    g = torch.randn_like(ours)
    ours.backward(g)
    ref.backward(g)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-2, rtol=1.6e-2)


@pytest.mark.gpu
@needs_gpu
def test_compiled_model_with_kernels_matches_plain_model():
    torch.manual_seed(0)
    cfg = small_model(vocab_size=1000, vocab_pad_multiple=128)
    idx = torch.randint(0, 1000, (8, 8), device="cuda")
    results = []
    for fused, attention in ((False, "sdpa"), (True, "auto")):
        torch.manual_seed(1)
        model = GemmaLM(dataclasses.replace(cfg, fused_kernels=fused, attention=attention, fused_head=fused)).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = torch.compile(model)(idx, idx)
        loss.backward()
        results.append((loss.float(), {n: p.grad.float() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=2e-3, rtol=2e-3)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=2e-3, rtol=5e-2, msg=name)
