"""Live figures: throughput and MFU over each interval (compiling steps left out), the progress line, the
compile lines, start-up and compile time in the summary, Ray's per-report lines kept off the console,
and the compile cache directory the workers get."""

import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import RAY_ENVIRON, tiny_config
from raypipe.checkpoint import load_state
from raypipe.config import ConfigError, load_config
from raypipe.driver import COMPILE_CACHE_ENV, compile_cache_env, worker_env_vars
from raypipe.loop import Timed, WorkerEnv, train
from raypipe.model import GemmaLM, flops_per_token, matmul_flops_per_token
from raypipe.throughput import CompileWatch, StepClock, progress_line
from wandb_offline import offline_runs, read_history

PROGRESS = re.compile(r"\[raypipe\] step +(\d+)/(\d+) \| loss [\d.]+ \| lr [\d.e+-]+ \| ([\d,]+) tok/s \| "
                      r"MFU ([\d.]+)% \| ETA \d+m\d\ds")


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def run_steps(clock: StepClock, fake: FakeClock, durations, compile_at=(), watch=None) -> None:
    for i, seconds in enumerate(durations):
        with clock.step(torch.device("cpu")):
            if i in compile_at:  # what Dynamo's callbacks do around a compilation
                watch._start()
                fake.t += seconds - 0.5
                watch._end()
                fake.t += 0.5
            else:
                fake.t += seconds


def test_interval_figures_count_a_slow_step_and_leave_out_a_compiling_one():
    fake, lines = FakeClock(), []
    watch = CompileWatch(lines.append, clock=fake)
    clock = StepClock(Timed(lambda: None), watch, tokens_per_step=1000, flops_per_token=6.0, peak=lambda: 2e4, now=fake)
    run_steps(clock, fake, [30.0, 1.0, 1.0, 1.0], compile_at={0}, watch=watch)
    figures, per_step = clock.interval()
    assert (figures.steps, figures.compiled) == (3, 1)  # the compiling step is left out
    assert figures.tokens_per_sec == pytest.approx(1000.0) and figures.mfu == pytest.approx(1000 * 6 / 2e4)
    assert per_step == pytest.approx(1.0)
    assert lines == ["[raypipe] compiling the model (torch.compile) ...", "[raypipe] compiled in 29.5 s"]
    assert watch.seconds == pytest.approx(29.5) and clock.compiled_steps(first_step=1) == [1]

    run_steps(clock, fake, [1.0, 7.0, 1.0, 1.0])  # one slow step: the next interval only, weighted by time
    fake.t += 2.0  # an evaluation between steps: the wall time per step (ETA) sees it, tokens/s does not
    figures, per_step = clock.interval()
    assert (figures.steps, figures.compiled) == (4, 0)
    assert figures.tokens_per_sec == pytest.approx(4000 / 10.0)
    assert per_step == pytest.approx(12.0 / 4)
    steady = clock.steady()
    assert steady.steps == 7 and steady.tokens_per_sec == pytest.approx(7000 / 13.0)
    line = progress_line(8, 100, 2.5, 1e-3, figures, per_step, last_step=100)
    assert PROGRESS.search(line) and "400 tok/s" in line and "ETA 4m36s" in line  # 92 steps x 3 s


def test_matmul_count_leaves_out_the_input_embedding_and_counts_a_tied_head(embedded_data, tmp_path):
    for tied in (False, True):
        cfg = tiny_config(embedded_data, tmp_path).model
        cfg.vocab_size, cfg.tie_embeddings = 512, tied
        model = GemmaLM(cfg)
        matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
        head = cfg.vocab_size * cfg.n_embd if tied else 0  # the tied matrix is listed once, as the embedding
        attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * 32
        assert matmul_flops_per_token(cfg, 32) == 6 * (matrices + head) + attention
        assert flops_per_token(cfg, model.num_params(), 32) - matmul_flops_per_token(cfg, 32) == \
            6 * (model.num_params() - matrices - head)  # the embedding (a lookup) and the norm gains


def tiny_run(embedded_data, tmp_path, **train_keys):
    cfg = tiny_config(embedded_data, tmp_path, **train_keys)
    cfg.train.sample_tokens = 0
    return cfg


