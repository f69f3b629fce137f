"""The Ray Train driver: a TorchTrainer over the per-worker loop, and the run's outputs.

`run(cfg)` checks the data (preparing the embedded corpus when that is the source) and any checkpoint
to resume before Ray starts, starts or joins Ray, runs `train_func` on every worker, then writes
`summary.json`, `config.yaml` and `metrics.jsonl` into the run directory (`storage_path/name`). A
failed run ends in `RunFailed`: the root cause and where the last complete checkpoint is.
`train_func` is the thin adapter between Ray and `loop.train`. Used by the train, sweep and bench CLIs.

The trainer is TorchTrainer's own parts (Ray Train's DataParallelTrainer with a torch backend,
torch_backend.py), and nothing here imports torch: the workers do. Importing it with the model's
modules in the driver cost 4.5 s of an H100 host's launch before Ray started;
tests/test_torch_backend.py runs a whole launch with torch unimportable in the driver.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import yaml

from .checkpoint import check_compatible, choose_resume, latest_checkpoint, load_for_resume, load_state
from .config import Config, ConfigError
from .corpus import ensure_embedded_corpus
from .data import unigram_entropy, validate_data
from .errors import NonFiniteError, UserError
from .joining import check_cluster_answers
from .staging import node_cache_dir, stage_data, staging_enabled
from .tracking import resolve_mode

COMPILE_CACHE_ENV = "RAYPIPE_COMPILE_CACHE"  # a node's own compile cache directory (its `ray start` environment)
DEFAULT_COMPILE_CACHE = Path(tempfile.gettempdir()) / "raypipe-compile-cache"
# Ray Train's console lines at every report (the whole metrics dict, each checkpoint's path): they drown
# the progress line. Its log files under the session's logs/train/ keep them; warnings and errors still show.
RAY_PER_REPORT_LINES = ("Reporting training result", "Checkpoint successfully created at")


class RunFailed(RuntimeError):
    """The training function failed (after any retries); the message carries the cause."""


def local_data_dir(cfg: Config) -> str:
    """Where this process reads the data: cfg.data.dir, or this node's verified copy of it."""
    if staging_enabled(cfg.data.dir, cfg.data.cache_dir):
        return str(stage_data(cfg.data.dir, node_cache_dir(cfg.data.cache_dir)))
    return cfg.data.dir


def check_data(cfg: Config) -> dict:
    """Make sure the data exists and fits the run; fill model.vocab_size from it when unset.
    A checkpoint to resume from must fit the model and the data: checked here, before Ray starts.
    Data from a URI or with data.cache_dir is staged on the driver's node first: a bad copy or
    checksum is an error here, before any worker starts."""
    if cfg.data.source == "embedded":
        ensure_embedded_corpus(cfg.data)
    meta = validate_data(local_data_dir(cfg), cfg.train.block_size, cfg.model.vocab_size)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = meta["vocab_size"]
    if cfg.resume_from:
        check_compatible(cfg.resume_from, cfg, meta, cfg.ray.num_workers)
    return meta


def check_wandb_login(cfg: Config) -> None:
    """wandb.mode online needs credentials; on one machine their absence is known before Ray starts
    (on a cluster they live on the worker nodes, which the driver cannot see)."""
    if cfg.wandb.mode == "online" and not os.environ.get("RAY_ADDRESS") and resolve_mode("auto") != "online":
        raise ConfigError("wandb.mode: 'online', but this machine has no W&B credentials (WANDB_API_KEY or "
                          "`wandb login`): log in, or set wandb.mode: auto (offline without credentials) or offline")


def process_start_time() -> float:
    """When this process started (time.time() scale): the launch a start-up time counts from. Linux
    keeps the start in clock ticks since boot (/proc/self/stat, field 22); elsewhere: now."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()  # fields from the 3rd on
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


def local_misfit(cfg: Config, have: Optional[dict] = None) -> Optional[str]:
    """Why the workers cannot all start on this machine (None: they can, or a cluster decides).
    `have`: a running Ray's resources; by default what a fresh local Ray would get."""
    if have is None:
        if os.environ.get("RAY_ADDRESS"):
            return None
        have = {"CPU": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                "GPU": local_gpus()}
    r = cfg.ray
    need_cpu = r.num_workers * r.cpus_per_worker
    need_gpu = r.num_workers * r.gpus_per_worker if r.use_gpu else 0
    if need_cpu <= have.get("CPU", 0) and need_gpu <= have.get("GPU", 0):
        return None
    return (f"ray: {r.num_workers} worker(s) x (CPU {r.cpus_per_worker:g}"
            f"{f', GPU {r.gpus_per_worker:g}' if r.use_gpu else ''}) do not fit this machine "
            f"(CPU {have.get('CPU', 0):g}, GPU {have.get('GPU', 0):g})")


