"""The config's semantic checks: every value in range, every relation between values, names that are
safe directory names. `validate(cfg)` raises ConfigError naming the origin (file or flag), the dotted
key, the value and what would be right. Reads the schema from the dataclasses it is given (config.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

from .errors import ConfigError

type_hints = functools.cache(typing.get_type_hints)  # the schema is fixed; sweeps check thousands of values


@functools.cache
def schema(cls: type, prefix: str = "") -> tuple[tuple[str, Any], ...]:
    hints, out = type_hints(cls), []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += schema(hint, f"{prefix}{f.name}.")
            continue
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        out.append((f"{prefix}{f.name}", hint))
    return tuple(out)


AUTOCAST_DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_KERNELS = ("auto", "sdpa", "matmul")  # model.attention (raypipe/model.py)
DDP_GRAD_DTYPES = ("float32", "bfloat16")  # the gradient all-reduce under several workers (raypipe/parallel.py)
SHARD_TRANSPORTS = ("auto", "collectives", "peer_copies")  # ZeRO-1's reduce and gather (raypipe/sharded_adamw.py)
WANDB_MODES = ("auto", "online", "offline", "disabled")
DATA_SOURCES = ("embedded", "prepared")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# A run or sweep name is one directory under storage_path (and a W&B run name): nothing that could
# leave that directory, hide it, look like a flag or need quoting in a shell.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=@-]{0,127}")
SAFE_NAME_RULE = ("must be a plain directory name: 1 to 128 characters from letters, digits and . _ - + = @, "
                  "starting with a letter, digit or _ (no '/', '\\', spaces, '..' or leading '-' or '.')")
RESOURCE_STEP = 0.0001  # Ray refuses a fractional CPU/GPU request below this
WANDB_PROJECT_FORBIDDEN = "/\\#?%:"


def check_name(value: Any, key: str, origin: str) -> None:
    """Refuse a run or sweep name that is not a safe single path component (SAFE_NAME_RULE)."""
    if not (isinstance(value, str) and SAFE_NAME.fullmatch(value)):
        raise ConfigError(f"{origin}: '{key}' = {value!r}: {SAFE_NAME_RULE}")


def _get(cfg, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg, origin: str = "config") -> None:
    def fail(key: str, value: Any, expected: str) -> None:
        raise ConfigError(f"{origin}: '{key}' = {value!r}: {expected}")

    def positive(section: Any, name: str, prefix: str, allow_zero: bool = False) -> None:
        v = getattr(section, name)
        if v < 0 or (v == 0 and not allow_zero):
            fail(f"{prefix}.{name}", v, "must be " + ("zero or more" if allow_zero else "greater than 0"))

    d, m, t, r, w = cfg.data, cfg.model, cfg.train, cfg.ray, cfg.wandb
    # Every float key, from the schema: NaN passes every `<` and `>` check below, inf most of them.
    for key, hint in schema(type(cfg)):
        value = _get(cfg, key)
        if hint is float and value is not None and not math.isfinite(value):
            fail(key, value, "must be a finite number")
        if hint is int and value is not None and not -2**63 <= value < 2**63:  # torch, numpy and Ray take int64
            fail(key, value, "must fit a 64-bit integer (-2**63 to 2**63 - 1)")
    for key in ("data.dir", "data.cache_dir", "ray.storage_path", "resume_from"):  # paths
        value = _get(cfg, key)
        if value is not None and (not value.strip() or "\0" in value):
            fail(key, value, "must be a non-empty path without NUL characters")
    if d.source not in DATA_SOURCES:
        fail("data.source", d.source, f"expected one of {', '.join(DATA_SOURCES)}")
    if not 0 < d.val_fraction < 1:
        fail("data.val_fraction", d.val_fraction, "must be between 0 and 1 (exclusive)")
    for name in ("num_stories", "tokenizer_vocab"):
        positive(d, name, "data")
    if "://" in d.dir and d.source == "embedded":
        fail("data.dir", d.dir, "the embedded corpus is generated on this machine into a path; "
             "data from a URI needs data.source: prepared")
    if d.cache_dir is not None and ("://" in d.cache_dir or not Path(d.cache_dir).expanduser().is_absolute()):
        fail("data.cache_dir", d.cache_dir, "must be an absolute path on each node's local disk "
             "(e.g. /tmp/raypipe-data or ~/.cache/raypipe), not a URI or a relative path")
    if d.tokenizer_vocab < 257:
        fail("data.tokenizer_vocab", d.tokenizer_vocab, "a byte-level BPE needs at least 257 tokens (256 bytes + end-of-text)")
    if d.tokenizer_vocab > 2**32:
        fail("data.tokenizer_vocab", d.tokenizer_vocab, "must be at most 2**32 (token ids are stored as uint32)")
    if d.num_stories < 2:
        fail("data.num_stories", d.num_stories, "must be at least 2 (one story for validation, the rest for training)")

    for name in ("n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "mlp_hidden", "sliding_window", "global_every"):
        positive(m, name, "model")
    if m.vocab_size is not None:
        positive(m, "vocab_size", "model")
    if m.n_head % m.n_kv_head:
        fail("model.n_kv_head", m.n_kv_head, f"must divide model.n_head ({m.n_head})")
    positive(m, "vocab_pad_multiple", "model", allow_zero=True)
    if m.attention not in ATTENTION_KERNELS:
        fail("model.attention", m.attention, f"expected one of {', '.join(ATTENTION_KERNELS)}")
    if m.head_dim % 2:
        fail("model.head_dim", m.head_dim, "must be even (rotary embeddings rotate pairs)")
    for name in ("rope_local_base", "rope_global_base"):  # base ** (-i/d): <= 0 gives NaN, 1 no positions
        if getattr(m, name) <= 1:
            fail(f"model.{name}", getattr(m, name), "must be greater than 1 (Gemma 3: 10000 local, 1000000 global)")
    for name in ("norm_eps", "init_std"):  # eps 0: a zero vector normalises to NaN; std <= 0: no or no valid init
        positive(m, name, "model")
    if m.query_pre_attn_scalar is not None and m.query_pre_attn_scalar <= 0:
        fail("model.query_pre_attn_scalar", m.query_pre_attn_scalar,
             "must be greater than 0 (attention scale scalar ** -0.5), or null for model.head_dim")

    for name in ("block_size", "batch_size", "grad_accum_steps", "max_steps", "eval_interval", "eval_batches",
                 "log_interval", "max_nonfinite_steps", "profile_steps"):
        positive(t, name, "train")
    for name in ("warmup_steps", "weight_decay", "grad_clip", "min_lr", "sample_tokens", "num_samples"):
        positive(t, name, "train", allow_zero=True)
    positive(t, "learning_rate", "train")
    if t.min_lr > t.learning_rate:
        fail("train.min_lr", t.min_lr, f"must not exceed train.learning_rate ({t.learning_rate}): "
             "the cosine decay would raise the rate; the peak rate is learning_rate")
    if t.stop_at is not None and not 0 < t.stop_at <= t.max_steps:
        fail("train.stop_at", t.stop_at, f"must be between 1 and train.max_steps ({t.max_steps}), or null")
    if t.profile_from is not None and not 0 < t.profile_from <= t.max_steps:
        fail("train.profile_from", t.profile_from, f"must be between 1 and train.max_steps ({t.max_steps}), or null "
             "(no profile); steps that compile make a poor profile: start after the first few")
    if t.peak_flops is not None and t.peak_flops <= 0:  # NaN and inf: refused above, as for every float key
        fail("train.peak_flops", t.peak_flops, "must be a finite number greater than 0 (one device's dense matmul FLOP/s, "
             "for example 989e12 for an H100 SXM's bf16), or null to measure it")
    if t.checkpoint_interval is not None and (t.checkpoint_interval <= 0 or t.checkpoint_interval % t.eval_interval):
        fail("train.checkpoint_interval", t.checkpoint_interval,
             f"must be a positive multiple of train.eval_interval ({t.eval_interval}), or null (every evaluation)")
    if t.warmup_steps > t.max_steps:
        fail("train.warmup_steps", t.warmup_steps, f"must not exceed train.max_steps ({t.max_steps})")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(t, name) < 1:
            fail(f"train.{name}", getattr(t, name), "must be in [0, 1)")
    if t.ddp_grad_dtype not in DDP_GRAD_DTYPES:
        fail("train.ddp_grad_dtype", t.ddp_grad_dtype, f"expected one of {', '.join(DDP_GRAD_DTYPES)}")
    positive(t, "ddp_bucket_mb", "train")
    if t.dtype not in AUTOCAST_DTYPES:
        fail("train.dtype", t.dtype, f"expected one of {', '.join(AUTOCAST_DTYPES)}")
    if t.sample_tokens and t.num_samples < 1:
        fail("train.num_samples", t.num_samples, "must be at least 1 while train.sample_tokens > 0 "
             "(set train.sample_tokens: 0 for no samples)")
    if t.seed < 0:
        fail("train.seed", t.seed, "must be 0 or more (numpy seeds the data streams with it)")
    if t.dtype == "float16" and not r.use_gpu:
        fail("train.dtype", t.dtype, "float16 autocast needs a GPU (ray.use_gpu: true); use float32 or bfloat16 on CPU")
    if t.cuda_graphs and not (t.compile and r.use_gpu):
        fail("train.cuda_graphs", t.cuda_graphs, "CUDA graphs replay the compiled model on a GPU: "
             "they need train.compile: true and ray.use_gpu: true")
    if t.cuda_graphs and r.num_workers > 1 and not t.shard_optimizer:  # DDP's hooks are not replayed
        fail("train.cuda_graphs", t.cuda_graphs, f"with ray.num_workers {r.num_workers}, CUDA graphs run only "
             "with train.shard_optimizer: true (not under DDP)")
    if t.overlap_comm and not t.shard_optimizer:
        fail("train.overlap_comm", t.overlap_comm, "overlaps ZeRO-1's collectives with the backward and the forward: "
             "it needs train.shard_optimizer: true")
    if t.overlap_comm and t.cuda_graphs:  # a graph replays the whole model: no gradient is final before its end
        fail("train.overlap_comm", t.overlap_comm, "does not run with train.cuda_graphs: true; turn one of them off")
    if t.shard_transport not in SHARD_TRANSPORTS:
        fail("train.shard_transport", t.shard_transport, f"expected one of {', '.join(SHARD_TRANSPORTS)}")
    if t.shard_transport == "peer_copies" and not (t.shard_optimizer and r.use_gpu and not t.overlap_comm
                                                   and t.ddp_grad_dtype == "float32"):
        fail("train.shard_transport", t.shard_transport, "copies ZeRO-1's float32 gradients and weights between GPUs: "
             "it needs train.shard_optimizer: true, ray.use_gpu: true, train.overlap_comm: false and "
             "train.ddp_grad_dtype: float32")
    if t.dtype == "float16" and t.shard_optimizer:  # each rank's scaler would see only its slice's overflows
        fail("train.dtype", t.dtype, "float16's loss scaling does not run with train.shard_optimizer: true; "
             "use bfloat16, or train.shard_optimizer: false")

    positive(r, "num_workers", "ray")
    try:
        t.worker_batch(r.num_workers)
    except ValueError as e:
        fail("ray.num_workers", r.num_workers, str(e))
    positive(r, "cpus_per_worker", "ray", allow_zero=True)
    positive(r, "checkpoints_to_keep", "ray")
    positive(r, "max_failures", "ray", allow_zero=True)
    if r.use_gpu:
        positive(r, "gpus_per_worker", "ray")
    for name in ("cpus_per_worker", "gpus_per_worker") if r.use_gpu else ("cpus_per_worker",):
        if 0 < getattr(r, name) < RESOURCE_STEP:
            fail(f"ray.{name}", getattr(r, name), f"must be 0 or at least {RESOURCE_STEP} (Ray's resource precision)")
    if r.use_gpu and r.gpus_per_worker < 1 and r.num_workers > 1:
        fail("ray.gpus_per_worker", r.gpus_per_worker, f"a fraction of a GPU with ray.num_workers {r.num_workers}: "
             "NCCL refuses two ranks on one GPU ('Duplicate GPU detected'); fractional GPUs suit one worker")
    if r.name is not None:
        check_name(r.name, "ray.name", origin)
    if r.placement_strategy not in PLACEMENT_STRATEGIES:
        fail("ray.placement_strategy", r.placement_strategy, f"expected one of {', '.join(PLACEMENT_STRATEGIES)}")
    if w.mode not in WANDB_MODES:
        fail("wandb.mode", w.mode, f"expected one of {', '.join(WANDB_MODES)}")
    if not 0 < len(w.project) <= 128 or any(c in w.project for c in WANDB_PROJECT_FORBIDDEN):
        fail("wandb.project", w.project, f"W&B needs 1 to 128 characters, none of {' '.join(WANDB_PROJECT_FORBIDDEN)}")
    for name in ("entity", "group"):
        if getattr(w, name) is not None and not getattr(w, name).strip():
            fail(f"wandb.{name}", getattr(w, name), "must be a non-empty string, or null")
    for tag in w.tags:
        if not 0 < len(tag) <= 64:
            fail("wandb.tags", tag, "each W&B tag must be 1 to 64 characters")
