"""Weights & Biases logging from the rank-0 worker (Train V2 refuses Tune's logger callbacks).

`wandb.mode: auto` goes online only when credentials exist (WANDB_API_KEY or a netrc entry),
and offline otherwise, so a fresh machine never blocks on a login prompt.

W&B can lose the last evaluations of an interrupted run. Offline, W&B 0.31's service keeps records in
memory until a 32 KiB block of the transaction log fills or the run finishes, and nothing flushes it
sooner: a killed worker leaves an empty or short `run-<id>.wandb`. Online, what was not yet uploaded
is lost. The checkpoint keeps every evaluation, so a run that goes on from one logs again, first,
those its W&B run does not hold; and a worker that is shut down (Ctrl-C) finishes its run first.
`run.finish()` itself can return before the service has written the file's last block, so `finish()`
here waits, offline, for the run's exit record in the file.
"""

from __future__ import annotations

import glob
import netrc
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Optional

from .config import WandbConfig


def resolve_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        host = (os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").split("://")[-1].split("/")[0]
        if netrc.netrc().authenticators(host):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def _log_records(path: str):
    """The records of one W&B transaction log (`run-<id>.wandb`): a 7-byte header, then LevelDB log
    framing (32 KiB blocks of crc32/length/type chunks). A torn or short tail ends the read."""
    data = Path(path).read_bytes()
    pos, parts = 7, []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's zero trailer
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        payload = data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind == 0 or len(payload) < length or zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            break
        parts.append(payload)
        if kind in (1, 4):  # a whole record, or the last chunk of one
            yield b"".join(parts)
            parts = []


def _records(path: str):
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in _log_records(path):
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def offline_logged_step(wandb_dir: str | Path, run_id: str) -> int:
    """The highest history step that earlier offline segments of W&B run `run_id` wrote to disk
    under `wandb_dir`, or -1. Each segment's file holds a prefix of what it logged, in step order."""
    last = -1
    for path in glob.glob(os.path.join(str(wandb_dir), "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb")):
        for record in _records(path):
            if record.WhichOneof("record_type") == "history":
                last = max([last] + [int(i.value_json) for i in record.history.item
                                     if (i.key or ".".join(i.nested_key)) == "_step"])
    return last


_open: list["Tracker"] = []  # the tracker of this process whose run is open (rank 0 logs, one run at a time)


EXIT_RECORD_WAIT_S = 30.0  # how long finish() waits for an offline run's file to be complete


def wait_for_exit_record(path: str, timeout: float = EXIT_RECORD_WAIT_S) -> bool:
    """Wait until W&B's service has written the run's exit record to its transaction log. Offline,
    `run.finish()` can return before the service writes the file's last block (under load, seconds
    before): a process that exits or is killed right then would leave the last evaluations unwritten."""
    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and any(r.WhichOneof("record_type") == "exit" for r in _records(path))):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def finish_open_run() -> None:
    """Finish this process's open W&B run, if any, from another thread: for a worker that is being shut
    down (Ctrl-C aborts the run, then Ray kills the worker; its training thread never reaches finish())."""
    for tracker in list(_open):
        tracker.finish()


class Tracker:
    """A W&B run, or nothing at all (mode disabled or not rank 0): log() and finish() are no-ops then.

    `history` (the evaluations a resumed checkpoint holds) is logged again, in step order, from
    the first step this W&B run does not hold yet; steps it holds are not logged twice (W&B would
    refuse them with a warning online, and keep a second copy offline)."""

    def __init__(self, cfg: WandbConfig, run_name: str, config: dict, out_dir: str | Path,
                 enabled: bool = True, run_id: Optional[str] = None, history: Optional[list[dict]] = None):
        self.mode = resolve_mode(cfg.mode) if enabled else "disabled"
        self.run, self.run_id = None, None
        self.sample_rows: list[list] = []
        self.held_step = -1  # W&B already holds every step up to this one
        if self.mode == "disabled":
            return
        # The env var, not only init(mode=...): W&B's telemetry otherwise tries the network at exit.
        os.environ["WANDB_MODE"] = self.mode
        os.environ.setdefault("WANDB_SILENT", "true")
        # W&B hands its service's address to child processes (WANDB_SERVICE). A worker that inherited one
        # (Ray started by a process that had used W&B) would keep its run in that service, which outlives a
        # killed worker and refuses the restarted one ("run ID ... is in use"): each process starts its own.
        os.environ.pop("WANDB_SERVICE", None)
        import wandb

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=cfg.group, tags=cfg.tags or None,
            name=run_name, config=config, dir=str(out_dir), mode=self.mode,
            id=run_id, resume="allow" if run_id else None,
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.run_id = self.run.id  # kept after finish(): summaries and checkpoints name the run
        _open.append(self)
        if run_id:  # online, W&B's server says where the run goes on; offline, the earlier files do
            self.held_step = self.run.step - 1 if self.mode == "online" else offline_logged_step(out_dir, run_id)
        for metrics in sorted(history or [], key=lambda h: h["step"]):
            self.log(metrics, step=metrics["step"])

    def log(self, metrics: dict, step: int) -> None:
        run = self.run
        if run and step > self.held_step:
            run.log(metrics, step=step)

    def log_samples(self, step: int, prompt: str, samples: list[str]) -> None:
        """One W&B table with every sample so far (tables are immutable: log the grown one)."""
        run = self.run
        if run and step > self.held_step:
            import wandb

            self.sample_rows += [[step, prompt, text] for text in samples]
            run.log({"samples": wandb.Table(columns=["step", "prompt", "sample"], data=self.sample_rows)}, step=step)

    def finish(self) -> None:
        run, self.run = self.run, None  # once, even when the training thread and a shutdown both call it
        if run:
            if self in _open:
                _open.remove(self)
            log_file = run.settings.sync_file
            run.finish()
            if self.mode == "offline" and not wait_for_exit_record(log_file):
                print(f"[raypipe] W&B: {log_file} has no exit record {EXIT_RECORD_WAIT_S:g} s after the run finished; "
                      "its last records may be missing", flush=True)