def local_gpus() -> int:
    """The GPUs a fresh local Ray would register here: Ray's own count (NVML, within CUDA_VISIBLE_DEVICES).
    Asking torch instead would import it in the driver, seconds before Ray starts."""
    from ray._private.accelerators import get_accelerator_manager_for_resource

    gpus = get_accelerator_manager_for_resource("GPU")
    count, visible = gpus.get_current_node_num_accelerators(), gpus.get_current_process_visible_accelerator_ids()
    return count if visible is None else min(count, len(visible))


def train_func(loop_config: dict) -> dict:
    """What each Ray Train worker runs: the thin adapter between Ray and `loop.train`."""
    try:
        return _train_worker(loop_config)
    except (UserError, NonFiniteError) as e:  # a known failure: its message says it all, no traceback needed
        raise e.with_traceback(None) from None


def _train_worker(loop_config: dict) -> dict:
    started = time.time()
    import ray.train
    import ray.train.torch

    from .loop import WorkerEnv, train

    cfg = Config.from_dict(loop_config["config"])
    quiet_ray_report_lines()
    os.environ.update(compile_cache_env())  # before anything compiles: Inductor and Triton read these then
    context = ray.train.get_context()
    rank = context.get_world_rank()
    # After a worker failure (or when a run directory is resumed) Ray hands back the run's latest
    # checkpoint; --resume may also have named one, verified by the driver. The newest complete one
    # wins; a damaged pick of Ray's is passed over for the latest complete checkpoint beside it.
    checkpoint, resume = ray.train.get_checkpoint(), None
    with (checkpoint.as_directory() if checkpoint else contextlib.nullcontext()) as ray_dir:
        chosen = choose_resume(Path(ray_dir) if ray_dir else None, cfg.resume_from,
                               _worker_print if rank == 0 else (lambda line: None))
        if chosen is not None:
            resume = load_for_resume(chosen, rank, context.get_world_size())

    def report(metrics: dict, checkpoint_dir: Optional[Path]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=checkpoint_dir.name if checkpoint_dir else None)

    env = WorkerEnv(rank=rank, world_size=context.get_world_size(),
                    device=ray.train.torch.get_device(), run_name=cfg.ray.name,
                    out_dir=Path(loop_config["wandb_dir"]), report=report, log=_worker_print,
                    data_dir=local_data_dir(cfg),  # this node's verified copy when staging is on
                    launch_time=loop_config.get("launch_time"),
                    startup_marks={**loop_config.get("startup_marks", {}), "worker started": started})
    return {**train(cfg, env, resume), "compile_cache_dir": os.environ["TORCHINDUCTOR_CACHE_DIR"]}


def compile_cache_env() -> dict[str, str]:
    """Where torch.compile keeps its caches on this node, shared by every worker and sweep trial:
    $RAYPIPE_COMPILE_CACHE, else <tmp>/raypipe-compile-cache (inductor/ and triton/ in it). A
    TORCHINDUCTOR_CACHE_DIR or TRITON_CACHE_DIR already set is the user's own and stays."""
    root = Path(os.environ.get(COMPILE_CACHE_ENV) or DEFAULT_COMPILE_CACHE).expanduser()
    return {key: os.environ.get(key) or str(root / sub)
            for key, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton"))}


class _DropPerReportLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not str(record.msg).startswith(RAY_PER_REPORT_LINES)


def quiet_ray_report_lines() -> None:
    """Keep Ray Train's INFO lines of every report off this worker's console (not off its log files)."""
    for logger in (logging.getLogger(), logging.getLogger("ray.train")):
        for handler in logger.handlers:
            console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            if console and not any(isinstance(f, _DropPerReportLines) for f in handler.filters):
                handler.addFilter(_DropPerReportLines())


def _worker_print(line: str) -> None:
    # Ray Train patches print() into a logger and, when W&B has wrapped sys.stdout, also prints:
    # the real stdout gets the line once, and Ray forwards it to the driver.
    print(line, file=sys.__stdout__, flush=True)


# Passed on to Ray's workers when set here: NCCL's settings, the switches that keep NVLink multicast
# off on shared hosts (NCCL_NVLS_ENABLE=0 and its PyTorch / NVSHMEM twins), and compile cache directories.
WORKER_ENV_PREFIXES = ("NCCL_", "TORCH_SYMM_MEM_", "NVSHMEM_", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def worker_env_vars() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(WORKER_ENV_PREFIXES)}


def init_ray(cfg: Config) -> None:
    """Join the cluster named by RAY_ADDRESS (as `ray job submit` sets it) or start a local one."""
    import ray

    def refuse_misfit(have: Optional[dict] = None) -> None:
        misfit = None if os.environ.get("RAY_ADDRESS") else local_misfit(cfg, have)
        if misfit:
            raise ConfigError(f"{misfit}; lower ray.num_workers or ray.cpus_per_worker, or set ray.use_gpu: false")

    if ray.is_initialized():
        return
    refuse_misfit()  # what a fresh local Ray would get: refused before it starts
    check_cluster_answers(os.environ.get("RAY_ADDRESS"))
    start = time.perf_counter()
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True,
             runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1", **worker_env_vars()}})
    refuse_misfit(ray.cluster_resources())  # what it got
    prestart_autoscaling_coordinator()
    if started_local_ray():
        print(f"[raypipe] started a local Ray in {time.perf_counter() - start:.0f} s; with one kept running "
              "(`ray start --head`), each launch joins it instead and starts faster", flush=True)


def started_local_ray() -> bool:
    """Whether this process started the Ray it is connected to (a local instance that ends with it)."""
    import ray

    node = getattr(getattr(ray._private.worker, "global_worker", None), "node", None)
    return bool(node is not None and node.is_head())


def prestart_autoscaling_coordinator() -> None:
    """Ray Train's controller first asks the cluster's AutoscalingCoordinator actor for resources and
    gives it 5 s; a fresh Ray creates that actor only then, and on a busy start the call times out
    with a traceback on the console and 5 s lost. Created here, its process starts while the
    controller's does. (A detached actor: a Ray kept running keeps it.)"""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator)

        get_or_create_autoscaling_coordinator()
    except Exception:  # another Ray version (a start-up saving only): its controller creates it as before
        pass


