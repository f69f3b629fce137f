"""Sweep files: reading and checking one before anything starts, and each trial's run config.

Every key, domain and config path of a sweep file is checked by the same code as run configs
(`config.validate` on the base, on every listed value and both ends of every range, alone and with
every other searched key), so a sweep that starts runs every trial it samples.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .config import Config, ConfigError, key_types, load_config, parse_yaml, set_value, suggest_key
from .validation import check_name, validate

SWEEP_KEYS = ("name", "base", "set", "search", "tie", "num_samples", "search_alg", "seed", "scheduler", "metric",
              "mode", "resources", "max_concurrent_trials", "storage_path")
RANGES = ("loguniform", "uniform")  # [low, high] of a float key
LISTS = ("choice", "grid")  # the values to try, each checked before the sweep starts
DOMAINS = RANGES + LISTS
RESOURCE_KEYS = ("num_workers", "use_gpu", "cpus_per_worker", "gpus_per_worker")
SEARCH_ALGS = ("random", "grid", "optuna")
SCHEDULER_KEYS = {"fifo": ("type",), "asha": ("type", "grace_period", "reduction_factor", "brackets")}
PER_TRIAL_KEYS = ("ray.name", "ray.storage_path", "wandb.group", "resume_from")  # the sweep sets them per trial
MAX_SEED = 2**32 - 1  # numpy's RandomState (Optuna's sampler) takes seeds below 2**32


@dataclass
class SweepSpec:
    name: str
    base: Config  # the run config every trial starts from (base file + `set`)
    search: dict[str, dict]  # dotted key -> {domain: args}
    tie: dict[str, dict] = field(default_factory=dict)  # dotted key -> {of: key, factor: x}
    num_samples: int = 1
    search_alg: str = "random"
    seed: Optional[int] = None  # fixes the sampled configurations (random search)
    scheduler: dict = field(default_factory=lambda: {"type": "fifo"})
    metric: str = "val_loss"
    mode: str = "min"
    max_concurrent_trials: Optional[int] = None
    storage_path: str = "runs"
    source: str = ""

    @property
    def dir(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file: every key, domain, value and config path, before anything starts."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    where = str(path)
    raw = parse_yaml(path.read_text(), where)
    raw = {} if raw is None else raw

    def fail(msg: str) -> None:
        raise ConfigError(f"{where}: {msg}")

    if not isinstance(raw, dict):
        fail(f"expected a mapping (name, base, search, ...), got {type(raw).__name__}")
    for key in raw:
        if key not in SWEEP_KEYS:
            if str(key).split(".")[0] in ("data", "model", "train", "ray", "wandb"):  # a run config key or section
                fail(f"unknown key '{key}': run config values go in set: (e.g. set: [train.max_steps=100]) "
                     "or search:, the base config in base:")
            close = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1)
            fail(f"unknown key '{key}'" + (f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(SWEEP_KEYS)}"))
    base = _base_config(raw, path, fail)
    search = _search(raw.get("search"), fail)
    tie = _tie(raw.get("tie"), search, fail)
    _check_values(base, search, tie, where)

    search_alg = raw.get("search_alg", "random")
    if search_alg not in SEARCH_ALGS:
        fail(f"search_alg: {search_alg!r}; expected {', '.join(SEARCH_ALGS)}")
    if search_alg == "optuna":
        if any("grid" in d for d in search.values()):
            fail("search_alg optuna cannot take grid domains; use choice")
        if importlib.util.find_spec("optuna") is None:
            fail("search_alg optuna needs `pip install optuna`")
    scheduler = _scheduler(raw.get("scheduler"), base.train.max_steps, fail)
    metric, mode = raw.get("metric", "val_loss"), raw.get("mode", "min")
    if (metric, mode) != ("val_loss", "min"):  # the results table, best config and plots rank by it
        fail(f"metric/mode: {metric!r}/{mode!r}; raypipe sweeps minimise val_loss (metric: val_loss, mode: min)")
    num_samples = raw.get("num_samples", 1)
    if not (_is_int(num_samples) and num_samples >= 1):
        fail(f"num_samples: {num_samples!r}; expected a positive integer")
    seed = raw.get("seed")
    if seed is not None and not (_is_int(seed) and 0 <= seed <= MAX_SEED):
        fail(f"seed: {seed!r}; expected an integer from 0 to {MAX_SEED}, or null (a new draw each time)")
    max_concurrent = raw.get("max_concurrent_trials")
    if max_concurrent is not None and not (_is_int(max_concurrent) and max_concurrent >= 1):
        fail(f"max_concurrent_trials: {max_concurrent!r}; expected a positive integer, or null (no limit)")
    storage_path = raw.get("storage_path", base.ray.storage_path)
    if not (isinstance(storage_path, str) and storage_path.strip() and "\0" not in storage_path):
        fail(f"storage_path: {storage_path!r}; expected a non-empty path")
    name = raw.get("name")
    if name is None:  # the file's name, which must then make a safe directory name too
        check_name(path.stem, "name", f"{where} (no name: set, so the file name is used)")
    else:
        check_name(name, "name", where)
    return SweepSpec(name=name or path.stem, base=base, search=search, tie=tie, num_samples=num_samples,
                     search_alg=search_alg, seed=seed, scheduler=scheduler, metric=metric, mode=mode,
                     max_concurrent_trials=max_concurrent, storage_path=storage_path, source=where)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _kind_of_key(hint: Any) -> str:
    return {int: "an integer key", float: "a number key", bool: "a true/false key", str: "a string key"}.get(hint, "a list key")


def _base_config(raw: dict, path: Path, fail) -> Config:
    """The base run config with the sweep's `set` items and `resources` applied, validated."""
    where = str(path)
    base_file = raw.get("base")
    if base_file is not None:  # relative to the sweep file, else to the working directory
        if not (isinstance(base_file, str) and base_file.strip()):
            fail(f"base: {base_file!r}; expected the path of a run config file, e.g. configs/default.yaml")
        base_file = next((p for p in (path.parent / base_file, Path(base_file)) if p.is_file()), Path(base_file))
    overrides = raw.get("set")
    overrides = [] if overrides is None else overrides
    if not isinstance(overrides, list):
        fail(f"set: {overrides!r}; expected a list of dotted.key=value strings")
    try:
        base = load_config(base_file, overrides, set_origin="set")
    except ConfigError as e:  # the base file, or the base file and this file's `set` items
        raise ConfigError(f"{where}: {e}") from None
    resources = raw.get("resources")
    resources = {} if resources is None else resources
    if not isinstance(resources, dict):
        fail(f"resources: {resources!r}; expected a mapping, e.g. {{num_workers: 1, cpus_per_worker: 1}}")
    for key, value in resources.items():
        if key not in RESOURCE_KEYS:
            close = difflib.get_close_matches(str(key), RESOURCE_KEYS, n=1)
            fail(f"resources: unknown key '{key}'" + (f"; did you mean '{close[0]}'?" if close else "")
                 + f"; known: {', '.join(RESOURCE_KEYS)}")
        set_value(base, f"ray.{key}", value, f"{where}: resources")
    validate(base, f"{where}: resources")
    return base


