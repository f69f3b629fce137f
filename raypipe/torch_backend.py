"""Ray Train's torch process-group setup, without importing torch in the driver or Ray Train's controller.

TorchTrainer's default `TorchConfig` is defined in a module that imports torch: the run's controller
actor, which unpickles it, imports torch and ray.train.torch before it starts any worker, and never
uses them. `LazyTorchConfig` is the same setup: each worker runs Ray's own functions
(`ray.train.torch.config`) to set the torch.distributed environment, join the process group and leave
it, called through this torch-free module. Torch is then imported only in the workers: on an H100 host
a launch reached its first step 1.7 s sooner on average (BENCHMARKS.md, start-up before and after).

The driver, which builds the config and the train function around it, does not import torch either:
`has_ray_setup` reads Ray's module source instead of importing it, and `WorkerDeviceContext` imports
Ray's device context on the worker.

`torch_config()` falls back to Ray's `TorchConfig` where those functions are missing (another Ray).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train.backend import Backend, BackendConfig

logger = logging.getLogger(__name__)

RAY_TORCH_CONFIG = "ray.train.torch.config"
RAY_SETUP = ("_set_torch_distributed_env_vars", "_setup_torch_process_group", "_shutdown_torch")
SHUTDOWN_TIMEOUT_ENV, SHUTDOWN_TIMEOUT_S = "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", 30  # as Ray's own backend


def torch_config(use_gpu: bool) -> BackendConfig:
    """The backend config for Ray Train's trainer: nccl on GPUs, gloo on CPUs."""
    backend = "nccl" if use_gpu else "gloo"
    from ray.train._internal import utils as ray_utils

    if has_ray_setup() and hasattr(ray_utils, "get_address_and_port"):
        return LazyTorchConfig(backend=backend)
    from ray.train.torch import config as ray_torch

    return ray_torch.TorchConfig(backend=backend)


def has_ray_setup() -> bool:
    """Whether this Ray's `ray.train.torch.config` defines the functions the workers call. Unless it is
    imported already, its source is read: importing it would import torch in the driver."""
    module = sys.modules.get(RAY_TORCH_CONFIG)
    if module is not None:
        return all(hasattr(module, name) for name in RAY_SETUP)
    path = Path(importlib.util.find_spec("ray.train").origin).parent / "torch" / "config.py"  # not its package: torch
    source = path.read_text() if path.is_file() else ""
    return all(f"def {name}(" in source for name in RAY_SETUP)


@dataclass
class LazyTorchConfig(BackendConfig):
    backend: str = "gloo"
    init_method: str = "env"  # read by TorchTrainer; the setup below always uses the environment
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return LazyTorchBackend

    @property
    def train_func_context(self):  # entered on each worker around the train function (sets its CUDA device)
        return WorkerDeviceContext

    @property
    def framework(self):
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": self.init_method, "timeout_s": self.timeout_s}


class WorkerDeviceContext:
    """Ray's `TorchConfigContextManager` (each worker's default CUDA device), imported on the worker: the
    driver builds the train function around this class, and Ray's would import torch there."""

    def __enter__(self):
        from ray.train.torch.config import TorchConfigContextManager

        self.ray_context = TorchConfigContextManager()
        return self.ray_context.__enter__()

    def __exit__(self, *exc_info):
        return self.ray_context.__exit__(*exc_info)


def on_worker(name: str, **kwargs) -> Any:
    """Run `ray.train.torch.config.<name>` on a worker (imported there, not in the controller)."""
    from ray.train.torch import config as ray_torch

    return getattr(ray_torch, name)(**kwargs)


def set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)


class LazyTorchBackend(Backend):
    """Ray's `_TorchBackend.on_start` / `on_shutdown` for Ray Train's worker groups, env:// init."""

    share_cuda_visible_devices: bool = True  # as Ray's: every worker of a node sees the node's GPUs

    def on_start(self, worker_group, backend_config: LazyTorchConfig) -> None:
        from ray.train._internal.utils import get_address_and_port

        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(set_master, addr=addr, port=port)
        worker_group.execute(on_worker, "_set_torch_distributed_env_vars")
        ray.get([worker_group.execute_single_async(rank, on_worker, "_setup_torch_process_group",
                                                   backend=backend_config.backend, world_rank=rank,
                                                   world_size=len(worker_group), init_method="env://",
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config: LazyTorchConfig) -> None:
        futures = worker_group.execute_async(on_worker, "_shutdown_torch", destroy_process_group=len(worker_group) > 1)
        timeout = float(os.environ.get(SHUTDOWN_TIMEOUT_ENV, SHUTDOWN_TIMEOUT_S))
        try:
            ray.get(futures, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            logger.warning(f"torch process group shutdown timed out after {timeout} s")
