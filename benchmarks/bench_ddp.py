"""Data-parallel variants of the reference recipe's step on every GPU of one host; prints tokens/s and scaling.

    python benchmarks/bench_ddp.py --micro 256 128 --variants ddp nobcast nobcast+view+bf16 --profile nobcast

One process per GPU (torch.multiprocessing, NCCL), no Ray. For each micro-batch size: the GPUs
first run the compiled model alone at the full effective batch (1,024 sequences: micro x 1024 / micro,
no communication, each GPU its own copy), then every variant runs the same step with DDP, each rank
taking 1024 / (micro x N) micro-batches. The steps are the loop's own `forward_backward`, clipping
and fused AdamW on random tokens drawn on the GPU. Also times an all-reduce of the gradients' size
(fp32 and bf16) and, with --profile, one step of a variant under torch.profiler on rank 0: GPU busy
time, NCCL kernel time and the part of it no compute kernel overlaps.
Variant parts, joined with '+': `ddp` (DDP's defaults, as before parallel.py), `nobcast`
(broadcast_buffers=False), `view` (gradient_as_bucket_view), `bf16` (bf16 all-reduce hook), `static`
(static_graph), `bN` (bucket N MB), `split` (compiled inside DDP with Dynamo's DDPOptimizer:
the graph cut at the buckets, as `train.ddp_split_graph: true`; put it last: it recompiles), `ca`
(compiled autograd: DDP compiled whole with Dynamo's "python_reducer", the backward traced with its
all-reduces so that Inductor can overlap them without cutting the forward; put it last; it runs on
torch 2.13 and failed to compile on torch 2.11, BENCHMARKS.md), `zero1` (no DDP: raypipe.sharded_adamw's ZeRO-1
reduce-scatter, sharded clip and AdamW, all-gather; `zero1+bf16` reduces in bf16), `zero1+overlap` (a fresh model with
each block compiled on its own, `train.overlap_comm`: each block's reduce-scatter during the backward, its
all-gather during the next forward), `zero1+ceN` (ZeRO-1 whose reduce and gather are copies pulled from the
peers' memory on the copy engines, `train.shard_transport: peer_copies`, in N ranges pipelined with the sums
and the updates).
Each result line also says whether every rank holds the same weights after the steps.
"""

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raypipe.config import load_config  # noqa: E402
from raypipe.compiled import compile_blocks  # noqa: E402
from raypipe.loop import clip_gradients, forward_backward  # noqa: E402
from raypipe.model import GemmaLM  # noqa: E402
from raypipe.optim import configure_optimizer  # noqa: E402
from raypipe.parallel import data_parallel  # noqa: E402
from raypipe.sharded_adamw import ShardedAdamW  # noqa: E402



def options(variant: str) -> dict:
    o = dict(grad_dtype="float32", bucket_mb=25.0, broadcast_buffers=True, gradient_as_bucket_view=False,
             static_graph=False)
    for part in variant.split("+"):
        if part == "nobcast":
            o["broadcast_buffers"] = False
        elif part == "view":
            o["gradient_as_bucket_view"] = True
        elif part == "bf16":
            o["grad_dtype"] = "bfloat16"
        elif part == "static":
            o["static_graph"] = True
        elif part.startswith("b") and part[1:].isdigit():
            o["bucket_mb"] = float(part[1:])
        elif part.startswith("ce") and part[2:].isdigit():
            o["copy_ranges"] = int(part[2:])
        elif part not in ("ddp", "split", "ca", "zero1", "overlap"):
            raise SystemExit(f"unknown variant part {part!r}")
    return o


def intervals_union(spans):
    out = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def overlap(a, b):
    total = 0.0
    for s, e in a:
        for s2, e2 in b:
            total += max(0.0, min(e, e2) - max(s, s2))
    return total


