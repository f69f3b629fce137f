"""Ray clusters of the test's own on this machine: `ray job submit` with token auth, and two nodes.

Each cluster is started with `ray start` on its own ports and temp dir, with a marker variable in
its environment that every Ray process it spawns inherits; it is stopped by signalling exactly the
processes that carry the marker (never `ray stop`, which would stop every Ray on the machine).
Drivers run as subprocesses, so the session's own Ray (the `ray_cluster` fixture) is not involved.
"""

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from helpers import tiny_config

from raypipe.checkpoint import load_model, read_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MARKER = "RAYPIPE_TEST_CLUSTER"


def free_ports(n: int, avoid: tuple[int, ...] = ()) -> list[int]:
    """`n` consecutive ports below the kernel's ephemeral range, free on every interface now.

    Ports the OS hands out (bind to port 0) come from the ephemeral range, where any process's
    outgoing connection can take them before Ray binds them; below it only listeners compete.
    From 20000 up: 10002-19999 is where other local Rays (the session fixture's) start workers.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    while True:
        base = rng.randrange(20_000, low - n)
        ports = list(range(base, base + n))
        if not set(ports) & set(avoid) and all(_bindable(p) for p in ports):
            return ports


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))  # Ray's node ports listen on every interface
            return True
        except OSError:
            return False


class LocalCluster:
    """Ray nodes started by this test alone; `stop()` ends only the processes they started."""

    def __init__(self, token: str):
        # Unix socket paths are limited to ~107 bytes: a short temp dir, not pytest's tmp_path.
        self.root = Path(tempfile.mkdtemp(prefix="rp-", dir="/tmp"))
        self.token_file = self.root / "token"
        self.token_file.write_text(token)
        self.token_file.chmod(0o600)
        self.marker = self.root.name
        self.gcs_port, self.dashboard_port, self.client_port = free_ports(3)
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.nodes = 0

    def env(self, **extra) -> dict:
        """What every node (and the drivers it runs) sees: token auth on, our venv first on PATH."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_"))}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file), WANDB_SILENT="true",
                   PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0", **extra)
        env[MARKER] = self.marker
        return env

    def start_node(self, num_cpus: int, resources: dict, **env) -> None:
        ports = free_ports(6 + 40, avoid=(self.gcs_port, self.dashboard_port, self.client_port))
        args = [str(BIN / "ray"), "start", "--num-cpus", str(num_cpus), "--resources", json.dumps(resources),
                "--temp-dir", str(self.root / f"node{self.nodes}"), "--disable-usage-stats",
                "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
                "--dashboard-agent-listen-port", str(ports[2]), "--dashboard-agent-grpc-port", str(ports[3]),
                "--runtime-env-agent-port", str(ports[4]), "--metrics-export-port", str(ports[5]),
                "--worker-port-list", ",".join(map(str, ports[6:])), "--object-store-memory", str(200 << 20)]
        if self.nodes == 0:
            args += ["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                     "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(self.client_port)]
        else:
            args += ["--address", self.address]
        proc = subprocess.run(args, check=False, env=self.env(**env), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        self.nodes += 1

    def ray(self, *args: str, token: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
        """The `ray` CLI as a user's machine runs it: token from RAY_AUTH_TOKEN (or none)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        if token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token_file.read_text())
        return subprocess.run([str(BIN / "ray"), *args], check=False, env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    def pids(self) -> list[int]:
        """Live processes carrying this cluster's marker (Ray's daemons, agents, workers, drivers)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                ours = f"{MARKER}={self.marker}".encode() in (entry / "environ").read_bytes().split(b"\0")
                if ours and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":  # Z: a zombie
                    found.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                continue
        return found

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):  # raylet and GCS may ignore SIGTERM a while
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait
            while self.pids() and time.time() < deadline:
                time.sleep(0.2)
        assert not self.pids(), f"cluster {self.marker} left processes {self.pids()}"
        shutil.rmtree(self.root, ignore_errors=True)