def _search(search: Any, fail) -> dict:
    """`search`: config key -> {domain: args}; ranges only over number keys, with ends their distribution takes."""
    if not (isinstance(search, dict) and search):
        fail(f"search: {search!r}; expected a mapping of at least one config key to a domain, "
             "e.g. train.learning_rate: {loguniform: [1e-4, 1e-2]}")
    types_ = key_types()
    for key, domain in search.items():
        if key not in types_:
            fail(f"search: '{key}' is not a config key{suggest_key(str(key))}")
        if key in PER_TRIAL_KEYS:
            fail(f"search: '{key}' is set by the sweep for each trial (name, directory, W&B group); it cannot be searched")
        if key.startswith("data."):
            fail(f"search: '{key}': the data is prepared once, before the trials, for all of them; set it in the "
                 "base config or `set:` (one sweep per dataset)")
        if not (isinstance(domain, dict) and len(domain) == 1 and next(iter(domain)) in DOMAINS):
            fail(f"search: '{key}' must be one of {{{', '.join(f'{d}: ...' for d in DOMAINS)}}}, got {domain!r}")
        kind, args = next(iter(domain.items()))
        if kind in LISTS:
            if not (isinstance(args, list) and args):
                fail(f"search: '{key}': {kind} takes a non-empty list of values, got {args!r}")
            continue
        if types_[key] is not float:  # Tune would hand the trial a float, refused only once it runs
            fail(f"search: '{key}': {kind} draws real numbers, but '{key}' is {_kind_of_key(types_[key])}; "
                 f"list the values to try with choice or grid (e.g. {{choice: [...]}}), each checked before the sweep starts")
        if not (isinstance(args, list) and len(args) == 2 and all(_is_number(a) for a in args)):
            fail(f"search: '{key}': {kind} takes [low, high], two numbers, got {args!r}")
        low, high = args
        if not (math.isfinite(low) and math.isfinite(high)):
            fail(f"search: '{key}': {kind} {args!r}: low and high must be finite numbers")
        if not low < high:
            fail(f"search: '{key}': {kind} takes [low, high] with low < high, got {args!r}")
        if kind == "loguniform" and low <= 0:
            fail(f"search: '{key}': loguniform {args!r}: low must be greater than 0 (a log scale has no 0 or "
                 "negative numbers); use uniform for a range from 0 or below")
    return search


