"""`python -m raypipe.sweep sweeps/lr.yaml [--resume]`: Ray Tune over the Ray Train trainer.

Each trial is a whole `raypipe.train` run (a TorchTrainer under a Tune function trainable, the
Train V2 pattern, metrics passed up by `TuneReportCallback`), kept where a run keeps its outputs:
`<storage>/<sweep>/runs/<trial id>/`. ASHA compares trials at the same optimizer step (`step`, not
Tune's `training_iteration`, which restarts when a sweep is resumed). At the end the sweep writes
`results.csv`, `best_config.yaml` and PNG plots into `<storage>/<sweep>/`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from .checkpoint import checkpoint_name, latest_checkpoint, load_state
from .config import ConfigError
from .errors import UserError
from .sweepspec import SweepSpec, load_sweep, trial_config


def make_trainable(spec: SweepSpec):
    """The Tune function trainable: one `raypipe.train` run with a TuneReportCallback."""
    from ray import tune

    def run_trial(params: dict) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        from .driver import run

        cfg = trial_config(spec, params, tune.get_context().get_trial_id())
        run(cfg, callbacks=[TuneReportCallback()])

    # The trial itself only drives a TorchTrainer, whose workers hold the CPUs/GPUs; Tune refuses
    # an empty request, so the driver asks for a sliver of a CPU.
    return tune.with_resources(run_trial, {"CPU": 0.01})


def param_space(spec: SweepSpec) -> dict:
    from ray import tune

    make = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
            "choice": tune.choice, "grid": tune.grid_search}
    return {key: make[kind](args) for key, domain in spec.search.items() for kind, args in domain.items()}


def tune_config(spec: SweepSpec):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    s = spec.scheduler
    # max_t one past the last step: a trial that reaches the end finishes by itself (and writes its
    # summary) instead of being stopped by ASHA at its final report.
    scheduler = (ASHAScheduler(time_attr="step", max_t=spec.base.train.max_steps + 1, grace_period=s.get("grace_period", 1),
                               reduction_factor=s.get("reduction_factor", 2), brackets=s.get("brackets", 1))
                 if s["type"] == "asha" else FIFOScheduler())
    # random and grid; Tune ignores max_concurrent_trials for this generator, it takes its own limit
    search_alg = BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent_trials or 0)
    max_concurrent = None
    if spec.search_alg == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise ConfigError(f"{spec.source}: search_alg optuna needs `pip install optuna`") from None
        search_alg, max_concurrent = OptunaSearch(seed=spec.seed), spec.max_concurrent_trials
    return tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler, search_alg=search_alg,
                           num_samples=spec.num_samples, max_concurrent_trials=max_concurrent)


def run_sweep(spec: SweepSpec, resume: bool = False) -> list[dict]:
    from ray import tune

    from .driver import check_data, check_wandb_login, init_ray

    check_wandb_login(spec.base)
    check_data(spec.base)  # once, before any trial: every trial reads the same data
    init_ray(spec.base)
    trainable = make_trainable(spec)
    if resume:
        if not tune.Tuner.can_restore(spec.dir):
            raise ConfigError(f"--resume: no sweep to resume at {spec.dir}")
        tuner = tune.Tuner.restore(spec.dir, trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space(spec))
    else:
        tuner = tune.Tuner(trainable, param_space=param_space(spec), tune_config=tune_config(spec),
                           run_config=tune.RunConfig(name=spec.name, storage_path=spec.storage_path,
                                                     failure_config=tune.FailureConfig(max_failures=0)))
    grid = tuner.fit()
    rows = collect_results(spec, grid)
    write_outputs(spec, rows)
    return rows


# --- outputs -----------------------------------------------------------------------------------------


def collect_results(spec: SweepSpec, grid) -> list[dict]:
    """One row per trial, from each trial run's own files (summary.json, else its last checkpoint)."""
    rows = [_row(spec, dict(result.config), result) for result in grid]
    rows.sort(key=lambda r: (math.isnan(r["best_val_loss"]), r["best_val_loss"]))
    return rows


def _row(spec: SweepSpec, params: dict, result) -> dict:
    trial_id = (result.metrics or {}).get("trial_id")
    run_dir = Path(spec.dir) / "runs" / str(trial_id)
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        best_ckpt, early = summary["best_checkpoint"], False
    else:  # stopped by the scheduler: its last checkpoint holds the history it got to
        last = latest_checkpoint(run_dir)
        # Up to the last step Tune recorded: the trial's workers stop a moment after Tune has decided
        # (and `fit()` has returned), and may write a checkpoint or two that no scheduler decision saw.
        reached = (result.metrics or {}).get("step", math.inf)
        history = [h for h in load_state(last)["history"] if h["step"] <= reached] if last else []
        best = min(history, key=lambda h: h["val_loss"], default=None)
        best_ckpt = str(run_dir / checkpoint_name(best["step"])) if best else None
        early = bool(history) and history[-1]["step"] < spec.base.train.max_steps
    derived = {key: params[rule["of"]] * rule["factor"] for key, rule in spec.tie.items()}
    vals = [h["val_loss"] for h in history]
    return {"trial_id": trial_id, **params, **derived,
            "best_val_loss": min(vals) if vals else float("nan"),
            "final_val_loss": vals[-1] if vals else float("nan"),
            "steps": history[-1]["step"] if history else 0, "stopped_early": early,
            "status": "ERROR" if result.error else "TERMINATED", "best_checkpoint": best_ckpt,
            "run_dir": str(run_dir), "history": history}