def test_progress_line_wandb_and_summary_use_interval_figures(embedded_data, tmp_path):
    cfg = tiny_run(embedded_data, tmp_path, max_steps=20, log_interval=5)
    lines = []
    launched = time.time() - 3.0  # as if the command had started 3 s ago
    summary = train(cfg, WorkerEnv(log=lines.append, out_dir=tmp_path / "wandb", launch_time=launched))

    progress = [m for m in map(PROGRESS.search, lines) if m]
    assert [int(m.group(1)) for m in progress] == [5, 10, 15, 20] and {m.group(2) for m in progress} == {"20"}
    first = [line for line in lines if "first step" in line]
    assert len(first) == 1 and 3.0 <= float(re.search(r"first step ([\d.]+) s", first[0]).group(1)) < 60
    assert not any("compil" in line for line in lines)  # train.compile is off
    assert any(re.fullmatch(r"\[raypipe\] MFU against [\d,.]+ [GT]FLOP/s per device \(measured at the start; "
                            r"train.peak_flops fixes it\)", line) for line in lines)

    times, tokens_per_step = summary["step_times_s"], 8 * 32 * 2
    assert summary["compiled_steps"] == [] and summary["compile_s"] == 0.0
    assert summary["tokens_per_sec"] == pytest.approx(20 * tokens_per_step / sum(times))
    assert 3.0 <= summary["startup_s"] < 60 and "20 of 20" in summary["tokens_per_sec_over"]
    assert 0 < summary["mfu"] < 1 and summary["peak_flops"] > 0
    # Each evaluation's tokens/s is over the steps since the progress line before it (5 steps), not since the start.
    for h in summary["history"]:
        interval = times[h["step"] - 5:h["step"]]
        assert h["tokens_per_sec"] == pytest.approx(5 * tokens_per_step / sum(interval))
        assert h["mfu"] == pytest.approx(h["tokens_per_sec"] * summary["flops_per_token"] / summary["peak_flops"])

    (wandb_run,) = offline_runs(str(tmp_path / "wandb"))
    logged = {row["_step"]: row for row in read_history(wandb_run) if "tokens_per_sec" in row}
    assert sorted(logged) == [5, 10, 15, 20]
    for step, row in logged.items():
        assert row["tokens_per_sec"] == pytest.approx(5 * tokens_per_step / sum(times[step - 5:step]))
        assert 0 < row["mfu"] < 1


def test_reporting_leaves_the_loss_curve_bit_identical(embedded_data, tmp_path):
    curves = []
    for log_interval in (1, 1000):  # a report (figures, peak measured, W&B) after every step, or none
        cfg = tiny_run(embedded_data, tmp_path / str(log_interval), max_steps=12, log_interval=log_interval)
        cfg.wandb.mode = "disabled"
        step_losses = []
        summary = train(cfg, WorkerEnv(log=lambda _: None,
                                       report=lambda m, c, seen=step_losses: c and seen.append(load_state(c)["step_losses"])))
        curves.append((step_losses[-1], [(h["train_loss"], h["val_loss"], h["grad_norm"]) for h in summary["history"]]))
    assert len(curves[0][0]) == 12 and curves[0] == curves[1]  # every step's loss, exactly


def test_the_heap_is_frozen_while_training_and_released_after(embedded_data, tmp_path):
    import gc

    cfg = tiny_run(embedded_data, tmp_path, max_steps=4, log_interval=2)
    cfg.wandb.mode = "disabled"
    assert gc.get_freeze_count() == 0
    frozen = []
    train(cfg, WorkerEnv(log=lambda _: None, report=lambda metrics, checkpoint: frozen.append(gc.get_freeze_count())))
    # torch, the model and the loop's objects: out of the collector's full passes while steps run
    assert frozen and all(count > 10_000 for count in frozen)
    assert gc.get_freeze_count() == 0  # handed back to the collector when train() returns


def test_a_given_peak_is_what_mfu_divides_by(embedded_data, tmp_path):
    cfg = tiny_run(embedded_data, tmp_path, max_steps=4, log_interval=2, peak_flops=3e9)
    cfg.wandb.mode = "disabled"
    lines = []
    summary = train(cfg, WorkerEnv(log=lines.append))
    assert "[raypipe] MFU against 3 GFLOP/s per device (train.peak_flops)" in lines
    assert summary["peak_flops"] == 3e9
    assert summary["mfu"] == pytest.approx(summary["tokens_per_sec"] * summary["flops_per_token"] / 3e9)
    for h in summary["history"]:
        assert h["mfu"] == pytest.approx(h["tokens_per_sec"] * summary["flops_per_token"] / 3e9)
    for bad in ("0", "-1e12", ".nan", ".inf"):
        with pytest.raises(ConfigError, match=r"'train.peak_flops' = .*: must be a finite number"):
            load_config(None, [f"train.peak_flops={bad}"])


