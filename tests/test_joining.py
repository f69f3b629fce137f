"""Joining a Ray cluster that is not there, or that refuses this process's token: one line at once,
from every entry point that joins RAY_ADDRESS, before any work starts."""

import os
import subprocess
import sys

import pytest
import yaml

from raypipe.joining import gcs_host_port
from test_cluster_jobs import free_ports


def without_token(env: dict) -> dict:
    env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_TOKEN")}
    return {**env, "RAY_AUTH_MODE": "disabled"}


def run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), proc.stderr[-2000:]


@pytest.mark.parametrize("address,expected", [
    ("10.0.0.5:6379", ("10.0.0.5", 6379)), ("[::1]:6379", ("::1", 6379)), ("localhost:6380", ("localhost", 6380)),
    ("auto", None), ("local", None), ("ray://10.0.0.5:10001", None), ("10.0.0.5", None), (":6379", None),
])
def test_gcs_addresses_are_told_from_what_ray_resolves_itself(address, expected):
    assert gcs_host_port(address) == expected


def data_args(data) -> list[str]:
    return ["--set", f"data.dir={data}", "--set", "data.num_stories=3000"]


def sweep_file(tmp_path, data) -> str:
    path = tmp_path / "lr.yaml"
    path.write_text(yaml.safe_dump({"name": "lr", "set": [f"data.dir={data}", "data.num_stories=3000"], "num_samples": 1,
                                    "search": {"train.learning_rate": {"loguniform": [1e-3, 3e-3]}},
                                    "resources": {"num_workers": 1, "use_gpu": False}}))
    return str(path)


@pytest.mark.parametrize("entry", ["train", "sweep", "prepare"])
def test_an_address_where_nothing_listens_is_one_line(entry, embedded_data, tmp_path):
    address = f"127.0.0.1:{free_ports(1)[0]}"
    (tmp_path / "in.txt").write_text("a story\n\nanother story\n")
    args = {"train": ["raypipe.train", *data_args(embedded_data)],
            "sweep": ["raypipe.sweep", sweep_file(tmp_path, embedded_data)],
            "prepare": ["raypipe.prepare", "--ray", "--tokenizer", "byte", str(tmp_path / "in.txt"),
                        "--out", str(tmp_path / "out")]}
    proc = run(args[entry], {**os.environ, "RAY_ADDRESS": address})
    assert_one_line_error(proc, address, "no Ray cluster answers there")


def test_a_cluster_that_wants_a_token_this_process_lacks_is_one_line(ray_cluster, embedded_data):
    address = ray_cluster.address_info["gcs_address"]
    proc = run(["raypipe.train", *data_args(embedded_data)], without_token({**os.environ, "RAY_ADDRESS": address}))
    assert_one_line_error(proc, address, "token authentication", "RAY_AUTH_MODE=token")
