"""The per-worker training loop, plain PyTorch: `train()` reads top to bottom like nanoGPT's train.py.

Ray is not imported here. The entry point hands in a `WorkerEnv` (rank, world size, device, a
`report` callback); under Ray Train the process group already exists and `report` calls
`ray.train.report`, which persists the checkpoint. The default `report` keeps nothing: each
checkpoint is written to a temporary directory that is removed after `report` returns, so a caller
without Ray that wants them passes a `report` that copies them (as the tests do).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from .checkpoint import (Resume, capture_rank_state, check_compatible, checkpoint_name, is_checkpoint_step,
                         load_model_weights, restore_rank_state, save_checkpoint)
from .compiled import GraphSteps, step_model
from .config import Config
from .batches import BatchSampler, CudaPrefetcher
from .data import read_meta
from .sampling import cut_at, generate
from .model import GemmaLM, flops_per_token
from .optim import configure_optimizer, lr_at, step_unless
from .profiling import StepProfiler
from .peer_copies import shard_transport
from .provenance import code_version
from .sharded_adamw import ShardedAdamW
from .step_results import StepResults
from .throughput import CompileWatch, Figures, StepClock, format_flops, measure_peak_flops, progress_line
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
    launch_time: Optional[float] = None  # time.time() the run was launched (start-up counts from it); None: train()'s start
    startup_marks: dict[str, float] = field(default_factory=dict)  # {phase: time.time()} between launch and train()


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


def forward_backward(model: torch.nn.Module, next_batch: Callable, micro_steps: int, autocast,
                     scaler: torch.amp.GradScaler) -> torch.Tensor:
    """Accumulate gradients over `micro_steps` micro-batches; return their mean loss (over ranks too),
    a float32 scalar on the device: reading it waits for the GPU, so the caller reads it when needed.

    Each loss is divided by `micro_steps`, so the summed gradient is that of one batch
    `micro_steps` times larger (and the clip norm means the same for any k). Under DDP only the
    last micro-step all-reduces.
    """
    losses = []
    for micro in range(micro_steps):
        x, y = next_batch()
        sync = micro == micro_steps - 1 or not isinstance(model, DDP)
        with (contextlib.nullcontext() if sync else model.no_sync()):
            with autocast:
                _, loss = model(x, y)
            scaler.scale(loss / micro_steps).backward()
        losses.append(loss.detach())
    mean = torch.stack(losses).float().mean()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # The mean over ranks: every rank then skips (or takes) a non-finite step alike, a NaN on one
        # rank reaching all; ranks that decided alone could diverge or hang in the next collective.
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
    return mean


def clip_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to `max_norm` (0: don't); return the norm before clipping (on the device)."""
    max_norm = max_norm if max_norm > 0 else float("inf")
    if isinstance(optimizer, ShardedAdamW):  # reduces the gradients first: each rank clips its own slice
        return optimizer.reduce_and_clip(max_norm)
    scaler.unscale_(optimizer)  # no-op unless float16; clipping must see the true gradients
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


