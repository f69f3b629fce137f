"""Helpers shared by the tests (import them with `from helpers import ...`); fixtures are in conftest.py."""

from pathlib import Path

from raypipe.config import Config

# The environment the test session's Ray (tests/conftest.py's ray_cluster) was started with: its workers'.
RAY_ENVIRON: dict[str, str] = {}


def tiny_config(data_dir: Path, storage: Path, **train) -> Config:
    """A model and run small enough for a few seconds of CPU per test."""
    cfg = Config()
    cfg.data.dir, cfg.data.num_stories = str(data_dir), 3000
    m = cfg.model
    m.n_layer, m.global_every, m.n_embd, m.n_head, m.n_kv_head, m.head_dim = 2, 2, 64, 2, 1, 16
    m.mlp_hidden, m.sliding_window = 128, 16
    t = cfg.train
    t.block_size, t.batch_size, t.grad_accum_steps = 32, 8, 2
    t.max_steps, t.warmup_steps, t.eval_interval, t.eval_batches, t.learning_rate, t.min_lr = 30, 3, 10, 4, 3e-3, 3e-4
    for k, v in train.items():
        setattr(t, k, v)
    cfg.ray.storage_path, cfg.ray.cpus_per_worker = str(storage), 1
    cfg.wandb.mode = "offline"
    return cfg
