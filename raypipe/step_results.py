"""Each optimizer step's loss and gradient norm, kept on the device until the host needs them.

Reading a GPU value on the host (`.item()`, `float()`) waits for every kernel queued before it; the
GPU then idles while the host queues the clip, the update and the next step's first kernels (about
5 ms of a 310 ms step on an H100, BENCHMARKS.md). So a step's figures stay on the device, a
non-finite step's update is skipped there (`optim.step_unless`), and the host reads step N's figures
once step N+1 is queued, or at once on a step that reports. On a GPU the figures are copied into pinned
host memory as the step ends, and the host waits for that copy's event: reading them with a `.tolist()`
at settle time would queue the transfer behind step N+1's kernels and wait for those too, so the GPU ran
dry at every step while the host queued the next one (2 ms a step on two H200s, BENCHMARKS.md). Ray is
not imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import NonFiniteError


@dataclass
class StepResult:
    step: int
    lr: float
    loss: float
    grad_norm: float


class StepResults:
    """The pending steps' (loss, grad norm, skipped) device scalars, read in one transfer by `settle`,
    which appends each loss to `state.step_losses`, counts skipped updates, and stops the run after
    `max_nonfinite_steps` of them in a row."""

    def __init__(self, state, max_nonfinite_steps: int, log: Callable[[str], None]):
        self.state, self.max_nonfinite_steps, self.log = state, max_nonfinite_steps, log
        # (step, lr, [loss, norm, skipped], the copy's event or None), oldest first; on a GPU the figures' host copy
        self.pending: list[tuple[int, float, torch.Tensor, Optional[torch.cuda.Event]]] = []
        self.streak = 0  # non-finite steps in a row
        self.last: Optional[StepResult] = None  # the newest settled step

    def add(self, step: int, lr: float, loss: torch.Tensor, grad_norm: torch.Tensor, skipped: torch.Tensor) -> None:
        figures, copied = torch.stack([loss.float(), grad_norm.float(), skipped.float()]), None
        if figures.is_cuda:  # copied as the step ends, in its place on the stream
            figures, copied = figures.to("cpu", non_blocking=True), torch.cuda.Event()
            copied.record()
        self.pending.append((step, lr, figures, copied))

    def settle(self, keep_newest: bool = False) -> Optional[StepResult]:
        """Read the pending steps, oldest first (with `keep_newest`, all but the one added last: reading
        it would wait for the GPU to finish it); return the newest settled step."""
        todo = self.pending[:-1] if keep_newest else self.pending
        if not todo:
            return self.last
        self.pending = self.pending[len(todo):]
        for *_, copied in todo:
            if copied is not None:
                copied.synchronize()  # the end of that step, not of everything queued since
        values = [figures.tolist() for _, _, figures, _ in todo]
        for (step, lr, _, _), (loss, grad_norm, skipped) in zip(todo, values):
            self.state.step_losses.append(loss)
            self.last = StepResult(step, lr, loss, grad_norm)
            if not skipped:
                self.streak = 0
                continue
            self.state.skipped_steps += 1
            self.streak += 1
            self.log(f"[raypipe] step {step}: non-finite loss {loss} / grad norm {grad_norm}: update skipped")
            if self.streak >= self.max_nonfinite_steps:
                history = self.state.history
                raise NonFiniteError(f"{self.streak} optimizer steps in a row had a non-finite loss or "
                                     f"gradient norm (last: step {step}); the last checkpoint "
                                     f"(step {history[-1]['step'] if history else 'none'}) is intact. "
                                     "Lower train.learning_rate or train.grad_clip, or check the data.")
        return self.last