@torch.inference_mode()
def estimate_loss(model: torch.nn.Module, eval_iters: int, autocast, batches: dict[str, Callable]) -> dict[str, float]:
    """Mean loss over `eval_iters` batches of each split, in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    out = {}
    for split, next_batch in batches.items():
        losses = torch.zeros(eval_iters)
        for i in range(eval_iters):
            x, y = next_batch()
            with autocast:
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


def sample_texts(model: GemmaLM, tokenizer: TextTokenizer, t, device: torch.device, autocast) -> list[str]:
    """Continuations of the fixed prompt with a fixed seed, so evals compare like with like."""
    prompt = tokenizer.encode(t.sample_prompt) or [tokenizer.eot_id]
    idx = torch.tensor([prompt] * t.num_samples, device=device)
    with autocast:
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


@dataclass
class RunState:
    """The run's progress, saved in every checkpoint's state.json and restored from one (weights,
    optimizer and each rank's RNG and sampler state travel beside it)."""

    world_size: int
    run_name: str
    step: int = 0  # the last optimizer step done
    history: list[dict] = field(default_factory=list)  # one entry per evaluation
    step_losses: list[float] = field(default_factory=list)  # every optimizer step's loss
    skipped_steps: int = 0  # non-finite steps whose update was skipped
    restarts: int = 0  # resumes from a checkpoint (after a failure or --resume)
    wandb_run_id: Optional[str] = None
    code: dict = field(default_factory=code_version)  # the code that wrote the checkpoint

    PROGRESS = ("step", "history", "step_losses", "skipped_steps", "restarts", "wandb_run_id")

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's progress; this run's own world size, name and code stay."""
        for key in self.PROGRESS:
            setattr(self, key, state[key])


@dataclass
class Parts:
    """What a worker trains with, built once by `train`."""

    model: torch.nn.Module  # what a step runs: compiled and/or wrapped for data parallelism
    raw_model: GemmaLM  # the plain module: checkpoints, evaluation, samples
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # enabled only for float16
    autocast: Any  # the autocast context, or a null one for float32


def optimizer_step(parts: Parts, next_batch: Callable, step: int, t) -> tuple[float, torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """One optimizer step: lr from the schedule, accumulate, clip, update unless the loss or the gradient
    norm is not finite (the step still counts: schedule and data move on). Nothing here waits for the
    GPU. Returns (lr, loss, grad norm, skipped), the last three as device scalars (`StepResults` reads them)."""
    lr = lr_at(step, t)
    for group in parts.optimizer.param_groups:
        group["lr"] = lr
    loss = forward_backward(parts.model, next_batch, t.grad_accum_steps, parts.autocast, parts.scaler)
    grad_norm = clip_gradients(parts.raw_model, parts.optimizer, parts.scaler, t.grad_clip)
    finite = torch.isfinite(loss)
    if not parts.scaler.is_enabled():  # float16: an infinite gradient is the scaler's (it skips, lowers the scale)
        finite &= torch.isfinite(grad_norm)
    skipped = ~finite
    step_unless(parts.optimizer, parts.scaler, skipped)
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=not isinstance(parts.model, GraphSteps))  # graphs: gradients kept in place
    return lr, loss, grad_norm, skipped


def evaluate(parts: Parts, eval_samplers: dict[str, BatchSampler], t, device: torch.device) -> dict[str, float]:
    """Train and val loss on the same fixed batches as every evaluation, averaged over ranks."""
    for sampler in eval_samplers.values():
        sampler.reset()
    return mean_over_ranks(estimate_loss(parts.raw_model, t.eval_batches, parts.autocast, eval_samplers), device)


def log_samples(parts: Parts, tokenizer: Optional[TextTokenizer], t, device: torch.device, step: int,
                tracker: Tracker, log: Callable[[str], None]) -> None:
    if tokenizer is None:
        return
    samples = sample_texts(parts.raw_model, tokenizer, t, device, parts.autocast)
    for text in samples:
        log(f"[raypipe] sample @ step {step}: {text!r}")
    tracker.log_samples(step, t.sample_prompt, samples)


def checkpoint_and_report(parts: Parts, cfg: Config, env: WorkerEnv, state: RunState, metrics: dict,
                          train_batches, data_files: dict[str, Path], last_step: int) -> None:
    """Report the evaluation to Ray, with a checkpoint at checkpoint steps (every rank writes its own
    RNG and sampler state; rank 0 the rest)."""
    step, t = metrics["step"], cfg.train
    if not is_checkpoint_step(step, last_step, t.eval_interval, t.checkpoint_interval):
        env.report(metrics, None)
        return
    with tempfile.TemporaryDirectory(prefix="raypipe-ckpt-") as tmp:
        rank_state = capture_rank_state(train_batches, env.device)
        optimizer_state = parts.optimizer.state_dict()  # on every rank: a sharded optimizer gathers it
        extra = dict(model=parts.raw_model, optimizer_state=optimizer_state, config=cfg, copy_files=data_files,
                     state={**state.state_dict(), "tokens": metrics["tokens"], "scaler": parts.scaler.state_dict()}
                     ) if env.rank == 0 else {}
        env.report(metrics, save_checkpoint(tmp, checkpoint_name(step), rank=env.rank, rank_state=rank_state, **extra))


def checkpoint_data_files(meta: dict, data_dir: str) -> dict[str, Path]:
    """The data's meta.json and tokenizer, copied into each checkpoint so it encodes prompts on its own."""
    files = {"data_meta.json": Path(data_dir) / "meta.json"}
    tokenizer_file = meta.get("tokenizer", {}).get("file")
    if tokenizer_file and (Path(data_dir) / tokenizer_file).is_file():
        files[tokenizer_file] = Path(data_dir) / tokenizer_file
    return files


def summarize(state: RunState, clock: StepClock, first_step: int, parts: Parts, tracker: Tracker, t,
              device: torch.device, startup_s: Optional[float], phases: dict[str, float], compile_s: float) -> dict:
    """The run's summary (rank 0's is the run's), with this session's step times for benchmarks."""
    history, steady = state.history, clock.steady()
    best = min(history, key=lambda h: h["val_loss"])
    return {
        "final_val_loss": history[-1]["val_loss"], "best_val_loss": best["val_loss"], "best_step": best["step"],
        "final_train_loss": history[-1]["train_loss"], "steps": state.step, "max_steps": t.max_steps,
        "tokens": state.step * clock.tokens_per_step,
        # steady state: this session's steps that did not compile (compilation is compile_s)
        "tokens_per_sec": steady.tokens_per_sec, "mfu": steady.mfu,
        "tokens_per_sec_over": f"this session's optimizer steps that did not compile (nor were traced): {steady.steps} of "
                               f"{len(clock.step_times)}",
        "compiled_steps": clock.compiled_steps(first_step), "compile_s": compile_s,
        "traced_steps": clock.traced_steps(first_step),  # train.profile_from
        "startup_s": startup_s,  # launch to the start of this session's first optimizer step
        "startup_phases_s": phases,  # when each phase the launcher marked was reached, in seconds after launch
        "flops_per_token": clock.flops_per_token, "peak_flops": clock.peak() if steady.mfu is not None else None,
        "train_time_s": sum(clock.step_times), "num_params": parts.raw_model.num_params(), "world_size": state.world_size,
        "skipped_steps": state.skipped_steps, "restarts": state.restarts,
        "wandb_mode": tracker.mode, "wandb_run_id": tracker.run_id, "history": history, "code": state.code,
        # this session's steps, for benchmarks: wall time of each, host time waiting for batches
        "step_times_s": clock.step_times, "data_wait_s": clock.data_waits,
        # torch's allocator does not count symmetric memory (ZeRO-1's buffers under peer copies): added here
        "peak_gpu_memory_gb": (torch.cuda.max_memory_allocated(device) + getattr(parts.optimizer, "uncounted_bytes", 0)) / 1e9
        if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),  # under Ray: OMP_NUM_THREADS, the worker's ray.cpus_per_worker
    }