def make_trainer(cfg: Config, wandb_dir: str, callbacks: Optional[list] = None, launch_time: Optional[float] = None,
                 startup_marks: Optional[dict[str, float]] = None):
    """`startup_marks`: {phase: time.time()} between the launch and the trainer, for the first-step line."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer  # TorchTrainer's base, without torch
    from ray.train.v2._internal.execution.callback import WorkerCallback  # Ray's hook into worker shutdown

    from .torch_backend import torch_config

    class FinishWandbOnShutdown(WorkerCallback):
        """Ctrl-C aborts the run: Ray gives each worker 5 s, then kills it. W&B keeps records in memory
        until a 32 KiB block fills, so finish the open run in that time or its last evaluations are lost."""

        def before_worker_shutdown(self):
            from .tracking import finish_open_run

            finish_open_run()

    r = cfg.ray
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.use_gpu else {})}
    return DataParallelTrainer(
        train_func,
        backend_config=torch_config(r.use_gpu),  # torch set up on the workers only, not in Ray's controller
        train_loop_config={"config": cfg.to_dict(), "wandb_dir": wandb_dir, "launch_time": launch_time,
                           "startup_marks": startup_marks or {}},
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources,
                                     placement_strategy=r.placement_strategy),
        run_config=RunConfig(
            name=r.name, storage_path=r.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=r.checkpoints_to_keep,
                                               checkpoint_score_attribute="val_loss", checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=r.max_failures),
            callbacks=[*(callbacks or []), FinishWandbOnShutdown()],
        ),
    )


def write_outputs(result, cfg: Config, summary: dict) -> None:
    """summary.json, config.yaml and metrics.jsonl beside Ray's checkpoints (local disk or a URI)."""
    fs, base = result.filesystem, result.path
    history = summary.pop("history")
    files = {
        "summary.json": json.dumps(summary, indent=2) + "\n",
        "config.yaml": yaml.safe_dump(cfg.to_dict(), sort_keys=False),
        "metrics.jsonl": "".join(json.dumps(h) + "\n" for h in history),
    }
    for name, text in files.items():
        with fs.open_output_stream(f"{base}/{name}") as f:
            f.write(text.encode())


