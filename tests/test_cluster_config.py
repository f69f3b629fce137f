"""cluster.yaml passes Ray's own cluster-config validation, and keeps Ray's security defaults."""

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def load() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load()))  # what `ray up` runs first


def test_schema_check_can_fail():
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(load())
    bad["available_node_types"]["gpu_worker"]["min_wrokers"] = 1
    with pytest.raises(Exception, match="min_wrokers"):
        validate_config(prepare_config(bad))


def test_dashboard_stays_on_localhost_and_uploads_stay_small():
    cfg = load()
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert {"data", "runs", ".venv", ".git"} <= set(cfg["rsync_exclude"])
    assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}
