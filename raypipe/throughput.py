"""Live training figures a user can trust: which steps compiled, throughput and MFU over each
interval between reports (compiling steps left out), and the time from launch to the first step.

Compilation is seen through Dynamo's own compile callbacks (`torch._dynamo.callback`, in torch
2.11 and 2.13): they fire around every compilation, whatever starts it (the first training step,
a recompilation, an evaluation's first forward in another grad mode, a lazily compiled backward).
Ray is not imported here.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch


def measure_peak_flops(device: torch.device) -> float:
    """Dense matmul FLOP/s of this device, measured once per process: bf16 8192^3 on a GPU, fp32
    1024^3 on a CPU, the best of 3 short bursts (a process's first matmuls on a CPU ran up to 19% slow
    while its threads start). Its own random generator: the run's random stream is left as it was."""
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one device, measured once
        device = torch.device("cuda", torch.cuda.current_device())
    return _measure_peak_flops(device)


@functools.cache
def _measure_peak_flops(device: torch.device) -> float:
    cuda = device.type == "cuda"
    n, dtype, iters = (8192, torch.bfloat16, 30) if cuda else (1024, torch.float32, 10)
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=generator) for _ in range(2))
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * iters / best


def format_flops(flops_per_s: float) -> str:
    """783.7 TFLOP/s on a GPU, 316 GFLOP/s on a CPU."""
    return f"{flops_per_s / 1e12:,.1f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:,.0f} GFLOP/s"


class CompileWatch:
    """Counts Dynamo's compilations and adds up their time while installed (`with watch:`).

    Prints `compiling the model (torch.compile) ...` when a compilation starts and, once the step
    or evaluation that compiled is over (`settle`), `compiled in N s` with the compile time it took
    (a forward and its lazily compiled backward are one line)."""

    def __init__(self, log: Callable[[str], None], clock: Callable[[], float] = time.perf_counter):
        self.log, self.clock = log, clock
        self.count, self.seconds = 0, 0.0  # compilations seen, their total time
        self._started: Optional[float] = None
        self._depth = 0
        self._pending: Optional[float] = None  # compile time not yet reported by settle()

    def _start(self, *_args) -> None:  # torch 2.13 passes CallbackArgs; older versions nothing
        self.count += 1
        self._depth += 1
        if self._depth == 1:  # versions without a pending counter may nest start/end pairs
            self._started = self.clock()
        if self._pending is None:
            self._pending = 0.0
            self.log("[raypipe] compiling the model (torch.compile) ...")

    def _end(self, *_args) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0 and self._started is not None:
            took, self._started = self.clock() - self._started, None
            self.seconds += took
            self._pending = (self._pending or 0.0) + took

    def settle(self) -> None:
        """Say how long the compilations since the last call took, if there were any."""
        if self._pending is not None:
            self.log(f"[raypipe] compiled in {self._pending:.1f} s")
            self._pending = None

    def __enter__(self) -> "CompileWatch":
        from torch._dynamo.callback import callback_handler

        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)
        return self

    def __exit__(self, *exc) -> None:
        from torch._dynamo.callback import callback_handler

        callback_handler.remove_start_callback(self._start)
        callback_handler.remove_end_callback(self._end)


@dataclass
class Figures:
    """Throughput over some optimizer steps of this session, compiling (and traced) steps left out."""

    steps: int  # steps timed
    compiled: int  # steps left out because they compiled
    seconds: float  # their wall time, summed
    data_wait_s: float  # host time they waited for batches
    tokens_per_sec: Optional[float]
    mfu: Optional[float]  # nanoGPT's count of FLOPs per token against the peak (measured, or train.peak_flops)
    traced: int = 0  # steps left out because the profiler traced them (train.profile_from)

    def speed(self) -> str:
        """Tokens/s for a console line ("- tok/s" when no step was timed)."""
        return f"{self.tokens_per_sec:,.0f} tok/s" if self.tokens_per_sec else "- tok/s"

    def as_metrics(self) -> dict:
        return {"tokens_per_sec": self.tokens_per_sec, "mfu": self.mfu,
                "data_wait_frac": self.data_wait_s / self.seconds if self.seconds else None}


