import copy

import pytest
import torch

from helpers import tiny_config
from raypipe.checkpoint import load_model, load_state
from raypipe.batches import BatchSampler
from raypipe.compiled import compile_blocks
from raypipe.loop import WorkerEnv, clip_gradients, estimate_loss, forward_backward, train
from raypipe.model import GemmaLM

import contextlib


def tiny_model(cfg):
    cfg.model.vocab_size = 512
    torch.manual_seed(0)
    return GemmaLM(cfg.model)


def test_accumulating_k_micro_batches_equals_one_big_batch(embedded_data, tmp_path):
    cfg = tiny_config(embedded_data, tmp_path)
    model = tiny_model(cfg)
    sampler = BatchSampler(embedded_data, "train", 32, 4, "cpu", seed=0)
    micro = [sampler() for _ in range(4)]
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    it = iter(micro)
    forward_backward(model, lambda: next(it), 4, contextlib.nullcontext(), scaler)
    accumulated = [p.grad.clone() for p in model.parameters()]

    big = copy.deepcopy(model)
    big.zero_grad(set_to_none=True)
    x = torch.cat([m[0] for m in micro])
    y = torch.cat([m[1] for m in micro])
    big(x, y)[1].backward()
    for a, b in zip(accumulated, (p.grad for p in big.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_reported_grad_norm_is_the_norm_before_clipping(embedded_data, tmp_path):
    cfg = tiny_config(embedded_data, tmp_path)
    model = tiny_model(cfg)
    x, y = BatchSampler(embedded_data, "train", 32, 4, "cpu", seed=0)()
    model(x, y)[1].backward()
    before = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    reported = clip_gradients(model, optimizer, scaler, max_norm=before / 10).item()
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    assert reported == pytest.approx(before, rel=1e-5)
    assert after == pytest.approx(before / 10, rel=1e-3)


@pytest.mark.parametrize("start_training", [True, False])
def test_estimate_loss_restores_the_mode(embedded_data, tmp_path, start_training):
    cfg = tiny_config(embedded_data, tmp_path)
    model = tiny_model(cfg).train(start_training)
    seen = []
    model.register_forward_pre_hook(lambda m, _: seen.append(m.training))
    batches = {s: BatchSampler(embedded_data, s, 32, 2, "cpu", seed=0) for s in ("train", "val")}
    losses = estimate_loss(model, 3, contextlib.nullcontext(), batches)
    assert set(losses) == {"train", "val"} and all(v > 0 for v in losses.values())
    assert seen == [False] * 6  # evaluated in eval mode
    assert model.training is start_training


def test_loop_without_ray_learns_and_checkpoints(embedded_data, tmp_path):
    """The loop is plain PyTorch: it runs with a local report callback and no Ray at all."""
    cfg = tiny_config(embedded_data, tmp_path)
    cfg.wandb.mode = "disabled"
    reports = []

    def report(metrics, checkpoint):
        kept = tmp_path / "kept" / checkpoint.name
        kept.parent.mkdir(exist_ok=True)
        checkpoint.rename(kept)
        reports.append((metrics, kept))

    summary = train(cfg, WorkerEnv(report=report, log=lambda _: None))
    assert [m["step"] for m, _ in reports] == [10, 20, 30]
    assert summary["final_val_loss"] < reports[0][0]["val_loss"] < 6.3  # ln(512) = 6.24 at init
    final_metrics, final_dir = reports[-1]
    assert load_state(final_dir)["step"] == 30
    model = load_model(final_dir)
    batches = {"val": BatchSampler(embedded_data, "val", 32, 8, "cpu", cfg.train.seed, stream="eval")}
    val = estimate_loss(model, cfg.train.eval_batches, contextlib.nullcontext(), batches)["val"]
    assert val == pytest.approx(final_metrics["val_loss"], rel=1e-5)  # same weights, same eval stream


def test_padded_vocabulary_keeps_the_loss_curve(embedded_data, tmp_path):
    """vocab_pad_multiple only changes the output matmul's width: the same run, step by step."""
    curves = {}
    for multiple in (0, 1000):  # 512 -> 1000: 488 padded columns the loss must never see
        cfg = tiny_config(embedded_data, tmp_path / str(multiple), max_steps=20)
        cfg.model.vocab_pad_multiple, cfg.wandb.mode, cfg.train.sample_tokens = multiple, "disabled", 0
        summary = train(cfg, WorkerEnv(log=lambda _: None))
        curves[multiple] = summary["history"], summary["step_times_s"], summary["data_wait_s"]
    (plain, times, waits), (padded, _, _) = curves[0], curves[1000]
    assert len(times) == len(waits) == 20 and all(w <= t for w, t in zip(waits, times))
    for a, b in zip(plain, padded):
        assert a["step"] == b["step"]
        for key in ("train_loss", "val_loss", "step_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key


def test_the_fused_head_keeps_the_loss_curve(embedded_data, tmp_path):
    """model.fused_head (the head's matmul and cross-entropy over chunks of rows, gradients made in the
    forward) trains the same run as the plain head, step by step: accumulation, clipping, evaluation."""
    curves = {}
    for fused in (False, True):
        cfg = tiny_config(embedded_data, tmp_path / str(fused), max_steps=12, grad_accum_steps=2)
        cfg.model.fused_head, cfg.model.vocab_pad_multiple = fused, 1000  # padded rows the loss must never see
        cfg.wandb.mode, cfg.train.sample_tokens = "disabled", 0
        curves[fused] = train(cfg, WorkerEnv(log=lambda _: None))["history"]
    assert curves[True][-1]["val_loss"] < curves[True][0]["val_loss"]  # it trains
    for a, b in zip(curves[False], curves[True], strict=True):
        assert a["step"] == b["step"]
        for key in ("train_loss", "val_loss", "step_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key


def test_checkpoint_interval_reports_every_eval_and_checkpoints_less_often(embedded_data, tmp_path):
    cfg = tiny_config(embedded_data, tmp_path, max_steps=50, checkpoint_interval=20)
    cfg.wandb.mode, cfg.train.sample_tokens = "disabled", 0
    reports = []
    train(cfg, WorkerEnv(report=lambda m, c: reports.append((m["step"], c and c.name)), log=lambda _: None))
    assert reports == [(10, None), (20, "checkpoint_0000020"), (30, None), (40, "checkpoint_0000040"),
                       (50, "checkpoint_0000050")]  # the last step always gets one


def test_cuda_graphs_are_refused_where_they_cannot_run():
    from raypipe.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"train.cuda_graphs.*need train.compile: true and ray.use_gpu: true"):
        load_config(None, ["train.cuda_graphs=true", "train.compile=true"])  # the default runs on CPU
    with pytest.raises(ConfigError, match=r"train.cuda_graphs.*ray.num_workers 2.*train.shard_optimizer: true"):
        load_config(None, ["train.cuda_graphs=true", "train.compile=true", "ray.use_gpu=true", "ray.num_workers=2"])
    load_config(None, ["train.cuda_graphs=true", "train.compile=true", "ray.use_gpu=true", "ray.num_workers=2",
                       "train.shard_optimizer=true"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graphs_train_as_the_compiled_model_does(embedded_data, tmp_path):
    def run(graphs: bool) -> dict:
        cfg = tiny_config(embedded_data, tmp_path / f"graphs-{graphs}", max_steps=8, eval_interval=4, compile=True,
                          cuda_graphs=graphs, sample_tokens=0)
        cfg.wandb.mode, cfg.ray.use_gpu = "disabled", True
        return train(cfg, WorkerEnv(device=torch.device("cuda"), log=lambda _: None))

    plain, graphs = run(False), run(True)
    assert graphs["history"][-1]["val_loss"] < graphs["history"][0]["val_loss"]  # it trains
    for a, b in zip(plain["history"], graphs["history"]):  # the same kernels, replayed
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-3 and abs(a["step_loss"] - b["step_loss"]) < 1e-3


@pytest.mark.parametrize("per_block", [True, False], ids=["compile_blocks", "whole_model"])
def test_compiled_blocks_finish_their_gradients_before_earlier_blocks_run_backward(embedded_data, tmp_path, per_block):
    """What train.overlap_comm builds on: with each block compiled on its own, a block's gradients are final
    (their hooks run) while the blocks before it have not run their backward yet; one graph for the whole
    model finishes every gradient at its end."""
    cfg = tiny_config(embedded_data, tmp_path)
    model = tiny_model(cfg)
    compiled = compile_blocks(model) if per_block else torch.compile(model)
    first, last = model.layers[0], model.layers[-1]
    seen = []  # at each hook of the last block: has the first block's backward run yet?
    for p in last.parameters():
        p.register_post_accumulate_grad_hook(lambda _: seen.append(any(q.grad is not None for q in first.parameters())))
    x, y = BatchSampler(embedded_data, "train", 32, 4, "cpu", seed=0)()
    eager_loss = GemmaLM.forward(model, x, y)[1]  # the same model, run without any graph
    _, loss = compiled(x, y)
    assert abs(loss.item() - eager_loss.item()) < 1e-4
    loss.backward()
    assert len(seen) == len(list(last.parameters())) and seen == [not per_block] * len(seen)


def test_compiled_blocks_evaluate_and_generate_eagerly(embedded_data, tmp_path):
    """Only the training forward runs the blocks' graphs: an evaluation or a generation (KV cache, a new
    length each token) would otherwise compile graphs of their own."""
    from torch._dynamo.utils import counters

    from raypipe.sampling import generate

    cfg = tiny_config(embedded_data, tmp_path)
    model = tiny_model(cfg)
    x, y = BatchSampler(embedded_data, "train", 32, 4, "cpu", seed=0)()
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(model)
    model(x, y)[1].backward()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    with torch.inference_mode():
        estimate = model(x, y)[1]
        out = generate(model, x[:1, :4], max_new_tokens=6, temperature=1.0)
    assert counters["stats"]["unique_graphs"] == graphs and out.shape == (1, 10)
    assert abs(estimate.item() - GemmaLM.forward(model, x, y)[1].item()) < 1e-4
