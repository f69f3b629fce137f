"""Benchmark `python -m raypipe.prepare --ray` on this machine: tokens/s with 1 and 2 Ray workers (the size of
the tokenizing actor pool) and the driver's peak memory as the corpus grows; prints a markdown table.

    python benchmarks/bench_prepare_ray.py [--dir /tmp/raypipe-bench-ray] [--sizes 50 100 200] [--workers 1 2]
                                           [--tokenizer byte] [--file-mb 10]

The corpus is generated stories (raypipe.corpus.stories) as .jsonl files of --file-mb each (a corpus in a
bucket is many files; Ray Data reads a file per task), written to --dir (never the repo). Each run is a
child process `python -m raypipe.prepare --ray --workers N` that starts its own local Ray: "wall" includes
Ray's start; "pipeline tokens/s" is the driver's own progress figure (from the pipeline's start to its last
summary row). The driver's peak memory is its own VmHWM (peak RSS) from /proc, read until it exits: Ray's
daemons and workers are other processes. The goal: the driver stays flat as the corpus grows, since no corpus
byte passes through it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_files(root: Path, total_mb: int, file_mb: int) -> list[Path]:
    """root/part-NNN.jsonl, each about file_mb MB, enough of them for total_mb (made once, reused)."""
    root.mkdir(parents=True, exist_ok=True)
    files = [root / f"part-{i:03d}.jsonl" for i in range(-(-total_mb // file_mb))]
    missing = [f for f in files if not f.is_file()]
    if missing:
        code = ("import json, sys\nfrom raypipe.corpus import stories\n"
                "for seed, path in enumerate(sys.argv[2:]):\n"
                "    size, n = 0, int(sys.argv[1]) * 1_000_000\n"
                "    with open(path + '.tmp', 'w') as f:\n"
                "        while size < n:\n"
                "            for s in stories(5000, seed * 1000 + size // 100_000):\n"
                "                line = json.dumps({'text': s}) + '\\n'\n"
                "                f.write(line)\n"
                "                size += len(line)\n")
        subprocess.run([sys.executable, "-c", code, str(file_mb), *map(str, missing)], check=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
        for f in missing:
            os.replace(str(f) + ".tmp", f)
    return files


def run(files: list[Path], out: Path, workers: int, tokenizer: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a local Ray of its own
    cmd = [sys.executable, "-m", "raypipe.prepare", *map(str, files), "--out", str(out), "--tokenizer", tokenizer,
           "--ray", "--workers", str(workers)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    hwm = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            hwm = max(hwm, int(re.search(r"VmHWM:\s+(\d+)", status).group(1)))
        except (OSError, AttributeError):
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - start
    _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(err[-3000:])
    meta = json.loads((out / "meta.json").read_text())
    line = [x for x in err.splitlines() if " tokens/s" in x][-1]
    return {"tokens": sum(meta["tokens"].values()), "shards": sum(map(len, meta["shards"].values())), "wall": wall,
            "pipeline_tokens_s": float(line.rsplit("  ", 1)[1].split()[0].replace(",", "")),
            "driver_peak_mb": hwm / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/raypipe-bench-ray")
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200], help="corpus sizes in MB")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokenizer", default="byte")
    ap.add_argument("--file-mb", type=int, default=10)
    a = ap.parse_args()
    root = Path(a.dir)
    files = make_files(root / "corpus", max(a.sizes), a.file_mb)
    print(f"{os.cpu_count()} cores; tokenizer {a.tokenizer}; corpus files of {a.file_mb} MB in {root / 'corpus'}")
    print("| corpus MB | workers | tokens | shards | wall s | tokens/s (wall) | pipeline tokens/s | driver peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for mb in a.sizes:
        for workers in a.workers if mb == min(a.sizes) else [max(a.workers)]:
            r = run(files[:-(-mb // a.file_mb)], root / "out", workers, a.tokenizer)
            print(f"| {mb} | {workers} | {r['tokens']:,} | {r['shards']} | {r['wall']:.1f} | {r['tokens'] / r['wall']:,.0f} | "
                  f"{r['pipeline_tokens_s']:,.0f} | {r['driver_peak_mb']:.0f} |", flush=True)
    shutil.rmtree(root / "out", ignore_errors=True)


if __name__ == "__main__":
    main()