def write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_job_submit_with_token_auth(embedded_data, tmp_path):
    """`ray job submit --working-dir` of the repo against a token-authenticated head: the job
    succeeds, its outputs are under the storage path, and neither the token nor a W&B key leaks."""
    token, wandb_key = secrets.token_hex(32), "local-" + secrets.token_hex(20)
    cluster = LocalCluster(token)
    try:
        cluster.start_node(num_cpus=2, resources={}, WANDB_API_KEY=wandb_key)
        # Token auth is on: a client without the token is refused.
        refused = cluster.ray("job", "list", "--address", cluster.dashboard, token=False, timeout=60)
        assert refused.returncode != 0 and "Missing authentication token" in refused.stdout + refused.stderr

        cfg = tiny_config(embedded_data, tmp_path / "runs", max_steps=10, eval_interval=5, eval_batches=2)
        config = write_config(cfg, tmp_path / "tiny.yaml")
        sub = cluster.ray("job", "submit", "--address", cluster.dashboard, "--working-dir", str(ROOT),
                          "--submission-id", "raypipe-tiny", "--", "python", "-m", "raypipe.train",
                          "--config", str(config), "--name", "tiny-job")
        out = sub.stdout + sub.stderr
        assert sub.returncode == 0, out[-4000:]
        status = cluster.ray("job", "status", "--address", cluster.dashboard, "raypipe-tiny", timeout=60)
        assert "job 'raypipe-tiny' succeeded" in (status.stdout + status.stderr).lower()  # SUCCEEDED

        run_dir = tmp_path / "runs" / "tiny-job"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 10 and summary["run_dir"] == str(run_dir)
        assert (Path(summary["best_checkpoint"]) / "manifest.json").is_file()
        assert f"outputs go to {run_dir}" in out and f"run directory: {run_dir}" in out  # the driver says where
        assert "started a local Ray" not in out  # it joined the cluster

        # The upload was the code alone (.gitignore + .rayignore): no data, runs or venvs.
        assert "data/embedded" not in out
        logs = cluster.ray("job", "logs", "--address", cluster.dashboard, "raypipe-tiny", timeout=60).stdout
        driver_logs = all_bytes(cluster.root / "node0" / "session_latest" / "logs")
        assert b"outputs go to" in driver_logs  # the job driver's log is among them
        # The same for a sweep (one trial): its table and best config land under its storage path.
        sweep = tmp_path / "sweep.yaml"
        sweep.write_text(yaml.safe_dump({
            "name": "job-sweep", "base": "tiny.yaml", "set": ["train.max_steps=4", "train.eval_interval=2"],
            "search": {"train.learning_rate": {"grid": [3e-3]}}, "scheduler": {"type": "fifo"},
            "resources": {"num_workers": 1, "cpus_per_worker": 1}, "storage_path": str(tmp_path / "sweeps")}))
        sub = cluster.ray("job", "submit", "--address", cluster.dashboard, "--working-dir", str(ROOT),
                          "--", "python", "-m", "raypipe.sweep", str(sweep))
        assert sub.returncode == 0, (sub.stdout + sub.stderr)[-4000:]
        assert (tmp_path / "sweeps" / "job-sweep" / "best_config.yaml").is_file()
        out += sub.stdout + sub.stderr
        for secret in (token, wandb_key):
            assert secret not in out and secret not in logs
            assert secret.encode() not in driver_logs  # every Ray log of the session
            assert secret.encode() not in all_bytes(tmp_path)  # summaries, config.yaml, W&B files, checkpoints
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head and a worker node on this machine, 1 CPU each, each with its own data cache."""
    cluster, caches = LocalCluster(secrets.token_hex(32)), tmp_path_factory.mktemp("caches")
    try:
        cluster.start_node(1, {"head_node": 1}, RAYPIPE_DATA_CACHE=str(caches / "head"))
        cluster.start_node(1, {"worker_node": 1}, RAYPIPE_DATA_CACHE=str(caches / "worker"))
        yield cluster, caches
    finally:
        cluster.stop()


def train_on(cluster: LocalCluster, caches: Path, cfg, tmp_path: Path, name: str) -> dict:
    """`python -m raypipe.train` as a driver on the head node (its environment), 2 workers spread."""
    cfg.ray.num_workers, cfg.ray.placement_strategy = 2, "STRICT_SPREAD"
    config = write_config(cfg, tmp_path / f"{name}.yaml")
    env = cluster.env(RAY_ADDRESS=cluster.address, RAYPIPE_DATA_CACHE=str(caches / "head"))
    proc = subprocess.run([sys.executable, "-m", "raypipe.train", "--config", str(config), "--name", name],
                          check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((Path(cfg.ray.storage_path) / name / "summary.json").read_text())


def test_two_nodes_one_trainer(two_nodes, embedded_data, tmp_path):
    cluster, caches = two_nodes
    cfg = tiny_config(embedded_data, tmp_path / "runs", max_steps=30, eval_interval=10, eval_batches=2)
    summary = train_on(cluster, caches, cfg, tmp_path, "spread")
    assert summary["world_size"] == 2 and summary["steps"] == 30
    history = [json.loads(line) for line in (tmp_path / "runs" / "spread" / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.3  # the loss falls
    model = load_model(summary["best_checkpoint"])  # and the checkpoint loads
    assert model.cfg.n_layer == 2

    # The two workers ran on the two nodes (Ray's state API of this cluster).
    listed = cluster.ray("list", "actors", "--address", cluster.dashboard, "--filter", "class_name=RayTrainWorker",
                         "--detail", "--format", "json", "--limit", "100", timeout=120)
    nodes = {a["node_id"] for a in json.loads(listed.stdout[listed.stdout.index("["):])}
    assert len(nodes) == 2, listed.stdout[-2000:]


def test_two_nodes_each_stage_a_verified_copy(two_nodes, embedded_data, tmp_path):
    """data.dir is a URI on storage standing in for a shared one: each node copies it to its own cache."""
    cluster, caches = two_nodes
    shared = tmp_path / "shared" / "stories"
    shutil.copytree(embedded_data, shared, ignore=shutil.ignore_patterns(".verified.json"))
    cfg = tiny_config(embedded_data, tmp_path / "runs", max_steps=10, eval_interval=5, eval_batches=2)
    cfg.data.dir, cfg.data.source = f"file://{shared}", "prepared"
    summary = train_on(cluster, caches, cfg, tmp_path, "staged")
    assert summary["steps"] == 10 and summary["data_dir"] == f"file://{shared}"

    inodes = {(shared / "train.bin").stat().st_ino}
    for node in ("head", "worker"):
        (copy,) = (caches / node).glob("stories-*")  # one copy per node, nothing half-written beside it
        assert not list((caches / node).glob(".*tmp*"))
        assert (copy / "train.bin").read_bytes() == (shared / "train.bin").read_bytes()
        verified = json.loads((copy / ".verified.json").read_text())
        meta = json.loads((shared / "meta.json").read_text())
        assert {s: verified[s]["sha256"] for s in ("train", "val")} == meta["sha256"]
        inodes.add((copy / "train.bin").stat().st_ino)
    assert len(inodes) == 3  # the source and two separate copies
    # Checkpoints name the data location, not a node's copy (so --resume works from any node).
    assert read_config(summary["best_checkpoint"]).data.dir == f"file://{shared}"
