"""`train.profile_from`: a torch.profiler trace of a few optimizer steps, one Chrome trace per rank.

On a GPU only the device's activity is recorded (kernels, copies, memsets). Recording every host-side
operation as well slows the host until it falls behind the GPU, and the trace then shows gaps that an
unprofiled step does not have (BENCHMARKS.md, "Where the GPU waits in a step"). The traced window starts and
ends with a synchronize, so the throughput figures leave its steps out (`StepClock`'s `traced`).
Open the file in https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of [start, end) intervals, as sorted disjoint intervals."""
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def covered(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in merged(intervals))


def overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Time covered by both sets of intervals."""
    return covered(a) + covered(b) - covered(a + b)


def summary(events, steps: int, device_type: str) -> str:
    """One line: per step, the window, the time something ran, and what ran (kernels, copies) on the device."""
    kind = torch.autograd.DeviceType.CUDA if device_type == "cuda" else torch.autograd.DeviceType.CPU
    spans = [(e.name, e.time_range.start, e.time_range.end) for e in events
             if e.device_type == kind and e.time_range.end > e.time_range.start]
    if not spans:
        return "nothing recorded"
    copies = [(s, e) for name, s, e in spans if name.startswith("Memcpy")]
    kernels = [(s, e) for name, s, e in spans if not name.startswith("Memcpy")]
    window = max(e for _, _, e in spans) - min(s for _, s, _ in spans)
    busy = covered(copies + kernels)
    per_step = lambda us: f"{us / 1e3 / steps:.2f} ms"  # noqa: E731
    parts = [f"{steps} step(s), per step: window {per_step(window)}", f"busy {per_step(busy)}",
             f"idle {per_step(window - busy)}"]
    if device_type == "cuda":
        parts += [f"kernels {per_step(covered(kernels))}", f"copies {per_step(covered(copies))}",
                  f"copies beside kernels {per_step(overlap(copies, kernels))}"]
    totals: dict[str, float] = {}
    for name, s, e in spans:
        totals[name] = totals.get(name, 0.0) + e - s
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:3]
    parts.append("longest: " + ", ".join(f"{name[:50]} {per_step(us)}" for name, us in top))
    return " | ".join(parts)


def _barrier(device: torch.device) -> None:
    """The ranks meet, host and device: an NCCL barrier alone only makes the GPU's stream wait."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)


class StepProfiler:
    """Traces optimizer steps first .. first + count - 1 into `directory`, those of this session's `steps`
    (first, last); none when `first` is None or outside them (e.g. a resume past it), which is said."""

    def __init__(self, first: Optional[int], count: int, steps: tuple[int, int], directory: Path, rank: int,
                 device: torch.device, log: Callable[[str], None]):
        if first is not None and not steps[0] <= first <= steps[1]:
            log(f"[raypipe] train.profile_from {first} is outside this session's steps {steps[0]}-{steps[1]}: "
                "nothing is traced")
            first = None
        self.first, self.last = first, (min(first + count, steps[1] + 1) - 1) if first is not None else None
        self.path = directory / f"profile-steps-{first}-{self.last}-rank{rank}.json.gz"
        self.device, self.log, self.profiler = device, log, None

    def covers(self, step: int) -> bool:
        return self.first is not None and self.first <= step <= self.last

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def step(self, step: int):
        if step == self.first:
            self._sync()
            activity = ProfilerActivity.CUDA if self.device.type == "cuda" else ProfilerActivity.CPU
            self.profiler = torch.profiler.profile(activities=[activity])
            self.profiler.start()
            _barrier(self.device)  # the ranks' profilers take their own time to start: the first step's collectives would wait
        yield
        if step == self.last and self.profiler is not None:
            self._sync()
            self.profiler.stop()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.profiler.export_chrome_trace(str(self.path))
            _barrier(self.device)  # nor may one rank's export be timed as another's next step
            self.log(f"[raypipe] profile of steps {self.first}-{self.last}: "
                     f"{summary(self.profiler.events(), self.last - self.first + 1, self.device.type)} | "
                     f"trace {self.path}")
            self.profiler = None
