"""Run configuration: typed dataclasses, YAML loading, `--set` overrides and validation.

The dataclass defaults *are* the embedded default run (`configs/default.yaml` spells them out).
Every error names the file or flag, the dotted key, the value and what would be right.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import io
import re
import sys
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import ConfigError
from .validation import schema, type_hints, validate


@dataclass
class DataConfig:
    dir: str = "data/embedded"  # a path, or a URI (s3://, gs://, file://...) copied to each node's cache_dir
    # "embedded": the project's own story corpus, generated and tokenized into `dir` when missing.
    # "prepared": `dir` must already hold meta.json and its token files (python -m raypipe.prepare): train.bin / val.bin,
    # or train-00000.bin ... / val-00000.bin ... shards listed in meta.json.
    source: str = "embedded"
    num_stories: int = 12000  # embedded corpus size (about 4 MB of text)
    tokenizer_vocab: int = 512  # byte-level BPE trained on the embedded corpus
    val_fraction: float = 0.05  # share of the embedded stories that go to val
    seed: int = 1234  # the embedded corpus generator's and split's seed
    # Node-local directory where each node keeps a verified copy of `dir` (raypipe/staging.py).
    # None: read `dir` in place (one machine), or <tmp>/raypipe-data when `dir` is a URI.
    # A node's $RAYPIPE_DATA_CACHE overrides it there.
    cache_dir: str | None = None


@dataclass
class ModelConfig:
    """Gemma 3 style decoder. Defaults: a tiny model that trains on 2 CPU cores in minutes."""

    vocab_size: Optional[int] = None  # None: taken from the data's meta.json
    n_layer: int = 6  # transformer blocks
    n_embd: int = 128  # model width (residual stream)
    n_head: int = 4  # query heads
    n_kv_head: int = 1  # key/value heads (grouped-query attention); divides n_head
    head_dim: int = 32  # width of each attention head (even: rotary pairs)
    mlp_hidden: int = 512  # width of the gated tanh-GELU MLP
    sliding_window: int = 64  # tokens a sliding-window layer attends to
    global_every: int = 6  # every 6th layer attends globally: 5 sliding : 1 global
    rope_local_base: float = 10_000.0  # RoPE base of sliding-window layers
    rope_global_base: float = 1_000_000.0  # RoPE base of global layers
    query_pre_attn_scalar: Optional[int] = None  # None: head_dim (Gemma 3 270M uses 256 = head_dim)
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the output head with the input embedding
    init_std: float = 0.02  # standard deviation of the initial weights
    # Compute only: the output matmul runs on a vocabulary padded to this multiple (aligned GPU
    # kernels); the padded logits get -inf and are never seen. Weights keep vocab_size rows. 0: off.
    vocab_pad_multiple: int = 128
    # Compute only: how training computes causal attention. "auto": explicit matmuls on GPU up to 256
    # positions (faster there at these head widths, BENCHMARKS.md), else SDPA; "sdpa"; "matmul".
    attention: str = "auto"
    # Compute only: raypipe's Triton kernels for the cross-entropy and the gated GELU on GPU
    # (raypipe/kernels.py; the same mathematics, faster); false: PyTorch's own everywhere.
    fused_kernels: bool = True
    # Compute only: the output head's matmul and cross-entropy over chunks of rows, its logits never whole
    # (raypipe/kernels.py linear_cross_entropy; the forward then returns no logits with a loss): 5.7 GB less
    # per 256 x 128 micro-batch at GPT-2's vocabulary, about 1% slower on an H100 (BENCHMARKS.md). For a
    # larger micro-batch where memory, not speed, stops it.
    fused_head: bool = False


@dataclass
class TrainConfig:
    """All step counts are optimizer steps (one step = grad_accum_steps micro-batches per worker)."""

    block_size: int = 128  # tokens per training sequence (context length)
    batch_size: int = 16  # micro-batch, sequences per worker
    grad_accum_steps: int = 2  # micro-batches per optimizer step on each worker
    # true: batch_size x grad_accum_steps sequences per optimizer step in all, shared by the workers (nanoGPT's
    # way), so any ray.num_workers that divides them trains the same run; false: that many on each worker.
    split_over_workers: bool = False
    max_steps: int = 250  # length of the run and of its lr schedule
    warmup_steps: int = 20  # linear warmup from 0 to learning_rate
    learning_rate: float = 3e-3  # peak, reached at the end of warmup (warmup starts at 0)
    min_lr: float = 3e-4  # cosine decays to this at max_steps; must not exceed learning_rate
    weight_decay: float = 0.1  # AdamW weight decay (matrices and embeddings only)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    eval_interval: int = 50  # optimizer steps between evaluations
    checkpoint_interval: Optional[int] = None  # steps between checkpoints, a multiple of eval_interval; None: every eval
    eval_batches: int = 8  # batches per split in estimate_loss
    log_interval: int = 10  # optimizer steps between progress lines (rank 0) and W&B logs of loss, tokens/s and MFU
    stop_at: Optional[int] = None  # stop (with a checkpoint) after this step; the schedule still spans max_steps
    max_nonfinite_steps: int = 5  # consecutive skipped (non-finite) steps before the run stops
    sample_prompt: str = "Once upon a time"  # continued at every eval (logs, W&B table)
    sample_tokens: int = 48  # 0: no samples
    num_samples: int = 2  # samples per evaluation
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: bf16 on a GPU that has it, else fp32)
    compile: bool = False  # torch.compile the model (GPU configs turn it on; slow to start on CPU)
    prefetch: bool = True  # CUDA: copy the next batch on a side stream while the current one computes
    # compile on CUDA: replay each micro-batch as CUDA graphs (mode="reduce-overhead"), for small micro-batches
    # where the host's kernel launches set the pace; one worker or train.shard_optimizer only
    cuda_graphs: bool = False
    ddp_grad_dtype: str = "float32"  # float32 | bfloat16: dtype of the gradient all-reduce with several workers
    ddp_bucket_mb: float = 25.0  # DDP's gradient bucket size, MB (several workers)
    ddp_split_graph: bool = False  # compile + several workers: split the graph at DDP's buckets (Dynamo's DDPOptimizer)
    # several workers: ZeRO-1 instead of DDP (raypipe/sharded_adamw.py): gradients reduce-scattered in
    # ddp_grad_dtype, each worker clips and updates 1/N of the parameters and keeps 1/N of AdamW's state
    shard_optimizer: bool = False
    # with shard_optimizer: each block compiled on its own, its gradients reduce-scattered during the backward
    # of the blocks before it, and its weights all-gathered during the next forward (on two GPUs it lost
    # 2.8 points of scaling: BENCHMARKS.md)
    overlap_comm: bool = False
    # with shard_optimizer: how the reduce-scatter and all-gather travel. collectives: the process group's (NCCL
    # kernels on the GPUs, gloo on CPU). peer_copies: copies pulled from the peers' GPU memory on the copy engines,
    # beside the gradient sums and the update (one host's GPUs with peer access; float32, no overlap_comm;
    # raypipe/peer_copies.py). auto: peer_copies where every worker can use them, else collectives
    shard_transport: str = "auto"
    # trace this optimizer step and the next profile_steps - 1 with torch.profiler (a GPU's kernels and copies; on
    # CPU its operations): one Chrome trace per rank beside the run's W&B files, and a summary line; None: no trace
    profile_from: Optional[int] = None
    profile_steps: int = 2  # steps traced from train.profile_from (left out of tokens/s and MFU)
    # the dense matmul FLOP/s of one device that MFU divides by; None: measured by rank 0 at its start (a burst
    # of bf16 matmuls on a GPU), which varies by a few percent between processes; a number (a datasheet's, or
    # one measured before) makes MFU comparable between runs
    peak_flops: Optional[float] = None
    seed: int = 1337  # the random seed: initial weights and each rank's batch draws
    # a resume may run on another ray.num_workers than the checkpoint's (same tokens per step): each worker
    # then draws a new batch stream, so the run no longer repeats an uninterrupted one batch for batch
    allow_worker_count_change: bool = False

    def tokens_per_step(self, world_size: int) -> int:
        """Tokens in one optimizer step over all workers."""
        micro, accum = self.worker_batch(world_size)
        return micro * self.block_size * accum * world_size

    def worker_batch(self, world_size: int) -> tuple[int, int]:
        """Each worker's (micro-batch, accumulation) with `world_size` workers.

        Split over the workers, each takes an equal share of the step's sequences: the accumulation is
        divided first, then the micro-batch is the largest divisor of the share that is at most
        batch_size (256 x 4 on 1, 2, 4, 8 workers: 256 x 4, 256 x 2, 256 x 1, 128 x 1).
        Raises ValueError when the share is not whole."""
        if not self.split_over_workers:
            return self.batch_size, self.grad_accum_steps
        total = self.batch_size * self.grad_accum_steps
        if total % world_size:
            raise ValueError(f"the {total} sequences per step (train.batch_size {self.batch_size} x "
                             f"train.grad_accum_steps {self.grad_accum_steps}, train.split_over_workers: true) do not "
                             f"split over {world_size} workers: use a worker count that divides {total}")
        share = total // world_size
        micro = max(m for m in range(1, min(self.batch_size, share) + 1) if share % m == 0)
        return micro, share // micro

    def for_worker(self, world_size: int) -> "TrainConfig":
        """This section as one of `world_size` workers runs it: its own micro-batch and accumulation."""
        micro, accum = self.worker_batch(world_size)
        return dataclasses.replace(self, batch_size=micro, grad_accum_steps=accum, split_over_workers=False)


@dataclass
class RayConfig:
    num_workers: int = 1  # Ray Train workers (data-parallel ranks)
    use_gpu: bool = False  # one GPU (or gpus_per_worker) per worker
    cpus_per_worker: float = 2  # CPUs Ray reserves for each worker
    gpus_per_worker: float = 1  # only with use_gpu
    storage_path: str = "runs"  # local path, shared filesystem or URI (s3://, gs://)
    name: Optional[str] = None  # None: "<config name>-<timestamp>"
    checkpoints_to_keep: int = 2  # best by val_loss
    max_failures: int = 0  # worker-group restarts from the latest checkpoint before the run fails
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (one worker per node)


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto (online with credentials, else offline) | online | offline | disabled
    project: str = "raypipe"  # W&B project
    entity: Optional[str] = None  # W&B entity (team or user); None: your default
    group: Optional[str] = None  # W&B group (a sweep sets its name)
    tags: list[str] = field(default_factory=list)  # W&B tags


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    resume_from: Optional[str] = None  # a checkpoint directory; set by --resume, not in YAML files

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, origin: str = "config") -> "Config":
        cfg = cls()
        _merge(cfg, d, origin, prefix="")
        validate(cfg, origin)
        return cfg


# --- YAML -----------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (YAML 1.1 wants `1.0e-4` and reads `1e-4` as a str)
    and refuses a key written twice in one mapping (PyYAML keeps the last one without a word)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                            f"found the key {key!r} twice", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, origin: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin}: not valid YAML: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = (), set_origin: str = "--set") -> Config:
    """Defaults, then the YAML file (if any), then `--set key=value` overrides; then validate.
    `set_origin` names where the overrides come from in messages (a sweep file's `set:` list)."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        raw = parse_yaml(path.read_text(), str(path))
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (data, model, train, ...), got {type(raw).__name__}")
        _merge(cfg, raw or {}, str(path), prefix="")
    for item in overrides:
        if not isinstance(item, str):
            raise ConfigError(f"{set_origin}: {item!r}: expected a 'dotted.key=value' string")
        apply_override(cfg, item, f"{set_origin} {item}")
    validate(cfg, (str(path) if path else "default config") + (f" and {set_origin}" if overrides else ""))
    return cfg


def apply_override(cfg: Config, item: str, origin: Optional[str] = None) -> None:
    """Apply one `dotted.key=value`; the value is read as YAML (so `1e-4`, `true`, `[a, b]` work).
    `origin` names where the item was written (default: `--set <item>`)."""
    origin = origin or f"--set {item}"
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{origin}: expected dotted.key=value, e.g. train.learning_rate=1e-3")
    text = value.strip()
    if re.search(r"(^|\s)#", text) and text[:1] not in ("'", '"'):
        # YAML reads ' #...' as a comment: `ray.name=#run` would silently unset the key, a path would be cut
        raise ConfigError(f"{origin}: the value {text!r} holds a YAML comment (a '#' at the start or after a space); "
                          f"quote it: --set {key.strip()}='\"{text}\"'")
    set_value(cfg, key.strip(), parse_yaml(value, origin) if text else None, origin)


def set_value(cfg: Config, key: str, value: Any, origin: str) -> None:
    """Set one dotted key to an already parsed value, checked as a value in a config file is."""
    *parents, leaf = key.split(".")
    nested: dict = {leaf: value}
    for p in reversed(parents):
        nested = {p: nested}
    _merge(cfg, nested, origin, prefix="")


def all_keys(obj: Any = None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config schema (used for suggestions and sweep validation)."""
    obj = Config() if obj is None else obj
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def key_types() -> dict[str, Any]:
    """Every dotted leaf key with its value type (Optional[...] unwrapped): int, float, bool, str or list[str]."""
    return dict(schema(Config))


def _merge(obj: Any, raw: dict, origin: str, prefix: str) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: '{prefix.rstrip('.')}' must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = type_hints(type(obj))
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{origin}: unknown key '{dotted}'{suggest_key(dotted)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value if value is not None else {}, origin, f"{dotted}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted, origin))


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """Each field's one-line help: its trailing comment, else the comment lines just above it. The
    comments in the dataclasses above are the documentation; `--print-config` prints them."""
    lines = inspect.getsource(cls).splitlines()
    comments = {tok.start[0]: (tok.string.lstrip("#").strip(), tok.line.strip().startswith("#"))
                for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline)
                if tok.type == tokenize.COMMENT}
    names, helps, above = {f.name for f in dataclasses.fields(cls)}, {}, []
    for number, line in enumerate(lines, start=1):
        text, whole_line = comments.get(number, (None, False))
        if whole_line:
            above.append(text)
            continue
        match = re.match(r"\s+(\w+)\s*:", line)
        if match and match.group(1) in names:
            helps[match.group(1)] = text or " ".join(above)
        above = []
    return helps


def print_config(cfg: Config, out=None) -> None:
    """The config as YAML, every key with its one-line help: a valid config file, e.g. to start from."""
    out = out or sys.stdout
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(value):
            continue  # resume_from: set by --resume, not written in config files
        print(f"{section.name}:", file=out)
        helps = field_help(type(value))
        for f in dataclasses.fields(value):
            text = yaml.safe_dump({f.name: getattr(value, f.name)}, default_flow_style=True, width=1000).strip()
            print(f"  {text[1:-1]}  # {helps[f.name]}", file=out)


def suggest_key(dotted: str) -> str:
    keys = all_keys()
    leaf_matches = [k for k in keys if k.rsplit(".", 1)[-1] == dotted.rsplit(".", 1)[-1]]
    close = leaf_matches or difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(keys)}"


def _coerce(value: Any, hint: Any, key: str, origin: str) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    want = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            value = float(value) if ok else value
        except OverflowError:  # an integer beyond float range
            raise ConfigError(f"{origin}: '{key}' = {value}: too large for a number (at most about 1.8e308)") from None
    elif hint is str:
        ok = isinstance(value, str)
    elif typing.get_origin(hint) is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        want[hint] = "a list of strings"
    else:  # pragma: no cover - a schema field of a type this function does not know
        raise TypeError(f"unsupported config type {hint} for {key}")
    if not ok:
        raise ConfigError(f"{origin}: '{key}' must be {want[hint]}, got {value!r} ({type(value).__name__})")
    return value