def train(cfg: Config, env: WorkerEnv, resume: Optional[Resume] = None) -> dict:
    """Train up to cfg.train.max_steps optimizer steps (or stop_at); return the summary (rank 0's
    is the run's). With `resume`, continue that checkpoint's run exactly where it stopped."""
    t, device = cfg.train.for_worker(env.world_size), env.device  # this worker's micro-batch and accumulation
    launch = env.launch_time or time.time()
    data_dir = env.data_dir or cfg.data.dir  # checkpoints keep cfg.data.dir, the location, not the copy
    meta = read_meta(data_dir)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = meta["vocab_size"]
    master = env.rank == 0
    log = env.log if master else (lambda line: None)
    # The peak the MFU figures divide by: train.peak_flops, or measured while this GPU is idle, before the model
    # exists (once steps have heated it, the same measurement runs at lower clocks, and the live MFU read about
    # 8% above what `raypipe.bench`, which measures before Ray starts, reported for the same run).
    peak_flops = (t.peak_flops or measure_peak_flops(device)) if master else None

    # Model: same initial weights on every rank (DDP and ZeRO-1 also broadcast rank 0's), drawn where it
    # trains: on a GPU that is milliseconds, against 1.7 s for the recipe's 165M weights on a CPU.
    torch.manual_seed(t.seed)
    with device:
        raw_model = GemmaLM(cfg.model)
    dtype = autocast_dtype(t.dtype, device)
    sharded = env.world_size > 1 and t.shard_optimizer  # ZeRO-1 (the parameters become views into its buffer)
    optimizer = (ShardedAdamW(raw_model, t, device, t.ddp_grad_dtype, overlap=t.overlap_comm,
                              buckets=raw_model.gradient_buckets() if t.overlap_comm else None,
                              transport=shard_transport(t, device, log)) if sharded
                 else configure_optimizer(raw_model, t, device.type))
    parts = Parts(model=raw_model, raw_model=raw_model, optimizer=optimizer,
                  scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
                  autocast=autocast_context(dtype, device))

    # Data: every rank draws its own windows; eval uses a fixed stream, the same batches each time,
    # so successive val losses differ by the model, not by the sample.
    def sampler(split: str, stream: str, from_step: int = 0) -> BatchSampler:
        return BatchSampler(data_dir, split, t.block_size, t.batch_size, device, t.seed, env.rank, stream, from_step)

    train_batches = sampler("train", "batches")
    eval_samplers = {split: sampler(split, "eval") for split in ("train", "val")}
    tokens_per_step = t.tokens_per_step(env.world_size)

    state = RunState(world_size=env.world_size, run_name=env.run_name)
    if resume is not None:
        check_compatible(resume.path, cfg, meta, env.world_size)
        load_model_weights(raw_model, resume.model, resume.path)
        parts.optimizer.load_state_dict(resume.optimizer)
        parts.scaler.load_state_dict(resume.state["scaler"])
        state.load_state_dict(resume.state)
        if resume.rank_state is not None:
            restore_rank_state(resume.rank_state, train_batches, device)
        else:  # another worker count: a stream none of the run's ranks has drawn from before
            train_batches = sampler("train", "batches", from_step=state.step)
            log(f"[raypipe] {resume.path.name} was written by {resume.state['world_size']} worker(s); going on with "
                f"{env.world_size}, each drawing a new batch stream (the same tokens per step, other batches than "
                "an uninterrupted run's)")
        state.restarts += 1
        if resume.state.get("run_name") != env.run_name:  # a new run from another's checkpoint: new W&B run
            state.wandb_run_id = None
    if device.type == "cuda" and t.prefetch:  # after a resume has set the sampler's position
        train_batches = CudaPrefetcher(train_batches)
    next_train_batch = Timed(train_batches)
    parts.model = step_model(raw_model, t, device, env.world_size, sharded)

    data_files = checkpoint_data_files(meta, data_dir)
    tokenizer = load_sampling_tokenizer(meta, data_dir, env) if master and t.sample_tokens else None
    # Evaluations the checkpoint holds and this W&B run may lack (lost when a run was killed) go in first.
    tracker = Tracker(cfg.wandb, env.run_name, cfg.to_dict(), env.out_dir, enabled=master, run_id=state.wandb_run_id,
                      history=state.history)
    state.wandb_run_id = tracker.run_id
    first_step, last_step = state.step + 1, min(t.max_steps, t.stop_at or t.max_steps)
    log(f"[raypipe] {raw_model.num_params():,} parameters | {env.world_size} worker(s) on {device.type} | "
        f"{dtype} | {tokens_per_step:,} tokens/step | {t.max_steps} steps = "
        f"{tokens_per_step * t.max_steps:,} tokens | W&B {tracker.mode}")
    if peak_flops:
        log(f"[raypipe] MFU against {format_flops(peak_flops)} per device ("
            + ("train.peak_flops)" if t.peak_flops else "measured at the start; train.peak_flops fixes it)"))
    if resume is not None:
        log(f"[raypipe] resumed from {resume.path.name} at step {state.step} (restart {state.restarts})")

    watch = CompileWatch(log)
    clock = StepClock(next_train_batch, watch, tokens_per_step, flops_per_token(cfg.model, raw_model.num_params(), t.block_size),
                      peak=lambda: peak_flops, devices=env.world_size)
    results, startup_s = StepResults(state, t.max_nonfinite_steps, log), time.time() - launch
    phases = {name: at - launch for name, at in env.startup_marks.items()} if env.launch_time else {}  # where it went
    log(f"[raypipe] first step {startup_s:.1f} s after launch"
        + (f" ({', '.join(f'{name} at {s:.1f} s' for name, s in phases.items())})" if phases else ""))
    profiler = StepProfiler(t.profile_from, t.profile_steps, (first_step, last_step), env.out_dir, env.rank, device, log)
    frozen_at = -1  # compilations seen when the heap was last frozen
    try:
        with watch:
            for step in range(first_step, last_step + 1):
                eval_step = step % t.eval_interval == 0 or step == last_step
                report = eval_step or step % t.log_interval == 0
                traced = profiler.covers(step)  # timed at once (the trace's export is not the next step's) and left out
                with profiler.step(step), clock.step(device, sync=report or traced, traced=traced):
                    lr, loss, grad_norm, skipped = optimizer_step(parts, next_train_batch, step, t)
                    results.add(step, lr, loss, grad_norm, skipped)
                if watch.count != frozen_at:  # the first step, or one (or an evaluation) that compiled
                    freeze_heap()
                    frozen_at = watch.count
                settled = results.settle(keep_newest=not report)
                state.step = step
                if not report:
                    continue
                lr, loss, grad_norm = settled.lr, settled.loss, settled.grad_norm  # this step's, read at once
                figures, seconds_per_step = clock.interval()  # since the last report: progress line or evaluation
                if step % t.log_interval == 0:
                    log(progress_line(step, t.max_steps, loss, lr, figures, seconds_per_step, last_step))
                    tracker.log({"step_loss": loss, "learning_rate": lr, "grad_norm": grad_norm,
                                 **{k: v for k, v in figures.as_metrics().items() if v is not None}}, step=step)
                if eval_step:
                    evaluate_and_report(parts, cfg, env, state, eval_samplers, tokenizer, tracker, watch, clock,
                                        figures, (step, lr, loss, grad_norm), train_batches, data_files, last_step)
    finally:
        gc.unfreeze()  # a process that trains again (tests, a resume in place) gets this run's objects collected
        if isinstance(train_batches, CudaPrefetcher):
            train_batches.close()
        tracker.finish()  # also on errors: W&B keeps what was logged
    return summarize(state, clock, first_step, parts, tracker, t, device, startup_s, phases, watch.seconds)


