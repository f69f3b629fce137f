import re
from pathlib import Path

import pytest

from raypipe.config import Config, ConfigError, all_keys, load_config
from raypipe.train import main

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_default_yaml_is_the_embedded_default():
    assert load_config(ROOT / "configs" / "default.yaml") == Config()


def test_recipe_config_loads():
    cfg = load_config(ROOT / "configs" / "gemma3-270m.yaml")
    assert (cfg.train.learning_rate, cfg.train.min_lr) == (5e-4, 1e-4)
    assert cfg.train.batch_size * cfg.train.grad_accum_steps == 1024
    assert cfg.train.batch_size * cfg.train.grad_accum_steps * cfg.train.block_size * cfg.train.max_steps >= 614_400_000


@pytest.mark.parametrize("workers, micro, accum", [(1, 256, 4), (2, 256, 2), (4, 256, 1), (8, 128, 1), (16, 64, 1)])
def test_recipe_keeps_its_effective_batch_on_any_worker_count(workers, micro, accum, capsys):
    cfg = load_config(ROOT / "configs" / "gemma3-270m.yaml", [f"ray.num_workers={workers}"])
    assert cfg.train.worker_batch(workers) == (micro, accum)
    shard = cfg.train.for_worker(workers)  # what each worker's loop runs
    assert (shard.batch_size, shard.grad_accum_steps, shard.split_over_workers) == (micro, accum, False)
    assert shard.tokens_per_step(workers) == cfg.train.tokens_per_step(workers) == 1024 * 128
    assert main(["--config", str(ROOT / "configs" / "gemma3-270m.yaml"), "--set", f"ray.num_workers={workers}",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (f"tokens per optimizer step: 131,072 = {micro} seqs x 128 tokens x {accum} accumulation x "
            f"{workers} worker(s)") in out
    assert ((f"data parallel: ZeRO-1 (float32 reduce-scatter and all-gather, copies between GPUs where they can; "
             f"each worker updates and keeps AdamW's state for 1/{workers} of the weights)") in out) == (workers > 1)
    if workers == 2:
        assert main(["--config", str(ROOT / "configs" / "gemma3-270m.yaml"), "--set", "ray.num_workers=2",
                     "--set", "train.shard_transport=collectives", "--dry-run"]) == 0
        assert "data parallel: ZeRO-1 (float32 reduce-scatter and all-gather; each worker" in capsys.readouterr().out
        assert main(["--config", str(ROOT / "configs" / "gemma3-270m.yaml"), "--set", "ray.num_workers=2",
                     "--set", "train.overlap_comm=true", "--dry-run"]) == 0
        assert ("data parallel: ZeRO-1 (float32 reduce-scatter, per block during the backward; weights all-gathered "
                "during the next forward; each worker") in capsys.readouterr().out


def test_split_over_workers_refuses_a_count_that_does_not_divide_the_step_before_ray(capsys):
    with pytest.raises(ConfigError, match=r"'ray.num_workers' = 3: the 1024 sequences per step \(train.batch_size 256 x "
                                          r"train.grad_accum_steps 4, train.split_over_workers: true\) do not split"):
        load_config(ROOT / "configs" / "gemma3-270m.yaml", ["ray.num_workers=3"])
    # Without the split each worker runs its own batch_size x grad_accum_steps, and any count goes.
    cfg = load_config(ROOT / "configs" / "gemma3-270m.yaml", ["ray.num_workers=3", "train.split_over_workers=false"])
    assert cfg.train.worker_batch(3) == (256, 4) and cfg.train.tokens_per_step(3) == 3 * 1024 * 128


def test_yaml_1e_minus_4_is_a_number(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  learning_rate: 1e-4\n  min_lr: 1e-5\n"))
    assert cfg.train.learning_rate == 0.0001 and isinstance(cfg.train.learning_rate, float)
    assert load_config(None, ["train.learning_rate=2E-3"]).train.learning_rate == 0.002


def test_unknown_key_suggests_the_closest(tmp_path):
    path = write(tmp_path, "train:\n  learning_rat: 1e-3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rat'.*did you mean 'train.learning_rate'") as e:
        load_config(path)
    assert str(path) in str(e.value)
    with pytest.raises(ConfigError, match=r"--set.*unknown key 'model.n_layers'.*'model.n_layer'"):
        load_config(None, ["model.n_layers=4"])


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.batch_size' must be an integer, got 'sixteen'"):
        load_config(write(tmp_path, "train:\n  batch_size: sixteen\n"))
    with pytest.raises(ConfigError, match=r"'ray.use_gpu' must be true or false, got 1"):
        load_config(None, ["ray.use_gpu=1"])


def test_min_lr_above_learning_rate_is_refused():
    with pytest.raises(ConfigError, match=r"'train.min_lr' = 0.0005.*must not exceed train.learning_rate \(0.0001\)"):
        load_config(None, ["train.learning_rate=1e-4", "train.min_lr=5e-4"])


def test_other_semantic_checks():
    with pytest.raises(ConfigError, match="model.n_kv_head"):
        load_config(None, ["model.n_head=4", "model.n_kv_head=3"])
    with pytest.raises(ConfigError, match="float16 autocast needs a GPU"):
        load_config(None, ["train.dtype=float16"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["train.learning_rate"])


def test_cli_reports_config_errors(capsys):
    assert main(["--set", "train.max_step=3", "--dry-run"]) == 2
    assert "did you mean 'train.max_steps'" in capsys.readouterr().err


def test_dry_run_of_the_recipe_prints_its_size(capsys):
    assert main(["--config", str(ROOT / "configs" / "gemma3-270m.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 164,654,976 (output head untied" in out
    assert "tokens per optimizer step: 131,072" in out
    assert "token budget: 614,465,536" in out


def test_cluster_keys_are_checked():
    assert load_config(None, ["data.cache_dir=/tmp/raypipe-data", "ray.placement_strategy=STRICT_SPREAD"])
    with pytest.raises(ConfigError, match=r"'data.cache_dir' = 'cache': must be an absolute path on each node"):
        load_config(None, ["data.cache_dir=cache"])
    with pytest.raises(ConfigError, match=r"'data.cache_dir' = 's3://b/c': must be an absolute path"):
        load_config(None, ["data.cache_dir=s3://b/c"])
    with pytest.raises(ConfigError, match=r"'data.dir' = 's3://b/d': .*needs data.source: prepared"):
        load_config(None, ["data.dir=s3://b/d"])
    assert load_config(None, ["data.dir=s3://b/d", "data.source=prepared"]).data.dir == "s3://b/d"
    with pytest.raises(ConfigError, match=r"'ray.placement_strategy' = 'SPREADX': expected one of PACK"):
        load_config(None, ["ray.placement_strategy=SPREADX"])


def test_print_config_is_the_defaults_with_help_and_matches_default_yaml(capsys):
    assert main(["--print-config"]) == 0
    text = capsys.readouterr().out
    assert load_config_text(text) == Config().to_dict() == load_config(ROOT / "configs" / "default.yaml").to_dict()
    for line in text.splitlines():  # every key carries its one-line help
        if line.startswith("  "):
            assert re.fullmatch(r"  \w+: .+  # \S.*", line), line
    keys = [line.split(":")[0].strip() for line in text.splitlines() if line.startswith("  ")]
    assert len(keys) == len(all_keys()) - 1  # every key but resume_from (set by --resume, not in files)


def test_print_config_shows_the_file_and_set_values(capsys):
    assert main(["--config", str(ROOT / "configs" / "gemma3-270m.yaml"), "--set", "train.max_steps=70",
                 "--print-config"]) == 0
    cfg = load_config_text(capsys.readouterr().out)
    assert cfg["train"]["max_steps"] == 70 and cfg["model"]["n_layer"] == 18


def load_config_text(text: str) -> dict:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        return load_config(f.name).to_dict()
