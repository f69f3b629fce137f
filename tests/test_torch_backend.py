"""raypipe.torch_backend: Ray Train's torch setup run on the workers, torch never imported by the controller."""

import json
import os
import pickle
import subprocess
import sys

import yaml

import ray.train.torch.config as ray_torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from helpers import tiny_config
from raypipe.torch_backend import LazyTorchConfig, torch_config

# What Ray Train's controller does with a run's backend config, in a fresh interpreter: unpickle it and
# read what it reads before and while it starts the workers.
CONTROLLER_SIDE = """
import pickle, sys
config = pickle.loads(sys.stdin.buffer.read())
backend = config.backend_cls()
facts = (backend.share_cuda_visible_devices, config.backend_cls.has_replica_groups, str(config.framework),
         config.to_dict())
print(facts, "torch" in sys.modules)
"""


def test_the_controller_side_never_imports_torch():
    config = torch_config(use_gpu=True)
    assert isinstance(config, LazyTorchConfig) and config.backend == "nccl"
    out = subprocess.run([sys.executable, "-c", CONTROLLER_SIDE], input=pickle.dumps(config), capture_output=True,
                         check=True).stdout.decode()
    assert out.strip() == ("(True, False, 'TrainingFramework.TORCH', "
                           "{'backend': 'nccl', 'init_method': 'env', 'timeout_s': 1800}) False")


def test_another_ray_without_the_setup_functions_gets_rays_own_config(monkeypatch):
    monkeypatch.delattr(ray_torch, "_setup_torch_process_group")
    config = torch_config(use_gpu=False)
    assert type(config) is ray_torch.TorchConfig and config.backend == "gloo"


def test_two_workers_join_one_process_group(ray_cluster, tmp_path):
    # Defined here, so that Ray ships the function itself (the tests are no package the workers import).
    def report_process_group(config):
        import json
        import os

        import torch
        import torch.distributed as dist

        rank = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(rank)
        facts = {"sum": rank.item(), "backend": dist.get_backend(), "world": dist.get_world_size(),
                 "env": [os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")]}
        with open(f"{config['out']}/rank{dist.get_rank()}.json", "w") as f:
            json.dump(facts, f)

    trainer = TorchTrainer(report_process_group, train_loop_config={"out": str(tmp_path)},
                           torch_config=torch_config(use_gpu=False),
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(name="lazy-torch", storage_path=str(tmp_path / "runs")))
    trainer.fit()
    for rank in (0, 1):
        facts = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert (facts["sum"], facts["backend"], facts["world"]) == (3.0, "gloo", 2)  # ranks 1 + 2 over the group
        assert facts["env"][:3] == [str(rank), str(rank), "2"] and facts["env"][3]  # one node: local rank = rank


# The launch as `python -m raypipe.train` runs it, with torch made unimportable in that process only.
DRIVER_WITHOUT_TORCH = "import sys; sys.modules['torch'] = None; from raypipe.train import main; sys.exit(main())"


def test_the_driver_trains_without_importing_torch(ray_cluster, embedded_data, tmp_path):
    """Torch is for the workers: the driver checks the config and data, starts Ray Train and writes the
    outputs without it (importing it cost 4.5 s of an H100 host's launch, before Ray started)."""
    cfg = tiny_config(embedded_data, tmp_path / "runs", max_steps=4, eval_interval=4, eval_batches=1)
    cfg.wandb.mode, cfg.train.sample_tokens = "disabled", 0
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address_info["gcs_address"]}
    proc = subprocess.run([sys.executable, "-c", DRIVER_WITHOUT_TORCH, "--config", str(config), "--name", "no-torch"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "no-torch" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_val_loss"] > 0
