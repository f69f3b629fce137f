"""raypipe.torch_backend: Ray Train's torch setup run on the workers, torch never imported by the controller."""

import json
import pickle
import subprocess
import sys

import ray.train.torch.config as ray_torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

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
