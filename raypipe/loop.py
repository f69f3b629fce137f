"""The per-worker training loop, plain PyTorch: read top to bottom like nanoGPT's train.py.

Ray is not imported here. The entry point hands in a `WorkerEnv` (rank, world size, device, a
`report` callback); under Ray Train the process group already exists and `report` calls
`ray.train.report`, without Ray `report` just keeps the checkpoint on local disk.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from .checkpoint import (Resume, capture_rank_state, check_compatible, load_model_weights,
                         restore_rank_state, save_checkpoint)
from .config import Config
from .data import BatchSampler, CudaPrefetcher, read_meta
from .sampling import cut_at, generate
from .model import GemmaLM
from .optim import configure_optimizer, lr_at
from .provenance import code_version
from .tokenizer import TextTokenizer
from .tracking import Tracker


@dataclass
class WorkerEnv:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    run_name: str = "raypipe"
    out_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="raypipe-")))  # W&B files
    # report(metrics, checkpoint_dir or None): called by every rank the same number of times.
    report: Callable[[dict, Optional[Path]], None] = lambda metrics, checkpoint: None
    log: Callable[[str], None] = print
    data_dir: Optional[str] = None  # a node-local copy of cfg.data.dir (raypipe/staging.py); None: cfg.data.dir


def autocast_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


def autocast_context(dtype: torch.dtype, device: torch.device):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def forward_backward(model: torch.nn.Module, next_batch: Callable, micro_steps: int, ctx,
                     scaler: torch.amp.GradScaler) -> float:
    """Accumulate gradients over `micro_steps` micro-batches; return their mean loss (over ranks too).

    Each loss is divided by `micro_steps`, so the summed gradient is that of one batch
    `micro_steps` times larger (and the clip norm means the same for any k). Under DDP only the
    last micro-step all-reduces.
    """
    losses = []
    for micro in range(micro_steps):
        x, y = next_batch()
        sync = micro == micro_steps - 1 or not isinstance(model, DDP)
        with (contextlib.nullcontext() if sync else model.no_sync()):
            with ctx:
                _, loss = model(x, y)
            scaler.scale(loss / micro_steps).backward()
        losses.append(loss.detach())
    mean = torch.stack(losses).float().mean()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # The mean over ranks: every rank then skips (or takes) a non-finite step alike, a NaN on one
        # rank reaching all; ranks that decided alone could diverge or hang in the next collective.
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
    return mean.item()  # one host sync per optimizer step


def clip_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   max_norm: float) -> float:
    """Clip the global gradient norm to `max_norm` (0: don't); return the norm before clipping."""
    scaler.unscale_(optimizer)  # no-op unless float16; clipping must see the true gradients
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return float(norm)


@torch.inference_mode()
def estimate_loss(model: torch.nn.Module, eval_iters: int, ctx, batches: dict[str, Callable]) -> dict[str, float]:
    """Mean loss over `eval_iters` batches of each split, in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    out = {}
    for split, next_batch in batches.items():
        losses = torch.zeros(eval_iters)
        for i in range(eval_iters):
            x, y = next_batch()
            with ctx:
                _, loss = model(x, y)
            losses[i] = loss.item()
        out[split] = losses.mean().item()
    model.train(was_training)
    return out


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


def load_sampling_tokenizer(meta: dict, data_dir: str, env: WorkerEnv) -> Optional[TextTokenizer]:
    try:
        return TextTokenizer(meta, Path(data_dir))
    except Exception as e:  # e.g. tiktoken's GPT-2 file not cached offline: train on, without samples
        env.log(f"[raypipe] no samples at eval: the tokenizer did not load ({e})")
        return None


def sample_texts(model: GemmaLM, tokenizer: TextTokenizer, t, device: torch.device, ctx) -> list[str]:
    """Continuations of the fixed prompt with a fixed seed, so evals compare like with like."""
    prompt = tokenizer.encode(t.sample_prompt) or [tokenizer.eot_id]
    idx = torch.tensor([prompt] * t.num_samples, device=device)
    with ctx:
        out = generate(model, idx, t.sample_tokens, temperature=0.8, top_k=50,
                       generator=torch.Generator().manual_seed(t.seed), stop_id=tokenizer.eot_id)
    return [tokenizer.decode(cut_at(row, len(prompt), tokenizer.eot_id)) for row in out.tolist()]


class Timed:
    """Wraps a batch source and adds up the host time spent in it (the step's wait for data)."""

    def __init__(self, source: Callable):
        self.source, self.seconds = source, 0.0

    def __call__(self):
        start = time.perf_counter()
        try:
            return self.source()
        finally:
            self.seconds += time.perf_counter() - start


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


def train(cfg: Config, env: WorkerEnv, resume: Optional[Resume] = None) -> dict:
    """Train up to cfg.train.max_steps optimizer steps (or stop_at); return the summary (rank 0's
    is the run's). With `resume`, continue that checkpoint's run exactly where it stopped."""
    t, device = cfg.train, env.device
    data_dir = env.data_dir or cfg.data.dir  # checkpoints keep cfg.data.dir, the location, not the copy
    meta = read_meta(data_dir)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = meta["vocab_size"]
    master = env.rank == 0

    # Model: same initial weights on every rank (DDP also broadcasts rank 0's at wrap time).
    torch.manual_seed(t.seed)
    raw_model = GemmaLM(cfg.model).to(device)
    optimizer = configure_optimizer(raw_model, t, device.type)
    dtype = autocast_dtype(t.dtype, device)
    ctx = autocast_context(dtype, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    # Data: every rank draws its own windows; eval uses a fixed stream, the same batches each time,
    # so successive val losses differ by the model, not by the sample.
    def sampler(split: str, stream: str) -> BatchSampler:
        return BatchSampler(data_dir, split, t.block_size, t.batch_size, device, t.seed, env.rank, stream)

    train_batches = sampler("train", "batches")
    eval_batches = {split: sampler(split, "eval") for split in ("train", "val")}
    tokens_per_step = t.tokens_per_step(env.world_size)

    # Run state: all of it goes into every checkpoint, and comes back from one.
    run = {"step": 0, "history": [], "step_losses": [], "skipped_steps": 0, "restarts": 0, "wandb_run_id": None,
           "world_size": env.world_size, "run_name": env.run_name, "code": code_version()}
    if resume is not None:
        check_compatible(resume.path, cfg, meta, env.world_size)
        load_model_weights(raw_model, resume.model, resume.path)
        optimizer.load_state_dict(resume.optimizer)
        scaler.load_state_dict(resume.state["scaler"])
        restore_rank_state(resume.rank_state, train_batches, device)
        run.update({k: resume.state[k] for k in run if k not in ("world_size", "run_name", "code")})
        run["restarts"] += 1
        if resume.state.get("run_name") != env.run_name:  # a new run from another's checkpoint: new W&B run
            run["wandb_run_id"] = None
    if device.type == "cuda" and t.prefetch:  # after a resume has set the sampler's position
        train_batches = CudaPrefetcher(train_batches)
    next_train_batch = Timed(train_batches)
    model = torch.compile(raw_model) if t.compile else raw_model
    if env.world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # Checkpoints carry the data's meta.json and tokenizer, so they encode prompts on their own.
    data_files = {"data_meta.json": Path(data_dir) / "meta.json"}
    tokenizer_file = meta.get("tokenizer", {}).get("file")
    if tokenizer_file and (Path(data_dir) / tokenizer_file).is_file():
        data_files[tokenizer_file] = Path(data_dir) / tokenizer_file
    tokenizer = load_sampling_tokenizer(meta, data_dir, env) if master and t.sample_tokens else None

    # Evaluations the checkpoint holds and this W&B run may lack (lost when a run was killed) go in first.
    tracker = Tracker(cfg.wandb, env.run_name, cfg.to_dict(), env.out_dir, enabled=master, run_id=run["wandb_run_id"],
                      history=run["history"])
    run["wandb_run_id"] = tracker.run_id
    first_step, last_step = run["step"] + 1, min(t.max_steps, t.stop_at or t.max_steps)
    if master:
        env.log(f"[raypipe] {raw_model.num_params():,} parameters | {env.world_size} worker(s) on {device.type} | "
                f"{dtype} | {tokens_per_step:,} tokens/step | {t.max_steps} steps = "
                f"{tokens_per_step * t.max_steps:,} tokens | W&B {tracker.mode}")
        if resume is not None:
            env.log(f"[raypipe] resumed from {resume.path.name} at step {run['step']} (restart {run['restarts']})")

    start, step_times, data_waits = time.perf_counter(), [], []  # per step of this session
    checkpoint_every = t.checkpoint_interval or t.eval_interval
    nonfinite_streak = 0
    try:
        for step in range(first_step, last_step + 1):
            step_start, waited_before = time.perf_counter(), next_train_batch.seconds
            lr = lr_at(step, t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = forward_backward(model, next_train_batch, t.grad_accum_steps, ctx, scaler)
            grad_norm = clip_gradients(raw_model, optimizer, scaler, t.grad_clip)
            # float16: an infinite gradient is the scaler's business (it skips and lowers the scale).
            if math.isfinite(step_loss) and (math.isfinite(grad_norm) or scaler.is_enabled()):
                scaler.step(optimizer)
                nonfinite_streak = 0
            else:  # skip the update; the step still counts (schedule and data move on)
                run["skipped_steps"] += 1
                nonfinite_streak += 1
                if master:
                    env.log(f"[raypipe] step {step}: non-finite loss {step_loss} / grad norm {grad_norm}: update skipped")
                if nonfinite_streak >= t.max_nonfinite_steps:
                    raise NonFiniteError(f"{nonfinite_streak} optimizer steps in a row had a non-finite loss or "
                                         f"gradient norm (last: step {step}); the last checkpoint "
                                         f"(step {run['history'][-1]['step'] if run['history'] else 'none'}) is intact. "
                                         "Lower train.learning_rate or train.grad_clip, or check the data.")
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - step_start)
            data_waits.append(next_train_batch.seconds - waited_before)
            run["step"] = step
            run["step_losses"].append(step_loss)
            if step % t.log_interval == 0:
                tracker.log({"step_loss": step_loss, "learning_rate": lr, "grad_norm": grad_norm}, step=step)

            if step % t.eval_interval == 0 or step == last_step:
                for eval_sampler in eval_batches.values():
                    eval_sampler.reset()
                losses = mean_over_ranks(estimate_loss(raw_model, t.eval_batches, ctx, eval_batches), device)
                metrics = {
                    "step": step, "tokens": step * tokens_per_step,
                    "train_loss": losses["train"], "val_loss": losses["val"], "learning_rate": lr,
                    "grad_norm": grad_norm, "step_loss": step_loss, "skipped_steps": run["skipped_steps"],
                    "tokens_per_sec": len(step_times) * tokens_per_step / sum(step_times),
                    "data_wait_frac": sum(data_waits) / sum(step_times),
                    "elapsed_s": time.perf_counter() - start,
                }
                run["history"].append(metrics)
                tracker.log(metrics, step=step)
                if master:
                    env.log(f"[raypipe] step {step:>6}/{t.max_steps} | train {metrics['train_loss']:.4f} | "
                            f"val {metrics['val_loss']:.4f} | lr {lr:.2e} | grad_norm {grad_norm:.3f} | "
                            f"{metrics['tokens_per_sec']:,.0f} tok/s | {metrics['elapsed_s']:.0f}s")
                if tokenizer is not None:
                    samples = sample_texts(raw_model, tokenizer, t, device, ctx)
                    for text in samples:
                        env.log(f"[raypipe] sample @ step {step}: {text!r}")
                    tracker.log_samples(step, t.sample_prompt, samples)
                if step % checkpoint_every and step != last_step:
                    env.report(metrics, None)
                    continue
                with tempfile.TemporaryDirectory(prefix="raypipe-ckpt-") as tmp:
                    rank_state = capture_rank_state(train_batches, device)
                    extra = dict(model=raw_model, optimizer=optimizer, config=cfg, copy_files=data_files,
                                 state={**run, "tokens": metrics["tokens"], "scaler": scaler.state_dict()}) if master else {}
                    checkpoint = save_checkpoint(tmp, f"checkpoint_{step:07d}", rank=env.rank,
                                                 rank_state=rank_state, **extra)
                    env.report(metrics, checkpoint)
    finally:
        if isinstance(train_batches, CudaPrefetcher):
            train_batches.close()
        tracker.finish()  # also on errors: W&B keeps what was logged
    history, train_time = run["history"], sum(step_times)
    best = min(history, key=lambda h: h["val_loss"])
    return {
        "final_val_loss": history[-1]["val_loss"], "best_val_loss": best["val_loss"], "best_step": best["step"],
        "final_train_loss": history[-1]["train_loss"], "steps": run["step"], "max_steps": t.max_steps,
        "tokens": run["step"] * tokens_per_step,
        "tokens_per_sec": (last_step - first_step + 1) * tokens_per_step / train_time if train_time else None,
        "train_time_s": train_time, "num_params": raw_model.num_params(), "world_size": env.world_size,
        "skipped_steps": run["skipped_steps"], "restarts": run["restarts"],
        "wandb_mode": tracker.mode, "wandb_run_id": tracker.run_id, "history": history, "code": run["code"],
        # this session's steps, for benchmarks: wall time of each, host time waiting for batches
        "step_times_s": step_times, "data_wait_s": data_waits,
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
    }