def write_outputs(spec: SweepSpec, rows: list[dict]) -> None:
    out = Path(spec.dir)
    columns = [c for c in rows[0] if c != "history"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    best = rows[0]
    if not best["history"]:  # rows are sorted best first: no trial got as far as an evaluation
        print(f"[raypipe] sweep {spec.name}: no trial reported a val_loss; see {out / 'results.csv'} "
              "and the trials' logs", file=sys.stderr)
        return
    best_cfg = trial_config(spec, {k: best[k] for k in spec.search}, "best")
    best_cfg.ray.name, best_cfg.ray.storage_path, best_cfg.wandb.group = None, spec.base.ray.storage_path, None
    (out / "best_config.yaml").write_text(
        f"# Best trial of sweep {spec.name} ({spec.source}): {best['trial_id']}, best val_loss "
        f"{best['best_val_loss']:.4f} at step {min(best['history'], key=lambda h: h['val_loss'])['step']}.\n"
        f"# Run it: python -m raypipe.train --config {out / 'best_config.yaml'}\n"
        + yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
    plot(spec, rows, out)
    print_table(spec, rows)


def plot(spec: SweepSpec, rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key in spec.search:
        fig, ax = plt.subplots(figsize=(6, 4))
        for stopped, marker, label in ((False, "o", "ran to the end"), (True, "x", "stopped early")):
            pts = [(r[key], r["best_val_loss"]) for r in rows if r["stopped_early"] == stopped]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=label)
        if "loguniform" in spec.search[key]:
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel="best val_loss", title=f"{spec.name}: val_loss against {key}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"val_loss_vs_{key.replace('.', '_')}.png", dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        label = ", ".join(f"{k.split('.')[-1]}={r[k]:.3g}" if isinstance(r[k], float) else f"{k.split('.')[-1]}={r[k]}"
                          for k in spec.search)
        ax.plot([h["step"] for h in r["history"]], [h["val_loss"] for h in r["history"]], marker=".", label=label)
    ax.set(xlabel="optimizer step", ylabel="val_loss", title=f"{spec.name}: val_loss curves")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "val_loss_curves.png", dpi=100)
    plt.close(fig)


def print_table(spec: SweepSpec, rows: list[dict]) -> None:
    keys = list(spec.search) + list(spec.tie)
    print(f"\n[raypipe] sweep {spec.name}: {len(rows)} trials, best first")
    print("  ".join(f"{k:>22}" for k in keys) + f"  {'best val_loss':>13}  {'steps':>6}  early")
    for r in rows:
        print("  ".join(f"{r[k]:>22.4g}" if isinstance(r[k], float) else f"{r[k]!s:>22}" for k in keys)
              + f"  {r['best_val_loss']:>13.4f}  {r['steps']:>6}  {'yes' if r['stopped_early'] else 'no'}")
    print(f"[raypipe] results.csv, best_config.yaml and plots in {spec.dir}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raypipe.sweep", description=__doc__.split("\n")[0])
    p.add_argument("sweep", help="sweep file, e.g. sweeps/lr.yaml")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this file")
    p.add_argument("--storage-path", help="overrides the sweep's storage_path")
    args = p.parse_args(argv)
    try:
        spec = load_sweep(args.sweep)
        if args.storage_path is not None:
            if not args.storage_path.strip() or "\0" in args.storage_path:
                raise ConfigError(f"--storage-path {args.storage_path!r}: expected a non-empty path")
            spec.storage_path = args.storage_path
        if "://" in spec.storage_path:  # the results table is read and written with local file I/O
            raise ConfigError(f"{spec.source}: storage_path {spec.storage_path}: a sweep needs a local or shared "
                              "filesystem path (e.g. an NFS/EFS mount on every node), not a URI")
        spec.storage_path = str(Path(spec.storage_path).expanduser().resolve())
        if "://" not in spec.base.data.dir:  # a URI is copied to each node's cache (raypipe/staging.py)
            spec.base.data.dir = str(Path(spec.base.data.dir).expanduser().resolve())
        start = time.perf_counter()
        rows = run_sweep(spec, resume=args.resume)
        print(f"[raypipe] sweep wall time {time.perf_counter() - start:.0f}s")
        failed = [r["trial_id"] for r in rows if r["status"] == "ERROR"]
        if failed:
            print(f"[raypipe] {len(failed)} trial(s) failed: {', '.join(map(str, failed))}", file=sys.stderr)
            return 1 if len(failed) == len(rows) else 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