def profile_step(step, rank: int, label: str, out_dir: str) -> None:
    from torch.profiler import ProfilerActivity
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step()  # ends with a synchronize on a GPU
        wall = (time.perf_counter() - start) * 1e6
    if rank:
        return
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() > 0]
    nccl = intervals_union([(e.time_range.start, e.time_range.end) for e in kernels if "nccl" in e.name.lower()])
    comp = intervals_union([(e.time_range.start, e.time_range.end) for e in kernels if "nccl" not in e.name.lower()])
    busy = intervals_union([(e.time_range.start, e.time_range.end) for e in kernels])
    t_nccl, t_comp, t_busy = (sum(e - s for s, e in u) for u in (nccl, comp, busy))
    exposed = t_nccl - overlap(nccl, comp)
    names = {}
    for e in kernels:
        if "nccl" in e.name.lower():
            names[e.name[:60]] = names.get(e.name[:60], 0) + e.time_range.elapsed_us()
    print(f"PROFILE {label}: step wall {wall / 1e3:.1f} ms | GPU busy {t_busy / 1e3:.1f} ms | compute kernels "
          f"{t_comp / 1e3:.1f} ms | NCCL kernels {t_nccl / 1e3:.1f} ms, not overlapped by compute {exposed / 1e3:.1f} ms | "
          f"GPU idle {(wall - t_busy) / 1e3:.1f} ms | nccl: {names}", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70), flush=True)