def run(cfg: Config, callbacks: Optional[list] = None, launch_time: Optional[float] = None) -> dict:
    """One training run; `callbacks` are Ray Train callbacks (a sweep passes TuneReportCallback).
    `launch_time` (time.time()): when the command started, which start-up counts from; None: now."""
    wall_start, launch_time = time.perf_counter(), launch_time or time.time()
    check_wandb_login(cfg)
    meta = check_data(cfg)
    init_ray(cfg)
    startup_marks = {"Ray ready": time.time()}
    local_storage = "://" not in cfg.ray.storage_path
    run_dir = f"{cfg.ray.storage_path.rstrip('/')}/{cfg.ray.name}"
    wandb_dir = run_dir if local_storage else str(Path(tempfile.gettempdir()) / "raypipe-wandb" / cfg.ray.name)
    print(f"[raypipe] run {cfg.ray.name}: outputs go to {run_dir}", flush=True)  # e.g. for `ray job logs`
    from ray.train import TrainingFailedError

    try:  # Train V2 raises from fit(); older paths return result.error
        result = make_trainer(cfg, wandb_dir, callbacks, launch_time, startup_marks).fit()
        error = result.error
    except TrainingFailedError as e:
        error = e
    if error:
        raise RunFailed(describe_failure(error, run_dir)) from None
    summary = dict(result.return_value)
    best = min(result.best_checkpoints or [], key=lambda cm: cm[1]["val_loss"], default=None)
    summary.update({
        "run_dir": result.path,
        "best_checkpoint": best[0].path if best else None,
        "val_unigram_entropy": unigram_entropy(local_data_dir(cfg), "val"),
        "data_dir": cfg.data.dir, "vocab_size": meta["vocab_size"],
        "wall_time_s": time.perf_counter() - wall_start,
    })
    write_outputs(result, cfg, summary)
    print_summary(summary)
    return summary


def root_cause(error: BaseException) -> tuple[Optional[int], BaseException]:
    """(rank or None, the exception that started it) of a failed fit(): a worker's own error when
    there is one (raypipe's known errors first), else the controller's."""
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        rank = min(failures, key=lambda r: (not isinstance(failures[r], (UserError, NonFiniteError)), r))
        cause = failures[rank]
    else:
        rank, cause = None, getattr(error, "controller_failure", None) or error
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:  # RayTaskError wraps the real one
        cause = cause.cause
    return rank, cause


def is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")  # a torch error that reached the driver imported torch to be unpickled
    return torch is not None and isinstance(error, torch.OutOfMemoryError)


def describe_failure(error: BaseException, run_dir: str) -> str:
    """Two lines: what failed (the root cause, not Ray's wrapping), and where the run and its last
    complete checkpoint are, with the command that goes on from it."""
    rank, cause = root_cause(error)
    if isinstance(cause, (UserError, NonFiniteError)):
        what = str(cause)
    elif is_out_of_memory(cause):  # its message runs on for lines; what to change is ours to say
        first = ". ".join(str(cause).split(". ")[:2]).strip()[:300]  # "CUDA out of memory. Tried to allocate 3.29 GiB"
        what = (f"{type(cause).__name__}: {first}. The micro-batch does not fit this GPU: halve train.batch_size "
                "and double train.grad_accum_steps (the same sequences per step, less memory)")
    else:  # a bug or a crash: its type and first line; the worker's traceback is in the log above
        first = (str(cause).strip().splitlines() or [""])[0][:300]
        what = f"{type(cause).__name__}: {first} (traceback above)"
    where = f"training failed{f' on rank {rank}' if rank is not None else ''}: {what}\nrun directory: {run_dir}"
    if "://" in run_dir:
        return where
    last = latest_checkpoint(run_dir) if Path(run_dir).is_dir() else None
    if last is None:
        return f"{where}; no complete checkpoint was written"
    return (f"{where}; last complete checkpoint: {last.name} (step {load_state(last)['step']}); "
            f"go on with: python -m raypipe.train --resume {run_dir}")


def print_summary(s: dict) -> None:
    beat = "below" if s["final_val_loss"] < s["val_unigram_entropy"] else "NOT below"
    stopped = (f" of {s['max_steps']} (train.stop_at; go on with --resume {s['run_dir']})"
               if s["steps"] < s["max_steps"] else "")
    mfu = f", MFU {s['mfu']:.1%}" if s.get("mfu") is not None else ""
    compiling = f", compiling {s['compile_s']:.0f}s" if s.get("compile_s") else ""
    print(f"\n[raypipe] done: {s['steps']} steps{stopped}, {s['tokens']:,} tokens in {s['wall_time_s']:.0f}s wall "
          f"({s['tokens_per_sec'] or 0:,.0f} tokens/s steady{mfu}; first step {s['startup_s']:.0f}s after launch{compiling})\n"
          + (f"[raypipe] restarts: {s['restarts']}, skipped non-finite steps: {s['skipped_steps']}\n"
             if s["restarts"] or s["skipped_steps"] else "")
          + f"[raypipe] val loss: final {s['final_val_loss']:.4f}, best {s['best_val_loss']:.4f} (step {s['best_step']}); "
          f"train loss {s['final_train_loss']:.4f}\n"
          f"[raypipe] val unigram entropy {s['val_unigram_entropy']:.4f} nats: final val loss is {beat} it\n"
          f"[raypipe] best checkpoint: {s['best_checkpoint']}\n"
          f"[raypipe] run directory: {s['run_dir']} (summary.json, config.yaml, metrics.jsonl)")