def test_profile_traces_the_chosen_steps_and_leaves_the_run_alone(embedded_data, tmp_path):
    curves = []
    for profile_from in (None, 3):
        cfg = tiny_run(embedded_data, tmp_path / str(profile_from), max_steps=6, log_interval=3,
                       profile_from=profile_from, profile_steps=2)
        cfg.wandb.mode = "disabled"
        lines = []
        summary = train(cfg, WorkerEnv(log=lines.append, out_dir=tmp_path / str(profile_from) / "out"))
        curves.append([(h["train_loss"], h["val_loss"], h["grad_norm"]) for h in summary["history"]])
    (line,) = [line for line in lines if "profile of steps" in line]
    assert "profile of steps 3-4: 2 step(s), per step: window" in line and "longest: " in line
    trace = tmp_path / "3" / "out" / "profile-steps-3-4-rank0.json.gz"
    assert line.endswith(f"trace {trace}")
    with gzip.open(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert any("aten::mm" in n or "aten::addmm" in n for n in names)  # the steps' matmuls were recorded
    assert curves[0] == curves[1]  # tracing changes nothing the run computes
    # The traced steps (slowed by the profiler, and by its synchronizes) are timed but left out of the figures.
    times, tokens_per_step = summary["step_times_s"], 8 * 32 * 2
    assert summary["traced_steps"] == [3, 4] and "4 of 6" in summary["tokens_per_sec_over"]
    assert summary["tokens_per_sec"] == pytest.approx(4 * tokens_per_step / (sum(times) - times[2] - times[3]))
    assert [re.search(r"\| (\d) traced step\(s\) left out", line).group(1) for line in lines
            if PROGRESS.search(line)] == ["1", "1"]


def test_profile_window_past_the_session_is_said(embedded_data, tmp_path):
    cfg = tiny_run(embedded_data, tmp_path, max_steps=4, stop_at=2, profile_from=3)
    cfg.wandb.mode = "disabled"
    lines = []
    train(cfg, WorkerEnv(log=lines.append, out_dir=tmp_path / "out"))
    assert any("train.profile_from 3 is outside this session's steps 1-2: nothing is traced" in line for line in lines)
    assert not list((tmp_path / "out").glob("profile-*"))
    with pytest.raises(ConfigError, match=r"'train.profile_from' = 0: must be between 1 and train.max_steps \(4\)"):
        load_config(None, ["train.max_steps=4", "train.profile_from=0"])


@pytest.mark.slow
def test_compiling_steps_are_announced_timed_and_left_out(embedded_data, tmp_path):
    cfg = tiny_run(embedded_data, tmp_path, max_steps=6, eval_interval=6, log_interval=3, eval_batches=1, compile=True)
    cfg.model.n_layer, cfg.model.global_every, cfg.wandb.mode = 1, 1, "disabled"
    torch._dynamo.reset()
    lines = []
    # Inductor's caches off: a compile earlier in the same process must not make this one near-instant.
    with torch._inductor.config.patch(force_disable_caches=True):
        summary = train(cfg, WorkerEnv(log=lines.append))
    torch._dynamo.reset()
    start = lines.index("[raypipe] compiling the model (torch.compile) ...")
    done = [line for line in lines if line.startswith("[raypipe] compiled in ")]
    assert len(done) >= 1 and lines.index(done[0]) > start
    assert summary["compiled_steps"][0] == 1 and 1 not in summary["compiled_steps"][1:]
    assert summary["compile_s"] > 0.5
    assert summary["compile_s"] == pytest.approx(sum(float(line.split()[3]) for line in done), abs=0.05 * len(done))
    times = summary["step_times_s"]
    assert times[0] > summary["compile_s"] * 0.9  # the first step holds the compilation
    kept = [t for i, t in enumerate(times) if i + 1 not in summary["compiled_steps"]]
    assert summary["tokens_per_sec"] == pytest.approx(len(kept) * 8 * 32 * 2 / sum(kept))
    first_progress = next(line for line in lines if PROGRESS.search(line))
    assert "compiling step(s) left out" in first_progress


def test_compile_cache_defaults_to_a_node_directory_and_keeps_the_users_own(monkeypatch, tmp_path):
    for key in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", COMPILE_CACHE_ENV):
        monkeypatch.delenv(key, raising=False)
    default = Path(tempfile.gettempdir()) / "raypipe-compile-cache"
    assert compile_cache_env() == {"TORCHINDUCTOR_CACHE_DIR": str(default / "inductor"),
                                   "TRITON_CACHE_DIR": str(default / "triton")}
    monkeypatch.setenv(COMPILE_CACHE_ENV, str(tmp_path / "node"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_env() == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "mine"),
                                   "TRITON_CACHE_DIR": str(tmp_path / "node" / "triton")}
    assert worker_env_vars()["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")  # passed on to Ray's workers


def test_ray_run_summary_console_and_compile_cache(ray_cluster, embedded_data, tmp_path, capfd):
    from raypipe.train import main

    cfg = tiny_run(embedded_data, tmp_path / "runs", max_steps=20, log_interval=5)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    # The test session's Ray workers have the environment that Ray was started with: its setting, else the
    # default (not this process's now: a compilation here may have set the variable since).
    env = RAY_ENVIRON
    expected = env.get("TORCHINDUCTOR_CACHE_DIR") or str(
        Path(env.get(COMPILE_CACHE_ENV) or Path(tempfile.gettempdir()) / "raypipe-compile-cache") / "inductor")
    assert main(["--config", str(config_file), "--name", "live"]) == 0
    summary = json.loads((tmp_path / "runs" / "live" / "summary.json").read_text())
    assert 0 < summary["startup_s"] < summary["wall_time_s"] and summary["compile_s"] == 0.0
    phases = summary["startup_phases_s"]  # where the start-up went, in order
    assert list(phases) == ["Ray ready", "worker started"]
    assert 0 < phases["Ray ready"] < phases["worker started"] < summary["startup_s"]
    assert summary["tokens_per_sec"] > 0 and 0 < summary["mfu"] < 1
    assert summary["compile_cache_dir"] == expected

    out, deadline = "", time.time() + 30  # worker lines reach the driver through Ray's log monitor
    while time.time() < deadline:
        out += "".join(capfd.readouterr())
        if len(set(m.group(1) for m in PROGRESS.finditer(out))) == 4:
            break
        time.sleep(0.5)
    assert sorted({int(m.group(1)) for m in PROGRESS.finditer(out)}) == [5, 10, 15, 20]
    assert re.search(r"first step [\d.]+ s after launch \(Ray ready at [\d.]+ s, worker started at [\d.]+ s\)", out)
    assert "Reporting training result" not in out and "Checkpoint successfully created" not in out


def test_ray_started_here_is_told_and_its_autoscaling_coordinator_is_up(ray_cluster):
    import ray

    from raypipe.driver import prestart_autoscaling_coordinator, started_local_ray

    assert started_local_ray()  # the session fixture's ray.init started it in this process
    prestart_autoscaling_coordinator()
    coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    ray.get(coordinator.__ray_ready__.remote(), timeout=60)  # the actor Ray Train's controller asks first
    prestart_autoscaling_coordinator()  # a second launch on the same Ray finds it
    assert ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")._actor_id == coordinator._actor_id


def test_bench_reports_both_mfu_counts(embedded_data, tmp_path, capsys):
    from raypipe.bench import main as bench_main

    cfg = tiny_config(embedded_data, tmp_path / "unused")
    config_file, out = tmp_path / "tiny.yaml", tmp_path / "bench.json"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    argv = ["--config", str(config_file), "--data", str(embedded_data), "--steps", "2", "--warmup", "1", "--json", str(out)]
    assert bench_main(argv) == 0
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    cfg.model.vocab_size = 512
    nanogpt = flops_per_token(cfg.model, GemmaLM(cfg.model).num_params(), 32)
    assert row["mfu_matmul"] / row["mfu"] == pytest.approx(matmul_flops_per_token(cfg.model, 32) / nanogpt)
    assert row["mfu"] == pytest.approx(row["tokens_per_s"] * nanogpt / report["peak_flops"])
    assert set(report["mfu_counts"]) == {"mfu", "mfu_matmul"}
    printed = capsys.readouterr().out
    assert "| MFU nanoGPT | MFU matmul |" in printed and f"| {row['mfu']:.1%} | {row['mfu_matmul']:.1%} |" in printed


def test_bench_keeps_the_traces_and_leaves_the_traced_steps_out(embedded_data, tmp_path, capsys):
    from raypipe.bench import main as bench_main

    cfg = tiny_config(embedded_data, tmp_path / "unused")
    config_file, out = tmp_path / "tiny.yaml", tmp_path / "bench.json"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    argv = ["--config", str(config_file), "--data", str(embedded_data), "--steps", "4", "--warmup", "1", "--json", str(out),
            "--set", "train.profile_from=3", "--set", "train.profile_steps=2"]
    assert bench_main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["steps"] == 2  # steps 2-5 timed, 3 and 4 traced
    assert [p.name for p in (tmp_path / "bench-traces").iterdir()] == ["bare-loop-1-profile-steps-3-4-rank0.json.gz"]
    assert f"traces: {tmp_path / 'bench-traces'}/bare-loop-1-*" in capsys.readouterr().out


def test_launch_is_the_process_start():
    """What `python -m raypipe.train` counts start-up from: when its process started, not when it got going."""
    import subprocess
    import sys

    code = ("import time; now = time.time(); import torch; from raypipe.driver import process_start_time; "
            "print(now - process_start_time())")
    before_first_line = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0 < before_first_line < 5  # the interpreter's own start, before the script's first line
