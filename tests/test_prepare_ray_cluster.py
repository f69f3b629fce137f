"""`python -m raypipe.prepare --ray` on a real two-node Ray cluster of this test's own (127.0.0.1, own ports):
file:// inputs read and shards written by the workers of both nodes, then a training run on both nodes from
that output. The cluster helpers are tests/test_cluster_jobs.py's (one CPU per node)."""

import json
import subprocess
import sys

import pytest
from helpers import tiny_config
from test_cluster_jobs import LocalCluster, ROOT, train_on, two_nodes  # noqa: F401 (two_nodes: a fixture)

from raypipe.corpus import stories
from raypipe.datafiles import check_meta, split_files

pytestmark = pytest.mark.slow


def test_prepare_on_two_nodes_then_train_on_both(two_nodes, tmp_path):  # noqa: F811
    cluster, caches = two_nodes
    shared = tmp_path / "bucket"
    (shared / "raw").mkdir(parents=True)
    docs = stories(1200, seed=3)
    for i in range(4):  # four files, so read tasks spread over both nodes
        (shared / "raw" / f"part-{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[i::4]))
    out = f"file://{shared}/prepared"
    env = cluster.env(RAY_ADDRESS=cluster.address)
    proc = subprocess.run([sys.executable, "-m", "raypipe.prepare", f"file://{shared}/raw", "--out", out,
                           "--tokenizer", "byte", "--ray", "--workers", "2", "--shard-docs", "100", "--val-fraction", "0.1"],
                          check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta = check_meta(json.loads((shared / "prepared" / "meta.json").read_text()), "meta.json")
    assert meta["documents"]["train"] + meta["documents"]["val"] == 1200
    assert sorted(p.name for p in (shared / "prepared").iterdir()) == sorted(
        ["meta.json"] + [s.file for shards in split_files(meta).values() for s in shards])

    # The tokenizing actors ran on both nodes (Ray's state API of this cluster).
    listed = cluster.ray("list", "actors", "--address", cluster.dashboard, "--detail", "--format", "json",
                         "--limit", "1000", timeout=120)
    actors = json.loads(listed.stdout[listed.stdout.index("["):])
    nodes = {a["node_id"] for a in actors if "TokenizeAndWrite" in a.get("class_name", "")}
    assert len(nodes) == 2, listed.stdout[-2000:]

    # Training reads the sharded output: each node stages its own verified copy, two workers, the loss falls.
    cfg = tiny_config(tmp_path, tmp_path / "runs", max_steps=20, eval_interval=10, eval_batches=2)
    cfg.data.dir, cfg.data.source = out, "prepared"
    summary = train_on(cluster, caches, cfg, tmp_path, "sharded")
    assert summary["world_size"] == 2 and summary["steps"] == 20 and summary["data_dir"] == out
    history = [json.loads(line) for line in (tmp_path / "runs" / "sharded" / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