def worker(rank: int, world: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")  # CPU and gloo: a smoke test only
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, device_id=device if cuda else None)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    peak_gb = (lambda: torch.cuda.max_memory_allocated(device) / 1e9) if cuda else (lambda: 0.0)
    torch._dynamo.config.optimize_ddp = False  # one graph, compiled alone first; `split` variants compile again
    torch._dynamo.config.automatic_dynamic_shapes = False  # each micro-batch size its own static graph, as in a run
    cfg = load_config(args.config, args.overrides)
    say = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(0)
    raw = GemmaLM(cfg.model).to(device)
    optimizer = configure_optimizer(raw, cfg.train, device.type)
    compiled = torch.compile(raw) if cuda else raw
    ctx = torch.autocast(device.type, dtype=torch.bfloat16)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    gen = torch.Generator(device=device)
    gen.manual_seed(1 + rank)
    n = sum(p.numel() for p in raw.parameters())

    # The all-reduce of one step's gradients, alone.
    for dtype in (torch.float32, torch.bfloat16):
        buf = torch.ones(n, dtype=dtype, device=device)
        for _ in range(3):
            dist.all_reduce(buf)
        sync()
        t0 = time.perf_counter()
        for _ in range(10):
            dist.all_reduce(buf)
        sync()
        dt = (time.perf_counter() - t0) / 10
        algbw = n * buf.element_size() / dt
        say(f"ALLREDUCE {dtype}: {n * buf.element_size() / 1e6:.0f} MB in {dt * 1e3:.2f} ms | algbw {algbw / 1e9:.0f} GB/s | "
            f"busbw {algbw * 2 * (world - 1) / world / 1e9:.0f} GB/s", flush=True)
        del buf

    def timed(model, micro, accum, steps, warmup, label, around=contextlib.nullcontext, opt=None):
        opt = opt or optimizer
        def next_batch():
            x = torch.randint(0, cfg.model.vocab_size, (micro, cfg.train.block_size + 1), device=device, generator=gen)
            return x[:, :-1], x[:, 1:]

        losses = []

        def step():
            with around():
                losses.append(forward_backward(model, next_batch, accum, ctx, scaler))
            clip_gradients(raw, opt, scaler, cfg.train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()

        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        warm = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        return med, warm, losses, step

    for micro in args.micro:
        accum = args.sequences // micro
        # Alone: every GPU its own full step (no DDP), all GPUs busy at once as in a multi-GPU run.
        dist.barrier()
        med, warm, _, _ = timed(compiled, micro, accum, args.steps, args.warmup, "alone")
        meds = [None] * world
        dist.all_gather_object(meds, med)
        alone = max(meds)
        say(f"RESULT micro {micro} x {accum} | 1 GPU alone: step {[f'{m * 1e3:.1f}' for m in meds]} ms per GPU | "
            f"{args.sequences * cfg.train.block_size / alone:,.0f} tokens/s (slowest) | warm-up {warm:.0f} s "
            f"| peak {peak_gb():.1f} GB", flush=True)
        if accum % world:
            say(f"micro {micro}: accumulation {accum} does not split over {world} workers")
            continue
        for variant in args.variants:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            if "split" in variant:  # compiled anew inside DDP's forward: Dynamo cuts the graph at the buckets
                torch._dynamo.reset()
                torch._dynamo.config.optimize_ddp = True
                compiled = torch.compile(raw)
            around, opt = contextlib.nullcontext, None
            weights = raw  # the model whose weights the ranks must agree on
            if "overlap" in variant.split("+"):  # a fresh model: the optimizer's hooks stay on the one it is built on
                torch.manual_seed(0)
                weights = model = compile_blocks(GemmaLM(cfg.model).to(device))
                opt = ShardedAdamW(model, dataclasses.replace(cfg.train, grad_accum_steps=accum // world), device,
                                   options(variant)["grad_dtype"], buckets=model.gradient_buckets(), overlap=True)
            elif "copy_ranges" in options(variant):  # ZeRO-1 over peer copies (train.shard_transport: peer_copies)
                model, opt = compiled, ShardedAdamW(raw, cfg.train, device, transport="peer_copies",
                                                    ranges=options(variant)["copy_ranges"])
            elif "zero1" in variant.split("+"):  # no DDP: the sharded optimizer reduces, clips, updates and gathers
                model, opt = compiled, ShardedAdamW(raw, cfg.train, device, options(variant)["grad_dtype"])
            elif "ca" in variant.split("+"):  # DDP built under the mode (it picks its reducer then), then compiled
                torch._dynamo.reset()
                torch._dynamo.config.optimize_ddp = "python_reducer"
                model = torch.compile(data_parallel(raw, device, **options(variant)))

                def around():
                    return torch._dynamo.compiled_autograd._enable(torch.compile)
            else:
                model = data_parallel(compiled, device, **options(variant))
            med, warm, losses, step = timed(model, micro, accum // world, args.steps, args.warmup, variant, around, opt)
            meds = [None] * world
            dist.all_gather_object(meds, med)
            worst = max(meds)
            # Every rank must hold the same weights after the steps (the gradients were averaged).
            sums = [None] * world
            if isinstance(opt, ShardedAdamW):
                opt.wait_for_weights()
            dist.all_gather_object(sums, sum(float(p.detach().double().sum()) for p in weights.parameters()))
            agree = "yes" if max(sums) - min(sums) <= 1e-9 * max(abs(x) for x in sums) else f"NO {sums}"
            tps = args.sequences * cfg.train.block_size / worst
            scaling = tps / (world * args.sequences * cfg.train.block_size / alone)
            say(f"RESULT micro {micro} x {accum // world} per rank | {world} GPUs {variant}: step {worst * 1e3:.1f} ms | "
                f"{tps:,.0f} tokens/s | scaling vs slowest GPU alone {scaling:.1%} "
                f"| warm-up {warm:.0f} s | peak {peak_gb() + getattr(opt, 'uncounted_bytes', 0) / 1e9:.1f} GB | "
                f"loss {losses[0]:.4f} -> {losses[-1]:.4f} | ranks' weights agree: {agree}", flush=True)
            if variant in args.profile:
                profile_step(step, rank, f"{variant}-mb{micro}", args.out)
            del model, step
            import gc
            gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/gemma3-270m.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--micro", type=int, nargs="+", default=[256])
    p.add_argument("--variants", nargs="+", default=["ddp", "nobcast+view+bf16"])
    p.add_argument("--profile", nargs="*", default=[], help="variants to profile one step of")
    p.add_argument("--sequences", type=int, default=1024, help="effective batch per optimizer step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="where profiler traces go")
    args = p.parse_args()
    for v in args.variants:
        options(v)
    world = torch.cuda.device_count() or 2
    mp.spawn(worker, args=(world, args), nprocs=world, join=True)
