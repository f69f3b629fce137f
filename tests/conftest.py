import os
from pathlib import Path

import pytest

from raypipe.config import Config
from raypipe.corpus import prepare_embedded

os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def embedded_data(tmp_path_factory) -> Path:
    """A small embedded corpus (real memmaps, real BPE), shared by the whole session."""
    cfg = Config().data
    cfg.dir, cfg.num_stories = str(tmp_path_factory.mktemp("data") / "embedded"), 3000
    prepare_embedded(cfg, log=lambda _: None)
    return Path(cfg.dir)


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


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the session, sized for this 2-core machine, bound to 127.0.0.1."""
    import ray

    context = ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
                       runtime_env={"env_vars": {"WANDB_SILENT": "true"}})
    yield context  # .dashboard_url: the state API of this cluster, even with another Ray on the machine
    ray.shutdown()