class StepClock:
    """Time of each optimizer step of this session, the host time it waited for batches, and whether
    it compiled. `interval()` gives the figures since its last call; `steady()` over every step that
    did not compile. `now` is the clock (a test may pass its own).

    On a GPU the host queues steps ahead of the GPU, so a step's time is the GPU's: between CUDA events
    at the ends of consecutive steps (the GPU's idle time between them included), read once a step
    with `sync` (or one that compiled) is over. On a CPU it is the host's wall time."""

    def __init__(self, batches, watch: Optional[CompileWatch] = None, tokens_per_step: int = 0,
                 flops_per_token: float = 0.0, peak: Callable[[], Optional[float]] = lambda: None,
                 devices: int = 1, now: Callable[[], float] = time.perf_counter):
        self.batches, self.watch, self.now = batches, watch, now
        self.tokens_per_step, self.flops_per_token, self.peak, self.devices = tokens_per_step, flops_per_token, peak, devices
        self.start = now()
        self.step_times: list[float] = []
        self.data_waits: list[float] = []
        self.compiled: list[bool] = []
        self.traced: list[bool] = []  # under the profiler, which slows them (train.profile_from)
        self._mark, self._mark_time = 0, self.start  # where the current interval began
        self._unread: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []  # GPU steps not yet timed
        self._last_end: Optional[torch.cuda.Event] = None  # the end of the step before, while unread

    @contextlib.contextmanager
    def step(self, device: torch.device, sync: bool = True, traced: bool = False):
        """Time the step run inside; `sync`: wait for the GPU to finish it (and read every step's time);
        `traced`: a profiled step, timed but left out of the figures."""
        cuda = device.type == "cuda"
        begin = self._last_end
        if cuda and begin is None:  # after a sync (or at the start) the GPU's step starts here
            begin = _recorded_event(device)
        start, waited = self.now(), self.batches.seconds
        compiles = self.watch.count if self.watch is not None else 0
        yield
        compiled = self.watch is not None and self.watch.count != compiles
        self.step_times.append(self.now() - start)  # the host's; on a GPU replaced by the GPU's when read
        self.data_waits.append(self.batches.seconds - waited)
        self.compiled.append(compiled)
        self.traced.append(traced)
        if cuda:
            self._last_end = _recorded_event(device)
            self._unread.append((len(self.step_times) - 1, begin, self._last_end))
            if sync or compiled:
                self._last_end.synchronize()
                for i, first, last in self._unread:
                    self.step_times[i] = first.elapsed_time(last) / 1000
                self._unread, self._last_end = [], None
        if self.watch is not None:
            self.watch.settle()

    def figures(self, first: int, last: int) -> Figures:
        """Figures over steps [first, last) of this session, those that compiled or were traced left out."""
        kept = [i for i in range(first, last) if not (self.compiled[i] or self.traced[i])]
        seconds = sum(self.step_times[i] for i in kept)
        tokens_per_sec = len(kept) * self.tokens_per_step / seconds if kept and seconds > 0 else None
        peak = self.peak() if tokens_per_sec else None
        mfu = tokens_per_sec * self.flops_per_token / (self.devices * peak) if peak else None
        compiled = sum(self.compiled[first:last])
        return Figures(steps=len(kept), compiled=compiled, seconds=seconds, traced=last - first - len(kept) - compiled,
                       data_wait_s=sum(self.data_waits[i] for i in kept), tokens_per_sec=tokens_per_sec, mfu=mfu)

    def interval(self) -> tuple[Figures, Optional[float]]:
        """(figures since the last call, wall seconds per step over it): the wall time, evaluations
        and checkpoints included, compiling steps not, for an estimate of the time left."""
        now, first, last = self.now(), self._mark, len(self.step_times)
        figures = self.figures(first, last)
        wall = now - self._mark_time - sum(t for t, c in zip(self.step_times[first:], self.compiled[first:]) if c)
        self._mark, self._mark_time = last, now
        return figures, (wall / figures.steps if figures.steps else None)

    def steady(self) -> Figures:
        return self.figures(0, len(self.step_times))

    def compiled_steps(self, first_step: int) -> list[int]:
        return [first_step + i for i, c in enumerate(self.compiled) if c]

    def traced_steps(self, first_step: int) -> list[int]:
        return [first_step + i for i, t in enumerate(self.traced) if t]


def _recorded_event(device: torch.device) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


def progress_line(step: int, max_steps: int, loss: float, lr: float, figures: Figures,
                  seconds_per_step: Optional[float], last_step: int) -> str:
    """nanoGPT's per-interval line: step, loss, tokens/s and MFU over the interval, time left."""
    mfu = f"MFU {figures.mfu:.1%}" if figures.mfu is not None else "MFU -"
    eta = format_duration((last_step - step) * seconds_per_step) if seconds_per_step is not None else "-"
    left_out = (f" | {figures.compiled} compiling step(s) left out" if figures.compiled else "") + \
        (f" | {figures.traced} traced step(s) left out" if figures.traced else "")
    return (f"[raypipe] step {step:>6}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | {figures.speed()} | {mfu} | "
            f"ETA {eta}{left_out}")


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
