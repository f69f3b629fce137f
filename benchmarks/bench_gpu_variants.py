"""Compiled training steps of the reference recipe under variants, one process, one GPU; prints tokens/s each.

    python benchmarks/bench_gpu_variants.py base unfused mb512 unfused+mb512 cdt+mb512 autotune+mb512
    python benchmarks/bench_gpu_variants.py sdpa+plainkernels base combo mb512
    python benchmarks/bench_gpu_variants.py --profile sync     # also a torch.profiler table of two steps
                                                               # and the gaps between their kernels

(Under the profiler the host records every operation and falls behind the GPU: profile `sync`, whose
step waits for the GPU at its end, to see where a step's time goes; `base` then shows the profiler.)

Each variant joins parts with '+': `base` (the model as committed), `unfused` (q/k/v as separate
matmuls, as before `model.fused_linear`), `mbN` (micro-batch N, accumulation 1024 / N: the same 1,024
sequences per step), `cdt` (Inductor's coordinate-descent tuning), `autotune`
(`mode="max-autotune-no-cudagraphs"`), `sdpa` / `matmul` (`model.attention`; `base` is the committed
"auto"), `combo` (Inductor's combo kernels), `aggr` (Inductor's aggressive_fusion), `cudagraphs`
(`mode="reduce-overhead"`, each micro-batch a new graph step), `blocks` (`compiled.compile_blocks`: each block
compiled on its own, the rest eager), `sync` (the step reads its loss, then its gradient norm, back to
the host at once, as the loop did before `raypipe/step_results.py`), `plainkernels` (`model.fused_kernels: false`:
PyTorch's cross-entropy and GELU, compiled by Inductor), `fusedhead` (`model.fused_head`: the output head's
matmul and cross-entropy over chunks of rows, `kernels.linear_cross_entropy`), `headchunkN` (that with N rows
per chunk), `mosplitN` / `moauto` (the rows per program of Inductor's mix-order reductions, which fuse
RMSNorm's backward with its weight's gradient and leave a sum over the programs' partial sums to a
separate kernel; or those rows autotuned), `bf16res` (the residual stream in bf16: the embedding's output
cast to bf16, so every residual add stays in bf16 as in modded-nanogpt; a change of the mathematics, measured
to size it).
Steps are the loop's own `forward_backward`, clipping and fused AdamW on
the compiled model, with random tokens drawn on the GPU (no data loading: `python -m raypipe.bench`
measures the whole loop). Compare variants of one process: GPUs and machines differ by
a percent or two.
"""

import argparse
import dataclasses
import time

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F

from raypipe import model as M
from raypipe.config import load_config
from raypipe.compiled import GraphSteps, compile_blocks
from raypipe.loop import clip_gradients, forward_backward
from raypipe.optim import configure_optimizer

FUSED = M.fused_linear


def unfused_linear(x, *projections):
    return tuple(F.linear(x, p.weight) for p in projections)


HEAD_ROWS = M.kernels.HEAD_CHUNK_ROWS


def apply(variant: str) -> tuple:
    """Set the variant's switches (each reset first); return (compile mode, micro-batch, accumulation,
    model.attention, model.fused_kernels, model.fused_head, whether the step reads its figures back to the host, whether the
    residual stream is bf16)."""
    M.fused_linear = FUSED
    M.kernels.HEAD_CHUNK_ROWS = HEAD_ROWS
    inductor_config.coordinate_descent_tuning = inductor_config.aggressive_fusion = inductor_config.combo_kernels = False
    if hasattr(inductor_config.triton, "mix_order_reduction_split_size"):  # torch >= 2.10
        inductor_config.triton.mix_order_reduction_split_size = None
        inductor_config.triton.mix_order_reduction_autotune_split_size = False
    mode, micro, attention, fused, head, sync, bf16res = None, 256, "auto", True, False, False, False
    for part in variant.split("+"):
        if part == "unfused":
            M.fused_linear = unfused_linear
        elif part == "cdt":
            inductor_config.coordinate_descent_tuning = True
        elif part == "combo":
            inductor_config.combo_kernels = True
        elif part == "aggr":
            inductor_config.aggressive_fusion = True
        elif part in ("sdpa", "matmul"):
            attention = part
        elif part == "sync":
            sync = True
        elif part == "plainkernels":
            fused = False
        elif part.startswith("mosplit"):
            inductor_config.triton.mix_order_reduction_split_size = int(part[7:])
        elif part == "moauto":
            inductor_config.triton.mix_order_reduction_autotune_split_size = True
        elif part == "fusedhead":
            head = True
        elif part == "bf16res":
            bf16res = True
        elif part.startswith("headchunk"):
            head, M.kernels.HEAD_CHUNK_ROWS = True, int(part[9:])
        elif part == "cudagraphs":
            mode = "reduce-overhead"
        elif part == "blocks":
            mode = "blocks"
        elif part == "autotune":
            mode = "max-autotune-no-cudagraphs"
        elif part.startswith("mb"):
            micro = int(part[2:])
        elif part != "base":
            raise SystemExit(f"unknown variant part {part!r}")
    torch._dynamo.reset()
    return mode, micro, 1024 // micro, attention, fused, head, sync, bf16res


