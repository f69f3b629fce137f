"""Bad config and sweep values are refused by validation, before Ray starts, naming the key and the value.

Every case is a real YAML file (or a real `--set`) read by the real loaders and CLIs.
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from raypipe import sweep, sweepspec, train
from raypipe.config import Config, ConfigError, all_keys, key_types, load_config
from raypipe.data import split_seed
from raypipe.model import GemmaLM

ROOT = Path(__file__).resolve().parents[1]
FLOAT_KEYS = [k for k, t in key_types().items() if t is float]


def nested(dotted: str, value) -> dict:
    *parents, leaf = dotted.split(".")
    out = {leaf: value}
    for p in reversed(parents):
        out = {p: out}
    return out


def write_config(tmp_path: Path, values: dict) -> Path:
    raw: dict = {}
    for key, value in values.items():
        section, leaf = key.split(".")
        raw.setdefault(section, {})[leaf] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def refused(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(exc.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# --- the run config ----------------------------------------------------------------------------------


def test_the_schema_types_every_key():
    types = key_types()
    assert list(types) == all_keys()
    assert set(map(str, types.values())) <= {str(int), str(float), str(bool), str(str), "list[str]"}
    assert {"train.learning_rate", "model.rope_local_base", "ray.cpus_per_worker"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_must_be_finite(tmp_path, key, bad):
    path = write_config(tmp_path, {key: bad})
    assert ".nan" in path.read_text() or ".inf" in path.read_text()  # YAML's spelling, read back as a float
    with pytest.raises(ConfigError) as e:
        load_config(path)
    refused(e, str(path), f"'{key}' = {bad!r}", "finite")
    with pytest.raises(ConfigError) as e:  # the same through --set
        load_config(None, [f"{key}={yaml.safe_dump(bad).splitlines()[0]}"])
    refused(e, "default config and --set", f"'{key}' = {bad!r}", "finite")


RANGE_CASES = [
    ({"model.rope_local_base": 0.0}, "model.rope_local_base", "greater than 1"),
    ({"model.rope_local_base": -10000.0}, "model.rope_local_base", "greater than 1"),
    ({"model.rope_global_base": 1.0}, "model.rope_global_base", "greater than 1"),
    ({"model.rope_global_base": 0.5}, "model.rope_global_base", "greater than 1"),
    ({"model.norm_eps": 0.0}, "model.norm_eps", "greater than 0"),
    ({"model.norm_eps": -1e-6}, "model.norm_eps", "greater than 0"),
    ({"model.init_std": 0.0}, "model.init_std", "greater than 0"),
    ({"model.init_std": -0.02}, "model.init_std", "greater than 0"),
    ({"model.query_pre_attn_scalar": 0}, "model.query_pre_attn_scalar", "greater than 0"),
    ({"model.query_pre_attn_scalar": -4}, "model.query_pre_attn_scalar", "greater than 0"),
    ({"train.num_samples": 0, "train.sample_tokens": 48}, "train.num_samples", "train.sample_tokens: 0"),
    ({"train.seed": -1}, "train.seed", "0 or more"),
    ({"train.seed": 2**63}, "train.seed", "64-bit integer"),
    ({"train.batch_size": 2**70}, "train.batch_size", "64-bit integer"),
    ({"data.seed": -2**63 - 1}, "data.seed", "64-bit integer"),
    ({"data.num_stories": 1}, "data.num_stories", "at least 2"),
    ({"data.tokenizer_vocab": 2**32 + 1}, "data.tokenizer_vocab", "uint32"),
    ({"ray.cpus_per_worker": 0.00001}, "ray.cpus_per_worker", "0.0001"),
    ({"ray.use_gpu": True, "ray.gpus_per_worker": 0.00005}, "ray.gpus_per_worker", "0.0001"),
    ({"ray.use_gpu": True, "ray.num_workers": 2, "ray.gpus_per_worker": 0.5}, "ray.gpus_per_worker", "Duplicate GPU"),
    ({"data.dir": ""}, "data.dir", "non-empty path"),
    ({"data.dir": "a\0b"}, "data.dir", "NUL"),
    ({"ray.storage_path": "  "}, "ray.storage_path", "non-empty path"),
    ({"wandb.project": "team/run"}, "wandb.project", "1 to 128 characters"),
    ({"wandb.project": ""}, "wandb.project", "1 to 128 characters"),
    ({"wandb.project": "p" * 129}, "wandb.project", "1 to 128 characters"),
    ({"wandb.entity": ""}, "wandb.entity", "or null"),
    ({"wandb.tags": ["ok", ""]}, "wandb.tags", "1 to 64 characters"),
    ({"wandb.tags": ["t" * 65]}, "wandb.tags", "1 to 64 characters"),
]


@pytest.mark.parametrize("values, key, expected", RANGE_CASES,
                         ids=[f"{c[1]}={list(c[0].values())[-1]!r}"[:60] for c in RANGE_CASES])
def test_range_checks(tmp_path, values, key, expected):
    path = write_config(tmp_path, values)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    bad = values[key]
    refused(e, str(path), f"'{key}' = {bad[-1] if isinstance(bad, list) else bad!r}", expected)


def test_an_integer_too_large_for_a_float_is_a_config_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  learning_rate: 1" + "0" * 400 + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    refused(e, str(path), "'train.learning_rate' = 1000", "too large")


def test_a_key_written_twice_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  learning_rate: 1e-3\nmodel:\n  n_layer: 2\ntrain:\n  max_steps: 100\n")
    with pytest.raises(ConfigError) as e:  # PyYAML alone keeps the second train: and drops learning_rate
        load_config(path)
    refused(e, str(path), "found the key 'train' twice", "line 5")
    path.write_text("train: {learning_rate: 1e-3, learning_rate: 1e-2}\n")
    with pytest.raises(ConfigError, match="found the key 'learning_rate' twice"):
        load_config(path)


def test_dry_run_refuses_what_the_run_would_refuse(capsys):
    # Built on the meta device, a negative init_std used to pass --dry-run and fail in every worker.
    assert train.main(["--dry-run", "--set", "model.init_std=-0.02"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'model.init_std' = -0.02" in err


def test_accepted_edge_values_train(tmp_path):
    """The smallest values validation lets through give a working model: finite loss and gradients."""
    cfg = load_config(write_config(tmp_path, {
        "model.vocab_size": 300, "model.n_layer": 2, "model.n_embd": 32, "model.n_head": 2, "model.head_dim": 8,
        "model.mlp_hidden": 32, "model.rope_local_base": 1.0001, "model.rope_global_base": 1.5,
        "model.norm_eps": 1e-12, "model.init_std": 1e-6, "model.query_pre_attn_scalar": 1,
        "model.vocab_pad_multiple": 0, "model.sliding_window": 1, "model.global_every": 1000}))
    torch.manual_seed(0)
    model = GemmaLM(cfg.model)
    x = torch.randint(300, (2, 24))
    x[0] = 0  # a repeated token: near-zero vectors in the norms
    _, loss = model(x, x)
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    seed = load_config(None, [f"train.seed={2**63 - 1}"]).train.seed  # the largest seed seeds every stream
    assert split_seed(seed, 0, "train") >= 0 and torch.Generator().manual_seed(seed).initial_seed() == seed


UNSAFE_NAMES = ["../escape", "a/b", "a\\b", ".", "..", ".hidden", "-rf", "", "run name", "#run", "run\n", "a\0b",
                "r" * 129, "é"]


@pytest.mark.parametrize("name", UNSAFE_NAMES, ids=[repr(n)[:20] for n in UNSAFE_NAMES])
def test_unsafe_run_names_are_refused(tmp_path, capsys, name):
    path = write_config(tmp_path, {"ray.name": name, "ray.storage_path": str(tmp_path / "runs")})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    refused(e, str(path), f"'ray.name' = {name!r}", "plain directory name")
    if "\0" not in name:  # argv cannot carry a NUL
        assert train.main(["--dry-run", "--storage-path", str(tmp_path / "runs"), "--set", f"ray.name='{name}'"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "'ray.name'" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["run-1", "lr_3e-4", "a.b", "x@y+z=1", "_tmp", "r" * 128, "20261126-1200"])
def test_safe_run_names_are_accepted(name):
    assert load_config(None, [f"ray.name='{name}'"]).ray.name == name


# --- sweep files -------------------------------------------------------------------------------------

GOOD = {
    "name": "ok", "base": "base.yaml",
    "search": {"train.learning_rate": {"loguniform": [1e-4, 1e-2]}},
    "tie": {"train.min_lr": {"of": "train.learning_rate", "factor": 0.1}},
    "scheduler": {"type": "asha", "grace_period": 10, "reduction_factor": 2, "brackets": 1},
    "resources": {"num_workers": 1, "cpus_per_worker": 1}, "num_samples": 2, "seed": 0,
    "max_concurrent_trials": 2, "storage_path": "sweeps",
}
DROP = object()


def write_sweep(tmp_path: Path, change: dict, filename: str = "sweep.yaml") -> Path:
    base = Config()
    base.ray.storage_path = str(tmp_path / "runs")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base.to_dict()))
    spec = {k: v for k, v in {**GOOD, **change}.items() if v is not DROP}
    path = tmp_path / filename
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return path


LR = "train.learning_rate"
SWEEP_CASES = {
    # domains: the distribution's own limits, finite ends, types
    "loguniform-from-0": ({"search": {LR: {"loguniform": [0, 1e-2]}}}, [f"'{LR}'", "loguniform [0, 0.01]", "use uniform"]),
    "loguniform-negative": ({"search": {LR: {"loguniform": [-1e-3, 1e-2]}}}, [f"'{LR}'", "[-0.001, 0.01]", "greater than 0"]),
    "uniform-nan": ({"search": {LR: {"uniform": [math.nan, 1e-2]}}}, [f"'{LR}'", "uniform [nan, 0.01]", "finite"]),
    "loguniform-inf": ({"search": {LR: {"loguniform": [1e-4, math.inf]}}}, [f"'{LR}'", "[0.0001, inf]", "finite"]),
    "uniform-reversed": ({"search": {LR: {"uniform": [1e-2, 1e-4]}}}, [f"'{LR}'", "[0.01, 0.0001]", "low < high"]),
    "uniform-strings": ({"search": {LR: {"uniform": ["a", "b"]}}}, [f"'{LR}'", "['a', 'b']", "two numbers"]),
    "uniform-bool": ({"search": {LR: {"uniform": [True, 2]}}}, [f"'{LR}'", "[True, 2]", "two numbers"]),
    "uniform-one-end": ({"search": {LR: {"uniform": [1e-4]}}}, [f"'{LR}'", "[0.0001]", "two numbers"]),
    "uniform-int-key": ({"tie": {}, "search": {"train.batch_size": {"uniform": [8, 32]}}},
                        ["'train.batch_size'", "uniform", "integer key", "choice or grid"]),
    "loguniform-int-key": ({"tie": {}, "search": {"train.max_steps": {"loguniform": [100, 1000]}}},
                           ["'train.max_steps'", "loguniform", "integer key", "choice or grid"]),
    "uniform-bool-key": ({"search": {"train.compile": {"uniform": [0, 1]}}}, ["'train.compile'", "true/false key"]),
    "uniform-str-key": ({"search": {"train.dtype": {"uniform": [0, 1]}}}, ["'train.dtype'", "string key"]),
    "choice-str-for-int": ({"tie": {}, "search": {"train.batch_size": {"choice": [8, "x"]}}},
                           ["'train.batch_size' must be an integer, got 'x'"]),
    "choice-float-for-int": ({"tie": {}, "search": {"train.batch_size": {"choice": [8, 16.5]}}},
                             ["'train.batch_size' must be an integer, got 16.5"]),
    "choice-bool-for-int": ({"tie": {}, "search": {"train.batch_size": {"grid": [True]}}},
                            ["'train.batch_size' must be an integer, got True"]),
    "choice-nan": ({"search": {LR: {"choice": [1e-3, math.nan]}}}, [f"'{LR}' = nan", "finite"]),
    "grid-inf": ({"tie": {}, "search": {"train.grad_clip": {"grid": [math.inf]}}}, ["'train.grad_clip' = inf", "finite"]),
    "choice-negative": ({"tie": {}, "search": {"train.grad_clip": {"choice": [1.0, -1.0]}}}, ["'train.grad_clip' = -1.0"]),
    "choice-odd-head-dim": ({"search": {LR: {"choice": [1e-3]}, "model.head_dim": {"choice": [16, 17]}}},
                            ["'model.head_dim' = 17", "even"]),
    "grid-empty": ({"search": {LR: {"grid": []}}}, [f"'{LR}'", "non-empty list", "[]"]),
    "choice-not-a-list": ({"search": {LR: {"choice": 0.001}}}, [f"'{LR}'", "non-empty list", "0.001"]),
    "unknown-domain": ({"search": {LR: {"lognormal": [1, 2]}}}, [f"'{LR}'", "must be one of {loguniform", "lognormal"]),
    "two-domains": ({"search": {LR: {"choice": [1e-3], "grid": [1e-3]}}}, [f"'{LR}'", "must be one of"]),
    "domain-not-a-mapping": ({"search": {LR: [1e-3, 1e-2]}}, [f"'{LR}'", "must be one of", "[0.001, 0.01]"]),
    "search-list": ({"search": [LR]}, ["search: ['train.learning_rate']", "expected a mapping"]),
    "search-empty": ({"search": {}}, ["search: {}", "at least one config key"]),
    "search-typo": ({"search": {"train.learning_rat": {"choice": [1e-3]}}},
                    ["'train.learning_rat' is not a config key", "did you mean 'train.learning_rate'"]),
    "search-data-key": ({"search": {"data.tokenizer_vocab": {"choice": [512, 1024]}}},
                        ["'data.tokenizer_vocab'", "prepared once, before the trials"]),
    "search-run-name": ({"search": {"ray.name": {"choice": ["a"]}}}, ["'ray.name'", "set by the sweep for each trial"]),
    # every pair of searched keys: each value alone is fine, together they are not
    "pair": ({"search": {LR: {"choice": [1e-3]}, "train.max_steps": {"choice": [100, 20]},
                         "train.warmup_steps": {"choice": [10, 50]}}, "scheduler": {"type": "fifo"}},
             ["train.max_steps=20", "train.warmup_steps=50", "'train.warmup_steps' = 50", "train.max_steps (20)"]),
    # ties: shape, key types, factor, both ends of the range
    "tie-list": ({"tie": ["train.min_lr"]}, ["tie: ['train.min_lr']", "expected a mapping"]),
    "tie-rule-list": ({"tie": {"train.min_lr": [LR, 0.1]}}, ["'train.min_lr'", "{of: <a searched key>", "0.1]"]),
    "tie-of-list": ({"tie": {"train.min_lr": {"of": [LR], "factor": 0.1}}}, ["'train.min_lr'", "['train.learning_rate']",
                                                                            "searched key"]),
    "tie-of-unsearched": ({"tie": {"train.min_lr": {"of": "train.grad_clip", "factor": 0.1}}},
                          ["'train.min_lr'", "'train.grad_clip' must be a searched key (train.learning_rate)"]),
    "tie-of-typo": ({"tie": {"train.min_lr": {"of": "train.learning_rat", "factor": 0.1}}},
                    ["'train.learning_rat'", "did you mean 'train.learning_rate'"]),
    "tie-factor-nan": ({"tie": {"train.min_lr": {"of": LR, "factor": math.nan}}}, ["'train.min_lr'", "factor nan", "finite"]),
    "tie-factor-inf": ({"tie": {"train.min_lr": {"of": LR, "factor": math.inf}}}, ["'train.min_lr'", "factor inf"]),
    "tie-factor-zero": ({"tie": {"train.min_lr": {"of": LR, "factor": 0}}}, ["'train.min_lr'", "factor 0", "greater than 0"]),
    "tie-factor-negative": ({"tie": {"train.min_lr": {"of": LR, "factor": -0.1}}}, ["'train.min_lr'", "factor -0.1"]),
    "tie-factor-str": ({"tie": {"train.min_lr": {"of": LR, "factor": "0.1"}}}, ["'train.min_lr'", "factor '0.1'"]),
    "tie-factor-bool": ({"tie": {"train.min_lr": {"of": LR, "factor": True}}}, ["'train.min_lr'", "factor True"]),
    "tie-low-end": ({"tie": {"train.min_lr": {"of": LR, "factor": 2}}},
                    ["search value train.learning_rate=0.0001", "'train.min_lr' = 0.0002", "must not exceed"]),
    "tie-high-end": ({"search": {LR: {"loguniform": [1e-3, 1e-2]}}, "tie": {"train.beta2": {"of": LR, "factor": 100}}},
                     ["search value train.learning_rate=0.01", "'train.beta2' = 1.0", "[0, 1)"]),
    "tie-int-key": ({"tie": {"train.warmup_steps": {"of": LR, "factor": 1000}}}, ["'train.warmup_steps' is an integer key"]),
    "tie-str-key": ({"tie": {"train.dtype": {"of": LR, "factor": 1}}}, ["'train.dtype' is a string key", "multiplies numbers"]),
    "tie-of-str-key": ({"search": {"train.dtype": {"choice": ["float32"]}}, "tie": {"train.min_lr": {"of": "train.dtype",
                                                                                                       "factor": 2}}},
                       ["'train.dtype' is a string key"]),
    "tie-of-null": ({"search": {"train.stop_at": {"choice": [None, 100]}},
                     "tie": {"train.checkpoint_interval": {"of": "train.stop_at", "factor": 1}}},
                    ["'train.checkpoint_interval'", "[None, 100]", "multiplies numbers only"]),
    "tie-of-str-value": ({"search": {"train.max_steps": {"choice": [100, "x"]}},
                          "tie": {"train.min_lr": {"of": "train.max_steps", "factor": 0.5}}},
                         ["'train.min_lr'", "[100, 'x']", "multiplies numbers only"]),
    "tie-searched": ({"search": {LR: {"choice": [1e-3]}, "train.min_lr": {"choice": [1e-4]}}},
                     ["tie: 'train.min_lr' is also searched"]),
    "tie-typo": ({"tie": {"train.min_l": {"of": LR, "factor": 0.1}}}, ["'train.min_l' is not a config key", "'train.min_lr'"]),
    "tie-data-key": ({"tie": {"data.val_fraction": {"of": LR, "factor": 1}}}, ["'data.val_fraction' is a data key"]),
    "tie-run-name": ({"tie": {"ray.name": {"of": LR, "factor": 1}}}, ["'ray.name'", "set by the sweep for each trial"]),
    # the sweep's own keys
    "name-escapes": ({"name": "../up"}, ["'name' = '../up'", "plain directory name"]),
    "name-slash": ({"name": "a/b"}, ["'name' = 'a/b'"]),
    "name-dotdot": ({"name": ".."}, ["'name' = '..'"]),
    "name-empty": ({"name": ""}, ["'name' = ''"]),
    "name-dash": ({"name": "-x"}, ["'name' = '-x'"]),
    "name-int": ({"name": 123}, ["'name' = 123"]),
    "num_samples-0": ({"num_samples": 0}, ["num_samples: 0", "positive integer"]),
    "num_samples-float": ({"num_samples": 1.5}, ["num_samples: 1.5"]),
    "num_samples-bool": ({"num_samples": True}, ["num_samples: True"]),
    "num_samples-str": ({"num_samples": "4"}, ["num_samples: '4'"]),
    "num_samples-null": ({"num_samples": None}, ["num_samples: None"]),
    "seed-negative": ({"seed": -1}, ["seed: -1", "or null"]),
    "seed-huge": ({"seed": 2**32}, ["seed: 4294967296"]),
    "seed-float": ({"seed": 1.5}, ["seed: 1.5"]),
    "seed-str": ({"seed": "x"}, ["seed: 'x'"]),
    "max_concurrent-0": ({"max_concurrent_trials": 0}, ["max_concurrent_trials: 0", "or null"]),
    "max_concurrent-str": ({"max_concurrent_trials": "2"}, ["max_concurrent_trials: '2'"]),
    "max_concurrent-bool": ({"max_concurrent_trials": True}, ["max_concurrent_trials: True"]),
    "storage-int": ({"storage_path": 5}, ["storage_path: 5", "non-empty path"]),
    "storage-empty": ({"storage_path": ""}, ["storage_path: ''"]),
    "storage-list": ({"storage_path": ["a"]}, ["storage_path: ['a']"]),
    "scheduler-list": ({"scheduler": ["asha"]}, ["scheduler: ['asha']", "expected a mapping"]),
    "scheduler-type": ({"scheduler": {"type": "hyperband"}}, ["scheduler.type: 'hyperband'", "asha or fifo"]),
    "scheduler-no-type": ({"scheduler": {"grace_period": 10}}, ["scheduler.type: None"]),
    "scheduler-unknown": ({"scheduler": {"type": "asha", "max_t": 10}}, ["scheduler: unknown key 'max_t'"]),
    "fifo-grace": ({"scheduler": {"type": "fifo", "grace_period": 10}}, ["scheduler.grace_period", "only type asha"]),
    "grace-0": ({"scheduler": {"type": "asha", "grace_period": 0}}, ["scheduler.grace_period: 0", "train.max_steps (250)"]),
    "grace-past-end": ({"scheduler": {"type": "asha", "grace_period": 251}}, ["scheduler.grace_period: 251"]),
    "grace-str": ({"scheduler": {"type": "asha", "grace_period": "10"}}, ["scheduler.grace_period: '10'"]),
    "grace-float": ({"scheduler": {"type": "asha", "grace_period": 1.5}}, ["scheduler.grace_period: 1.5"]),
    "reduction-1": ({"scheduler": {"type": "asha", "reduction_factor": 1}}, ["scheduler.reduction_factor: 1",
                                                                            "greater than 1"]),
    "reduction-nan": ({"scheduler": {"type": "asha", "reduction_factor": math.nan}}, ["scheduler.reduction_factor: nan"]),
    "reduction-inf": ({"scheduler": {"type": "asha", "reduction_factor": math.inf}}, ["scheduler.reduction_factor: inf"]),
    "reduction-str": ({"scheduler": {"type": "asha", "reduction_factor": "2"}}, ["scheduler.reduction_factor: '2'"]),
    "brackets-0": ({"scheduler": {"type": "asha", "brackets": 0}}, ["scheduler.brackets: 0", "positive integer"]),
    "brackets-float": ({"scheduler": {"type": "asha", "brackets": 1.5}}, ["scheduler.brackets: 1.5"]),
    "resources-list": ({"resources": ["num_workers"]}, ["resources: ['num_workers']", "expected a mapping"]),
    "resources-unknown": ({"resources": {"workers": 2}}, ["resources: unknown key 'workers'", "did you mean 'num_workers'"]),
    "resources-zero-workers": ({"resources": {"num_workers": 0}}, ["resources", "'ray.num_workers' = 0"]),
    "resources-str": ({"resources": {"num_workers": "two"}}, ["resources", "'ray.num_workers' must be an integer, got 'two'"]),
    "resources-nan": ({"resources": {"cpus_per_worker": math.nan}}, ["resources", "'ray.cpus_per_worker' = nan"]),
    "resources-gpu-str": ({"resources": {"use_gpu": "yes"}}, ["resources", "'ray.use_gpu' must be true or false"]),
    "resources-tiny-cpu": ({"resources": {"cpus_per_worker": 0.00001}}, ["resources", "'ray.cpus_per_worker' = 1e-05"]),
    "set-string": ({"set": "train.max_steps=3"}, ["set: 'train.max_steps=3'", "expected a list"]),
    "set-item-int": ({"set": [5]}, ["set: 5", "'dotted.key=value' string"]),
    "set-item-typo": ({"set": ["train.max_step=300"]}, ["set train.max_step=300", "did you mean 'train.max_steps'"]),
    "set-item-nan": ({"set": ["train.grad_clip=.nan"]}, ["base.yaml and set: 'train.grad_clip' = nan"]),
    "set-item-no-equals": ({"set": ["train.max_steps"]}, ["set train.max_steps", "expected dotted.key=value"]),
    "set-run-name": ({"set": ["ray.name=../up"]}, ["base.yaml and set: 'ray.name' = '../up'"]),
    "base-int": ({"base": 5}, ["base: 5", "path of a run config file"]),
    "base-missing": ({"base": "nowhere.yaml"}, ["config file nowhere.yaml does not exist"]),
    "search_alg": ({"search_alg": "bayes"}, ["search_alg: 'bayes'", "random, grid, optuna"]),
    "search_alg-list": ({"search_alg": ["random"]}, ["search_alg: ['random']"]),
    "optuna-grid": ({"search_alg": "optuna", "search": {LR: {"grid": [1e-3]}}}, ["optuna cannot take grid"]),
    "metric": ({"metric": "loss"}, ["metric/mode: 'loss'/'min'"]),
    "unknown-key": ({"serach": {}}, ["unknown key 'serach'", "did you mean 'search'"]),
    "config-key-at-top": ({"train.max_steps": 100}, ["unknown key 'train.max_steps'", "go in set:"]),
    "config-section-at-top": ({"train": {"max_steps": 100}}, ["unknown key 'train'", "go in set:"]),
}


@pytest.fixture(scope="module")
def ray_module():
    import ray

    return ray


@pytest.mark.parametrize("case", list(SWEEP_CASES))
def test_bad_sweep_files(tmp_path, capsys, ray_module, case):
    change, fragments = SWEEP_CASES[case]
    path = write_sweep(tmp_path, change)
    ray_was_up = ray_module.is_initialized()  # the suite's shared Ray may be up already
    with pytest.raises(ConfigError) as e:
        sweepspec.load_sweep(path)
    refused(e, str(path), *fragments)
    assert "--set" not in str(e.value)  # the user wrote a sweep file, not a flag
    assert sweep.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") and fragments[0] in err
    assert ray_module.is_initialized() == ray_was_up  # the CLI refused before starting Ray
    assert not (tmp_path / "sweeps").exists()


def test_a_sweep_file_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("- search\n- tie\n")
    with pytest.raises(ConfigError, match=r"expected a mapping \(name, base, search, ...\), got list"):
        sweepspec.load_sweep(path)


def test_a_sweep_key_written_twice(tmp_path):
    path = write_sweep(tmp_path, {})
    path.write_text(path.read_text() + "search:\n  train.grad_clip: {choice: [0.5]}\n")
    with pytest.raises(ConfigError) as e:
        sweepspec.load_sweep(path)
    refused(e, str(path), "found the key 'search' twice")


def test_unsafe_file_name_as_sweep_name(tmp_path):
    path = write_sweep(tmp_path, {"name": DROP}, filename="my sweep.yaml")
    with pytest.raises(ConfigError) as e:
        sweepspec.load_sweep(path)
    refused(e, str(path), "no name: set, so the file name is used", "'name' = 'my sweep'")
    assert sweepspec.load_sweep(write_sweep(tmp_path, {"name": DROP}, filename="lr-2.yaml")).name == "lr-2"


def test_optuna_missing_is_found_before_ray(tmp_path):
    pytest.importorskip("ray")
    import importlib.util

    if importlib.util.find_spec("optuna") is not None:
        pytest.skip("optuna is installed here")
    with pytest.raises(ConfigError, match=r"search_alg optuna needs `pip install optuna`"):
        sweepspec.load_sweep(write_sweep(tmp_path, {"search_alg": "optuna"}))


@pytest.mark.parametrize("change", [
    {},
    {"search": {LR: {"uniform": [1e-4, 1e-2]}, "train.grad_clip": {"choice": [0.0, 0.5, 2.0]}}},
    {"search": {LR: {"choice": [1e-3]}, "train.max_steps": {"choice": [100, 200]}, "train.warmup_steps": {"grid": [10, 50]}},
     "scheduler": {"type": "asha", "grace_period": 100, "reduction_factor": 3.5, "brackets": 2}},
    {"search": {"train.max_steps": {"choice": [100, 200]}}, "tie": {"train.eval_interval": {"of": "train.max_steps",
                                                                                          "factor": 1}}},
    {"search": {"train.dtype": {"choice": ["float32", "bfloat16"]}}, "tie": DROP, "seed": None,
     "max_concurrent_trials": None, "scheduler": None, "name": "x@y+z=1"},
], ids=["good", "uniform-and-choice", "pairs-that-fit", "int-tie", "nulls"])
def test_good_sweep_files_load(tmp_path, change):
    spec = sweepspec.load_sweep(write_sweep(tmp_path, change))
    assert spec.search == {**GOOD, **change}["search"]


def test_sweep_cli_exits_2_before_ray(tmp_path):
    path = write_sweep(tmp_path, {"search": {"train.batch_size": {"uniform": [8, 32]}}, "tie": DROP})
    proc = subprocess.run([sys.executable, "-m", "raypipe.sweep", str(path)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {path}: search: 'train.batch_size': uniform draws real numbers")
    assert "Traceback" not in proc.stderr and "Started a local Ray" not in proc.stderr + proc.stdout
    assert not (tmp_path / "sweeps").exists()
