"""Launch to first step of `python -m raypipe.train`, run after run on this machine: first each launch
starting its own local Ray, then each joining one Ray kept running (`ray start --head`). One row per
launch, read from its summary.json: when the first step started, when Ray was ready and the worker
started (seconds after launch), the compile time and the launch's wall time.

    python benchmarks/bench_startup.py --runs 2 -- --config configs/gemma3-270m.yaml --set data.dir=... \\
        --set train.max_steps=12 --set train.eval_interval=6 --set train.checkpoint_interval=null
    python benchmarks/bench_startup.py --ray-start "--num-cpus 2" -- --set train.max_steps=4 ...   # CPU
    python benchmarks/bench_startup.py --own-runs 0 --runs 4 --trees old . -- ...   # before/after, alternately

Everything after `--` goes to `python -m raypipe.train` (each launch adds its own --name and
--storage-path). The joined Ray runs on its own port and temp dir; only it is stopped at the end.
With `--trees A B`, the joined launches run from A and B in turn (each its working directory, so its
`raypipe`; relative paths in the arguments resolve there), after one more launch from the last tree
that warms the compile cache and is not counted.
"""

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, head: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            raise SystemExit(f"`ray start --head` exited with {head.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(3)  # the GCS answers before the raylet and dashboard are up
                return
        time.sleep(0.5)
    raise SystemExit(f"Ray's head did not open port {port} in {timeout:.0f} s")


def launch(train_args: list[str], name: str, storage: Path, env: dict, tree: str = ".") -> dict:
    """One launch from `tree` (its working directory: `python -m` puts that first on sys.path)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "raypipe.train", *train_args, "--name", name,
                           "--storage-path", str(storage)], env=env, capture_output=True, text=True, cwd=tree)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    summary = json.loads((storage / name / "summary.json").read_text())
    return {"run": name, "first_step_s": summary["startup_s"], **summary.get("startup_phases_s", {}),
            "compile_s": summary["compile_s"], "wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="launches joining a running Ray")
    parser.add_argument("--own-runs", type=int, default=None, help="launches starting their own Ray (default: --runs)")
    parser.add_argument("--trees", nargs="+", default=[], help="source trees whose raypipe the joined launches take in turn")
    parser.add_argument("--ray-start", default="", help="extra `ray start --head` arguments, e.g. '--num-gpus 1'")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of raypipe.train")
    args = parser.parse_args()
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    own = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="raypipe-startup-") as tmp:
        storage = Path(tmp) / "runs"
        for i in range(args.runs if args.own_runs is None else args.own_runs):
            rows.append(launch(train_args, f"own-ray-{i + 1}", storage, own))
        port, ray_dir = free_port(), str(Path(tmp) / "ray")
        head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                                 f"--port={port}", f"--temp-dir={ray_dir}", "--disable-usage-stats",
                                 *shlex.split(args.ray_start)], env=own, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_for_port(port, head)
            # An address given explicitly needs the auth mode too (the head found this user's token file).
            joined = {**own, "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token"}
            if args.trees:
                launch(train_args, "warm-up", storage, joined, args.trees[-1])
            for i in range(args.runs):
                tree = args.trees[i % len(args.trees)] if args.trees else "."
                rows.append(launch(train_args, f"joined-ray-{i + 1}", storage, joined, tree))
                if args.trees:
                    rows[-1]["run"] += f" ({tree})"
        finally:  # this Ray's processes only (their command lines name its temp dir), not other Rays
            head.terminate()
            head.wait(timeout=60)
            subprocess.run(["pkill", "-f", ray_dir], check=False)
    columns = ["run", "first_step_s", "Ray ready", "worker started", "compile_s", "wall_s"]
    print("| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "-")) if c == "run" else f"{row.get(c, float('nan')):.1f}"
                                for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