def run(variant: str, cfg, profile: bool, rows: int = 30) -> None:
    mode, micro, accum, attention, fused, head, sync, bf16res = apply(variant)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=attention, fused_kernels=fused,
                                                             fused_head=head))
    device = torch.device("cuda")
    torch.manual_seed(0)
    raw = M.GemmaLM(cfg.model).to(device)
    if bf16res:
        raw.embed_tokens.register_forward_hook(lambda module, args, out: out.to(torch.bfloat16))
    optimizer = configure_optimizer(raw, cfg.train, "cuda")
    graphs = mode == "reduce-overhead"
    # CUDA graphs as the loop replays them (train.cuda_graphs): a graph step per micro-batch, the loss
    # copied out, gradients kept in place (zeroed, not freed).
    model = GraphSteps(raw) if graphs else compile_blocks(raw) if mode == "blocks" else torch.compile(raw, mode=mode)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    gen = torch.Generator(device=device)
    gen.manual_seed(1)

    def next_batch():
        x = torch.randint(0, cfg.model.vocab_size, (micro, cfg.train.block_size + 1), device=device, generator=gen)
        return x[:, :-1], x[:, 1:]


    losses = []

    def step():
        losses.append(forward_backward(model, next_batch, accum, ctx, scaler))
        if sync:  # the loss, then the norm, read as the loop read them before step_results.py
            losses[-1] = losses[-1].item()
        norm = clip_gradients(raw, optimizer, scaler, cfg.train.grad_clip)
        if sync:
            norm.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=not graphs)

    start = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - start) / 10
    print(f"{variant:24s} {micro * accum * cfg.train.block_size / dt:9,.0f} tokens/s  step {1000 * dt:6.1f} ms  "
          f"compile+warm-up {warm:5.1f} s  peak {torch.cuda.max_memory_allocated() / 1e9:5.1f} GB  "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    if profile:
        from torch.profiler import ProfilerActivity
        with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            step()  # two steps: the gap between them is part of what a step costs
            step()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / 2
        from bench_ddp import intervals_union
        kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                         if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() > 0)
        spans = intervals_union([(s, e) for s, e, _ in kernels])
        busy = sum(end - begin for begin, end in spans) / 2e6  # two steps
        print(f"PROFILE {variant}: step wall {1000 * wall:.1f} ms | GPU busy {1000 * busy:.1f} ms per step | "
              f"GPU idle {1000 * (wall - busy):.1f} ms", flush=True)
        print_gaps(kernels, spans)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=90))


def print_gaps(kernels: list, spans: list) -> None:
    """Where the GPU waits between kernels over the two profiled steps: gaps by size, and the largest
    with the kernels on either side (microseconds)."""
    gaps = [(spans[i + 1][0] - spans[i][1], spans[i][1], spans[i + 1][0]) for i in range(len(spans) - 1)]
    edges = (0, 5, 20, 100, 1000, float("inf"))
    for lo, hi in zip(edges, edges[1:]):
        sel = [g for g, _, _ in gaps if lo <= g < hi]
        print(f"GAPS {lo:>5}-{hi:<5} us: {len(sel):6d} gaps, {sum(sel) / 2e3:7.2f} ms per step", flush=True)
    ends = {round(e, 3): n for _, e, n in kernels}
    starts = {round(s, 3): n for s, _, n in kernels}
    t0 = spans[0][0]
    for g, before, after in sorted(gaps, reverse=True)[:25]:
        print(f"GAP {g:9.1f} us at {(before - t0) / 1e3:8.2f} ms after {ends.get(round(before, 3), '?')[:60]!r} "
              f"before {starts.get(round(after, 3), '?')[:60]!r}", flush=True)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--config", default="configs/gemma3-270m.yaml")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--rows", type=int, default=30, help="rows of the profile's table (kernels by total time)")
    args = parser.parse_args()
    config = load_config(args.config, [])
    for name in args.variants:
        try:
            run(name, config, args.profile, args.rows)
        except Exception as e:  # one variant that does not compile or run must not hide the others
            print(f"{name:24s} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        torch.cuda.empty_cache()  # the finished variant's model and optimizer are gone with run()'s frame
        torch.cuda.reset_peak_memory_stats()