def freeze_heap() -> None:
    """Collect once, then keep every object alive now (torch, Inductor's compiled graphs, the model) out of
    Python's cyclic garbage collector (gc.freeze). A full collection of that heap took 200-290 ms; one that
    fell between the first steps stalled the GPU (a 30-step benchmark read 2-3% slow), and with several
    workers one rank's pause holds every rank at the next collective. Run right after a step is queued,
    the collection overlaps that step on a GPU."""
    gc.collect()
    gc.freeze()


def evaluate_and_report(parts: Parts, cfg: Config, env: WorkerEnv, state: RunState, eval_samplers, tokenizer, tracker,
                        watch: CompileWatch, clock: StepClock, figures: Figures, progress: tuple, train_batches,
                        data_files: dict[str, Path], last_step: int) -> None:
    """An evaluation: losses, its line and W&B entry (throughput over the interval), samples, the report."""
    (step, lr, loss, grad_norm), t, device = progress, cfg.train, env.device
    log = env.log if env.rank == 0 else (lambda line: None)
    losses = evaluate(parts, eval_samplers, t, device)
    watch.settle()  # an evaluation that compiled (e.g. a first forward without gradients)
    metrics = {
        "step": step, "tokens": step * clock.tokens_per_step,
        "train_loss": losses["train"], "val_loss": losses["val"], "learning_rate": lr,
        "grad_norm": grad_norm, "step_loss": loss, "skipped_steps": state.skipped_steps,
        **figures.as_metrics(), "elapsed_s": time.perf_counter() - clock.start,
    }
    state.history.append(metrics)
    tracker.log(metrics, step=step)
    mfu = f" | MFU {figures.mfu:.1%}" if figures.mfu is not None else ""
    log(f"[raypipe] step {step:>6}/{t.max_steps} | train {metrics['train_loss']:.4f} | "
        f"val {metrics['val_loss']:.4f} | lr {lr:.2e} | grad_norm {grad_norm:.3f} | "
        f"{figures.speed()}{mfu} | {metrics['elapsed_s']:.0f}s")
    log_samples(parts, tokenizer, t, device, step, tracker, log)
    checkpoint_and_report(parts, cfg, env, state, metrics, train_batches, data_files, last_step)
