"""`python -m raypipe.bench` on CPU: the bare loop and one Ray worker, figures read back from its JSON."""

import json
import statistics

import pytest
import torch
import yaml

from helpers import tiny_config
from raypipe.bench import main
from raypipe.throughput import format_flops


def test_bench_bare_and_ray_rows(ray_cluster, embedded_data, tmp_path, capsys):
    threads = torch.get_num_threads()
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config(embedded_data, tmp_path / "unused").to_dict()))
    out = tmp_path / "bench.json"
    argv = ["--config", str(config_file), "--data", str(embedded_data), "--steps", "4", "--warmup", "1", "--json", str(out)]

    assert main(argv + ["--ray", "--workers", "1"]) == 0
    report = json.loads(out.read_text())
    bare, ray_one = report["rows"]
    assert (bare["run"], ray_one["run"]) == ("bare loop", "Ray Train")
    for row in (bare, ray_one):
        assert row["steps"] == 4 and row["workers"] == 1
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row["step_ms"] > 0
        assert 0 <= row["data_wait_frac"] < 1
        assert len(row["step_times_ms"]) == 4 and row["step_ms"] == statistics.median(row["step_times_ms"])
        assert row["tokens_per_s"] == pytest.approx(8 * 2 * 32 * 4 / (sum(row["step_times_ms"]) / 1000))
    assert ray_one["vs_bare"] == ray_one["tokens_per_s"] / bare["tokens_per_s"]
    assert report["peak_flops"] > 0 and report["peak_flops_source"] == "measured"
    # Every run, under Ray too, is given the table's peak: its live MFU lines divide by the same figure.
    assert bare["live_peak_flops"] == ray_one["live_peak_flops"] == report["peak_flops"]
    assert bare["cpu_threads"] == ray_one["cpu_threads"] == 1  # the bare loop gets a worker's ray.cpus_per_worker
    assert torch.get_num_threads() == threads  # and this process's own afterwards
    printed = capsys.readouterr().out
    assert f"| Ray Train | 1 | {ray_one['tokens_per_s']:,.0f} |" in printed
    assert f"MFU against {format_flops(report['peak_flops'])} per device (train.peak_flops)" in printed  # the bare run's line


def test_bench_refuses_a_worker_count_that_splits_the_batch_unevenly(embedded_data, tmp_path, capsys):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config(embedded_data, tmp_path / "unused").to_dict()))  # accumulation 2
    out = tmp_path / "bench.json"
    code = main(["--config", str(config_file), "--data", str(embedded_data), "--ray", "--workers", "1", "3",
                 "--json", str(out)])
    assert code == 2 and not out.exists()  # refused before the bare run, nothing written
    assert "--workers 3: the 16 sequences per step (train.batch_size 8 x train.grad_accum_steps 2" in capsys.readouterr().err
