"""raypipe.parallel and raypipe.sharded_adamw: two gloo workers follow one worker's loss curve at the same
effective batch, under DDP and under ZeRO-1, whose gathered optimizer state is a single worker's."""

import contextlib
import json
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raypipe.config import Config, ConfigError, load_config
from raypipe.compiled import compile_blocks
from raypipe.loop import clip_gradients, forward_backward
from raypipe.model import GemmaLM
from raypipe.optim import configure_optimizer
from raypipe.parallel import data_parallel
from raypipe.sharded_adamw import ShardedAdamW

STEPS, MICRO_BATCHES, MICRO, BLOCK, VOCAB = 12, 4, 4, 16, 256


def tiny() -> Config:
    cfg = Config()
    m, t = cfg.model, cfg.train
    m.vocab_size, m.n_layer, m.global_every, m.n_embd, m.n_head, m.n_kv_head, m.head_dim = VOCAB, 2, 2, 64, 2, 1, 16
    m.mlp_hidden, m.sliding_window = 128, 16
    t.learning_rate, t.grad_clip = 1e-2, 1.0
    return cfg


def losses_of_run(rank: int, world: int, init_file: str, grad_dtype: str, sharded: bool, out: str,
                  overlap: bool = False, tied: bool = False, cuda: bool = False, ranges=None) -> None:
    """STEPS optimizer steps of MICRO_BATCHES micro-batches in all; rank r takes every world-th one.
    Rank 0 writes the losses to `out` and the optimizer's state_dict beside it. `cuda`: NCCL, bf16
    autocast and the model compiled as the loop compiles it. `ranges`: ZeRO-1's update ranges."""
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world, device_id=device if cuda else None)
    cfg = tiny()
    cfg.model.tie_embeddings = tied
    cfg.train.grad_accum_steps = MICRO_BATCHES // world
    torch.manual_seed(0)
    with device:
        raw = GemmaLM(cfg.model)
    if sharded:
        optimizer = ShardedAdamW(raw, cfg.train, device, grad_dtype, overlap=overlap,
                                 buckets=raw.gradient_buckets() if overlap else None, ranges=ranges)
        model = raw
    else:
        optimizer = configure_optimizer(raw, cfg.train, device.type)
        model = data_parallel(raw, device, grad_dtype=grad_dtype) if world > 1 else raw
    if cuda:
        model = compile_blocks(raw) if overlap else torch.compile(model)
    for group in optimizer.param_groups:  # a constant rate (the loop sets lr_at(step) before each step)
        group["lr"] = cfg.train.learning_rate
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    losses = []
    for step in range(STEPS):
        # Counting sequences from random starts: learnable in a few steps, so the curve has a shape.
        starts = torch.randint(0, VOCAB, (MICRO_BATCHES, MICRO, 1), generator=torch.Generator().manual_seed(step))
        tokens = (starts + torch.arange(BLOCK + 1)) % VOCAB
        mine = iter([(x[:, :-1].to(device), x[:, 1:].to(device)) for x in tokens[rank::world]])
        losses.append(forward_backward(model, partial(next, mine), MICRO_BATCHES // world, autocast, scaler).item())
        if overlap:  # every bucket's reduce-scatter was started by its gradients' hooks, during the backward
            assert len(optimizer.reducing) == len(optimizer.buckets) > 2
        clip_gradients(raw, optimizer, scaler, cfg.train.grad_clip)
        optimizer.step()
        if overlap:  # the all-gathers run until a forward (or a state_dict) needs the weights
            assert len(optimizer.gathering) == len(optimizer.buckets)
        optimizer.zero_grad(set_to_none=True)
    state = optimizer.state_dict()  # a collective when sharded
    weights = raw.state_dict()
    if world > 1:  # every rank holds the same weights
        total = torch.tensor([float(sum(w.double().sum() for w in weights.values()))], dtype=torch.float64, device=device)
        totals = [torch.zeros_like(total) for _ in range(world)]
        dist.all_gather(totals, total)
        assert all(torch.equal(t, total) for t in totals), totals
    if rank == 0:
        with open(out, "w") as f:
            json.dump(losses, f)
        torch.save(state, f"{out}.optimizer.pt")
    if world > 1:
        dist.barrier()  # no rank tears its group down while another is still writing
        dist.destroy_process_group()


def curve(tmp_path, world: int, grad_dtype: str = "float32", sharded: bool = False, overlap: bool = False,
          tied: bool = False, cuda: bool = False, ranges=None) -> list[float]:
    name = (f"{world}-{grad_dtype}-{'sharded' if sharded else 'ddp'}{'-overlap' if overlap else ''}{'-tied' if tied else ''}"
            f"{'-cuda' if cuda else ''}{f'-ranges{ranges}' if ranges else ''}")
    out, init = tmp_path / f"losses-{name}.json", tmp_path / f"init-{name}"
    args = (str(init), grad_dtype, sharded, str(out), overlap, tied, cuda, ranges)
    if world == 1:
        losses_of_run(0, 1, *args)
    else:
        mp.spawn(losses_of_run, args=(world, *args), nprocs=world, join=True)
    return json.loads(out.read_text())


def test_two_workers_follow_one_and_bf16_gradients_stay_within_tolerance(tmp_path):
    one = curve(tmp_path, 1)
    two = curve(tmp_path, 2)
    two_bf16 = curve(tmp_path, 2, "bfloat16")
    assert one[-1] < one[0] - 0.1  # it trains
    # float32 all-reduce: the same sums in another order.
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4
    # bfloat16 all-reduce: each rank's gradient is rounded to 8 significant bits before the sum, so the
    # curve moves by rounding noise. Tolerance: 2% of the loss at every step (measured: at most 1.1%, at
    # the last of 12 steps at lr 1e-2, where the loss falls from 5.53 to 3.68).
    assert max(abs(a - b) / a for a, b in zip(one, two_bf16)) < 0.02
    assert two_bf16 != two  # the bf16 hook did run


def test_zero1_follows_one_worker_and_gathers_a_single_workers_optimizer_state(tmp_path):
    one = curve(tmp_path, 1)
    sharded = curve(tmp_path, 2, sharded=True)
    sharded_bf16 = curve(tmp_path, 2, "bfloat16", sharded=True)
    assert one[-1] < one[0] - 0.1
    # Reduce-scatter, clip by the global norm, update each half, all-gather: the same step as one worker's.
    assert max(abs(a - b) for a, b in zip(one, sharded)) < 1e-4
    assert max(abs(a - b) / a for a, b in zip(one, sharded_bf16)) < 0.02 and sharded_bf16 != sharded

    # The gathered state is torch AdamW's own, entry by entry: what one worker holds after the same steps.
    reference = torch.load(tmp_path / "losses-1-float32-ddp.json.optimizer.pt")
    gathered = torch.load(tmp_path / "losses-2-float32-sharded.json.optimizer.pt")
    assert_same_adamw_state(reference, gathered)
    # It loads into a plain AdamW of the same model.
    plain = configure_optimizer(GemmaLM(tiny().model), tiny().train, "cpu")
    plain.load_state_dict(gathered)
    assert torch.equal(plain.state_dict()["state"][0]["exp_avg"], gathered["state"][0]["exp_avg"])


@pytest.mark.parametrize("tied", [False, True])
def test_zero1_updated_in_ranges_takes_the_same_steps(tmp_path, tied):
    """One AdamW per range of each rank's chunk (as peer copies pipeline the update): the same element-wise
    update, so the same losses and the same gathered state, bit for bit."""
    whole = curve(tmp_path, 2, sharded=True, tied=tied)
    in_ranges = curve(tmp_path, 2, sharded=True, tied=tied, ranges=3)
    assert whole[-1] < whole[0] - 0.1 and in_ranges == whole
    suffix = "-tied" if tied else ""
    reference = torch.load(tmp_path / f"losses-2-float32-sharded{suffix}.json.optimizer.pt")
    gathered = torch.load(tmp_path / f"losses-2-float32-sharded{suffix}-ranges3.json.optimizer.pt")
    assert gathered["param_groups"] == reference["param_groups"] and gathered["state"].keys() == reference["state"].keys()
    for i, entry in reference["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, gathered["state"][i][key]), (i, key)


def peer_copies_against_collectives(rank: int, world: int, init_file: str) -> None:
    """The same random gradients on each rank through ZeRO-1 over NCCL and over peer copies, three steps."""
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world, device_id=device)
    cfg = tiny()
    results = []
    for transport in ("collectives", "peer_copies"):
        torch.manual_seed(0)
        with device:
            model = GemmaLM(cfg.model)
        optimizer = ShardedAdamW(model, cfg.train, device, transport=transport)
        assert len(optimizer.inners) == (4 if transport == "peer_copies" else 1)
        norms = []
        for step in range(3):
            gen = torch.Generator(device=device).manual_seed(100 * step + rank)  # each rank its own gradients
            for p in model.parameters():
                p.grad.copy_(torch.randn(p.shape, generator=gen, device=device))
            norms.append(clip_gradients(model, optimizer, torch.amp.GradScaler("cuda", enabled=False), 0.5))
            optimizer.step()
            optimizer.zero_grad()
        results.append((torch.stack(norms), optimizer.flat_param.clone(), optimizer.state_dict()))
    (norms, weights, state), (copied_norms, copied_weights, copied_state) = results
    assert torch.equal(norms, copied_norms) and norms.min() > 0.5  # clipped at every step
    assert torch.equal(weights, copied_weights), (weights - copied_weights).abs().max()
    for i, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, copied_state["state"][i][key]), (i, key)
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_peer_copies_on_two_gpus_take_the_collectives_steps(tmp_path):
    """train.shard_transport: peer_copies against NCCL's reduce-scatter and all-gather: on two ranks the same
    sums, so the same norms, weights and AdamW state, bit for bit."""
    mp.spawn(peer_copies_against_collectives, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


def assert_same_adamw_state(reference: dict, gathered: dict) -> None:
    assert gathered["param_groups"] == reference["param_groups"]
    assert gathered["state"].keys() == reference["state"].keys() and len(reference["state"]) > 10
    for i, entry in reference["state"].items():
        assert entry.keys() == gathered["state"][i].keys()
        assert torch.equal(entry["step"], gathered["state"][i]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert entry[key].shape == gathered["state"][i][key].shape
            # Sums in another order: elements near zero (a tied weight's two gradients) differ on that scale.
            scale = float(entry[key].abs().max())
            assert torch.allclose(entry[key], gathered["state"][i][key], rtol=1e-3, atol=1e-4 * scale), (i, key)


@pytest.mark.parametrize("tied", [False, True])
def test_zero1_with_overlapped_collectives_follows_one_worker(tmp_path, tied):
    """Buckets per block, reduce-scattered from the gradients' hooks and all-gathered until the next forward
    (eager here: every parameter's gradient is final as soon as the backward reaches it); tied: the head's
    weight is the embedding's, finished last."""
    one = curve(tmp_path, 1, tied=tied)
    overlapped = curve(tmp_path, 2, sharded=True, overlap=True, tied=tied)
    assert one[-1] < one[0] - 0.1
    assert max(abs(a - b) for a, b in zip(one, overlapped)) < 1e-4
    suffix = "-tied" if tied else ""
    assert_same_adamw_state(torch.load(tmp_path / f"losses-1-float32-ddp{suffix}.json.optimizer.pt"),
                            torch.load(tmp_path / f"losses-2-float32-sharded-overlap{suffix}.json.optimizer.pt"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_overlapped_zero1_on_two_gpus_follows_one_gpu(tmp_path):
    """NCCL, bf16 autocast and compiled blocks (what train.overlap_comm runs) against one GPU's compiled model."""
    one = curve(tmp_path, 1, cuda=True)
    overlapped = curve(tmp_path, 2, sharded=True, overlap=True, cuda=True)
    assert one[-1] < one[0] - 0.1
    assert max(abs(a - b) / a for a, b in zip(one, overlapped)) < 0.01  # bf16 matmuls in another grouping


def test_reduces_start_in_bucket_order_whatever_order_the_buckets_finish(tmp_path):
    """Every rank must issue its collectives in one order: a bucket whose gradients are final before the
    bucket ahead of it waits for that one."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        cfg = tiny()
        raw = GemmaLM(cfg.model)
        optimizer = ShardedAdamW(raw, cfg.train, torch.device("cpu"), buckets=raw.gradient_buckets(), overlap=True)
        last = len(optimizer.buckets) - 1

        def finish(bucket: int) -> None:
            for _ in range(optimizer.expected[bucket]):
                optimizer._gradient_done(bucket)

        finish(last)
        assert optimizer.reducing == []  # the embedding's bucket, done first, waits for those ahead of it
        finish(0)
        assert len(optimizer.reducing) == 1
        for bucket in range(1, last):
            finish(bucket)
        assert len(optimizer.reducing) == last + 1
        optimizer.reduce_and_clip(1.0)
        assert optimizer.reducing == [] and optimizer.arrived == [0] * (last + 1)
    finally:
        dist.destroy_process_group()


def sharded_round_trip(rank: int, world: int, init_file: str, state_file: str, ranges) -> None:
    """Each rank loads its slice of a whole state; gathered again, it must be the same state."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = tiny()
    optimizer = ShardedAdamW(GemmaLM(cfg.model), cfg.train, torch.device("cpu"), ranges=ranges)
    saved = torch.load(state_file)
    optimizer.load_state_dict(saved)
    again = optimizer.state_dict()
    if rank == 0:
        assert again["param_groups"] == saved["param_groups"]
        for i, entry in saved["state"].items():
            for key, value in entry.items():
                assert torch.equal(value, again["state"][i][key]), (i, key)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("ranges", [None, 4])
def test_zero1_loads_a_whole_state_on_three_ranks_and_gives_it_back(tmp_path, ranges):
    # Three ranks: slices that start and end inside parameters and inside both weight-decay groups; in
    # four update ranges, pieces cut again inside them.
    cfg = tiny()
    torch.manual_seed(0)
    model = GemmaLM(cfg.model)
    plain = configure_optimizer(model, cfg.train, "cpu")
    model(torch.randint(0, VOCAB, (2, BLOCK)), torch.randint(0, VOCAB, (2, BLOCK)))[1].backward()
    plain.step()
    plain.param_groups[0]["lr"] = 0.123  # a group's hyperparameters travel too
    torch.save(plain.state_dict(), tmp_path / "state.pt")
    mp.spawn(sharded_round_trip, args=(3, str(tmp_path / "init"), str(tmp_path / "state.pt"), ranges), nprocs=3, join=True)


def test_bad_ddp_keys_are_refused_with_the_key_and_what_is_expected():
    with pytest.raises(ConfigError, match=r"train.ddp_grad_dtype.*'float16'.*expected one of float32, bfloat16"):
        load_config(None, ["train.ddp_grad_dtype=float16"])
    with pytest.raises(ConfigError, match=r"train.ddp_bucket_mb.*greater than 0"):
        load_config(None, ["train.ddp_bucket_mb=0"])
    with pytest.raises(ConfigError, match=r"train.dtype.*'float16'.*does not run with train.shard_optimizer: true"):
        load_config(None, ["train.dtype=float16", "ray.use_gpu=true", "train.shard_optimizer=true"])
    with pytest.raises(ConfigError, match=r"train.overlap_comm.*needs train.shard_optimizer: true"):
        load_config(None, ["train.overlap_comm=true"])
    with pytest.raises(ConfigError, match=r"train.shard_transport.*'nvlink'.*expected one of auto, collectives, peer_copies"):
        load_config(None, ["train.shard_transport=nvlink"])
    gpu_zero1 = ["train.shard_optimizer=true", "ray.use_gpu=true"]
    load_config(None, [*gpu_zero1, "train.shard_transport=peer_copies"])
    for wrong in (["train.shard_optimizer=false"], ["ray.use_gpu=false"], ["train.ddp_grad_dtype=bfloat16"],
                  ["train.overlap_comm=true"]):
        with pytest.raises(ConfigError, match=r"train.shard_transport.*'peer_copies'.*needs train.shard_optimizer: true, "
                                              r"ray.use_gpu: true, train.overlap_comm: false and train.ddp_grad_dtype"):
            load_config(None, [*gpu_zero1, "train.shard_transport=peer_copies", *wrong])
    with pytest.raises(ConfigError, match=r"train.overlap_comm.*does not run with train.cuda_graphs: true"):
        load_config(None, ["train.overlap_comm=true", "train.shard_optimizer=true", "train.cuda_graphs=true",
                           "train.compile=true", "ray.use_gpu=true"])