def _tie(tie: Any, search: dict, fail) -> dict:
    """`tie`: config key -> {of: a searched number key, factor: x}; the key is set to that value times x."""
    tie = {} if tie is None else tie
    if not isinstance(tie, dict):
        fail(f"tie: {tie!r}; expected a mapping, e.g. train.min_lr: {{of: train.learning_rate, factor: 0.1}}")
    types_ = key_types()
    for key, rule in tie.items():
        if key not in types_:
            fail(f"tie: '{key}' is not a config key{suggest_key(str(key))}")
        if key in PER_TRIAL_KEYS or key in search or key.startswith("data."):
            fail(f"tie: '{key}' is " + ("also searched; a key is either searched or tied" if key in search
                                        else "set by the sweep for each trial; it cannot be tied" if key in PER_TRIAL_KEYS
                                        else "a data key: the data is prepared once, before the trials, for all of them"))
        if not (isinstance(rule, dict) and set(rule) == {"of", "factor"}):
            fail(f"tie: '{key}' must be {{of: <a searched key>, factor: <number>}}, got {rule!r}")
        of, factor = rule["of"], rule["factor"]
        if not (isinstance(of, str) and of in search):
            hint = suggest_key(of) if isinstance(of, str) and of not in types_ else ""
            fail(f"tie: '{key}': of {of!r} must be a searched key ({', '.join(map(str, search))}){hint}")
        if not (_is_number(factor) and math.isfinite(factor) and factor > 0):
            fail(f"tie: '{key}': factor {factor!r} must be a finite number greater than 0")
        for k in (key, of):
            if types_[k] not in (int, float):
                fail(f"tie: '{key}': '{k}' is {_kind_of_key(types_[k])}; a tie multiplies numbers")
        listed = next(iter(search[of].values()))
        if not all(_is_number(v) for v in listed):  # e.g. null for an optional key: nothing to multiply
            fail(f"tie: '{key}': of '{of}' lists {listed!r}; a tie multiplies numbers only")
        if types_[key] is int and not (types_[of] is int and _is_int(factor)):
            fail(f"tie: '{key}' is an integer key: {of} x {factor} must be an integer "
                 "(an integer key tied to an integer key by an integer factor)")
    return tie


def _scheduler(scheduler: Any, max_steps: int, fail) -> dict:
    scheduler = {"type": "fifo"} if scheduler is None else scheduler
    if not isinstance(scheduler, dict):
        fail(f"scheduler: {scheduler!r}; expected a mapping, e.g. {{type: asha, grace_period: 10}}")
    kind = scheduler.get("type")
    if kind not in tuple(SCHEDULER_KEYS):
        fail(f"scheduler.type: {kind!r}; expected asha or fifo")
    for key in scheduler:
        if key not in SCHEDULER_KEYS["asha"]:
            fail(f"scheduler: unknown key '{key}'; known: {', '.join(SCHEDULER_KEYS['asha'])}")
        if key not in SCHEDULER_KEYS[kind]:
            fail(f"scheduler.{key}: only type asha takes it (this scheduler is {kind})")
    if kind == "asha":
        grace, factor, brackets = (scheduler.get(k, d) for k, d in (("grace_period", 1), ("reduction_factor", 2),
                                                                      ("brackets", 1)))
        if not (_is_int(grace) and 1 <= grace <= max_steps):
            fail(f"scheduler.grace_period: {grace!r}; expected an integer from 1 to train.max_steps ({max_steps})")
        if not (_is_number(factor) and math.isfinite(factor) and factor > 1):
            fail(f"scheduler.reduction_factor: {factor!r}; expected a number greater than 1 (2: keep the better half)")
        if not (_is_int(brackets) and brackets >= 1):
            fail(f"scheduler.brackets: {brackets!r}; expected a positive integer")
    return scheduler


def with_values(base: Config, params: dict, tie: dict, origin: str = "sweep") -> Config:
    """A copy of `base` with the searched values and the values tied to them."""
    cfg = copy.deepcopy(base)
    for key, value in params.items():
        set_value(cfg, key, value, origin)
    for key, rule in tie.items():
        if rule["of"] in params:
            set_value(cfg, key, params[rule["of"]] * rule["factor"], origin)
    return cfg


def _check_values(base: Config, search: dict, tie: dict, where: str) -> None:
    """Every listed value and both ends of every range make a valid run, with the other keys at their
    first value and in every pair of keys (the checks in `validate` relate at most two keys)."""
    values = {key: next(iter(domain.values())) for key, domain in search.items()}
    first = {key: vals[0] for key, vals in values.items()}
    keys = list(values)
    changes = [{k: v} for k in keys for v in values[k]]  # one key at a time first: the clearest message
    changes += [{a: va, b: vb} for i, a in enumerate(keys) for b in keys[i + 1:] for va in values[a] for vb in values[b]]
    seen = set()
    for change in changes:
        params = {**first, **change}
        if repr(params) in seen:
            continue
        seen.add(repr(params))
        shown = change if len(keys) == 1 else params
        origin = "search value " + ", ".join(f"{k}={v!r}" for k, v in shown.items())
        try:
            validate(with_values(base, params, tie, origin), origin)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def trial_config(spec: SweepSpec, params: dict, trial_id: str) -> Config:
    """The run config of one trial: base, the sampled values, the tied values, its own name."""
    cfg = with_values(spec.base, params, spec.tie)
    cfg.ray.name = trial_id
    cfg.ray.storage_path = f"{spec.dir}/runs"
    cfg.wandb.group = spec.name  # one W&B group per sweep, one run per trial
    validate(cfg, f"trial {trial_id}")
    return cfg
