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


def test_token_auth_on_every_node():
    """Ray 2.60 enables token auth for `ray start --head` only when it finds a token, and never by
    itself for a joining worker: every node is started with RAY_AUTH_MODE=token and gets the token."""
    cfg = load()
    for command in (cfg["head_start_ray_commands"][-1], cfg["worker_start_ray_commands"][-1]):
        assert command.startswith("RAY_AUTH_MODE=token ray start")
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_job_upload_leaves_out_data_runs_and_venvs(tmp_path):
    """The repo's .gitignore + .rayignore, packed by Ray's own working_dir packager (as `ray job
    submit --working-dir .` does) over a tree with the usual big directories in it."""
    import zipfile

    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    tree = tmp_path / "repo"
    for name in (".gitignore", ".rayignore"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text((ROOT / name).read_text())
    kept = ["raypipe/train.py", "configs/default.yaml", "cluster.yaml", "README.md"]
    left_out = ["data/embedded/train.bin", "runs/r/checkpoint_0000010/model.safetensors", ".venv/bin/python",
                "venv/lib/x.py", ".git/HEAD", "wandb/offline-run/x.wandb", ".whl/torch.whl", ".whl-prep/a.whl",
                "raypipe.egg-info/PKG-INFO", "raypipe/__pycache__/train.cpython-311.pyc", "tokens.bin"]
    for rel in kept + left_out:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("x")
    create_package(str(tree), tmp_path / "pkg.zip", include_gitignore=True,
                   excludes=get_runtime_env_default_excludes())
    packed = {n for n in zipfile.ZipFile(tmp_path / "pkg.zip").namelist() if not n.endswith("/")}
    assert set(kept) <= packed
    assert not packed & set(left_out), packed & set(left_out)
