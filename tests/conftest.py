"""Fixtures shared by the whole suite (one embedded corpus, one local Ray) and the markers they imply:
a test that takes `ray_cluster` is marked `ray`, a test in tests/test_cluster_*.py `cluster`; both are
also `slow`, so `python -m pytest -m "not slow"` is the fast loop. Plain helpers live in helpers.py."""

import os
import warnings
from pathlib import Path

import pytest

from raypipe.config import Config
from raypipe.corpus import ensure_embedded_corpus

os.environ.setdefault("WANDB_SILENT", "true")


def pytest_collection_modifyitems(items):
    for item in items:
        implied = []
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            implied.append("ray")
        if Path(str(item.fspath)).name.startswith("test_cluster_"):
            implied.append("cluster")
        for name in implied + (["slow"] if implied else []):
            item.add_marker(name)


@pytest.fixture(scope="session")
def embedded_data(tmp_path_factory) -> Path:
    """A small embedded corpus (real memmaps, real BPE), shared by the whole session."""
    cfg = Config().data
    cfg.dir, cfg.num_stories = str(tmp_path_factory.mktemp("data") / "embedded"), 3000
    ensure_embedded_corpus(cfg, log=lambda _: None)
    return Path(cfg.dir)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the session, sized for this 2-core machine, bound to 127.0.0.1."""
    import ray

    from helpers import RAY_ENVIRON

    RAY_ENVIRON.update(os.environ)  # what every worker process of this Ray inherits
    context = ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
                       runtime_env={"env_vars": {"WANDB_SILENT": "true"}})
    yield context  # .dashboard_url: the state API of this cluster, even with another Ray on the machine
    ray.shutdown()


@pytest.fixture(autouse=True)
def placement_groups_released(request):
    """After a test on the session Ray: every run's placement group gone. A Ray Train controller that outlived
    its run once kept its worker group's group, one of the 2 CPUs, and a later test's workers waited for it
    without end. Its groups get 30 s to go, then are removed with a warning that names the test."""
    yield
    if "ray_cluster" not in request.fixturenames:
        return
    import time

    import ray
    from ray.util.placement_group import PlacementGroup

    deadline = time.monotonic() + 30
    while True:
        held = {pg_id: info for pg_id, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"}
        if not held or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for pg_id in held:
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    if held:
        warnings.warn(f"{request.node.nodeid}: placement groups still held 30 s after the test, removed: "
                      f"{[info['bundles'] for info in held.values()]}")
