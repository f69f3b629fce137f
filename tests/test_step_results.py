"""A step's figures stay on the device: a non-finite update is skipped there (fused AdamW's found_inf),
the host reads each step's loss and gradient norm a step later (at once on a reporting step), and a GPU
step's time comes from CUDA events."""

import time

import pytest
import torch

from raypipe.loop import RunState, Timed
from raypipe.optim import step_unless
from raypipe.step_results import NonFiniteError, StepResults
from raypipe.throughput import StepClock


def adamw_after_one_step(fused: bool):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1, fused=fused)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    for p in params:
        p.grad = torch.randn_like(p)
    return params, optimizer


def snapshot(params, optimizer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params] + [v.clone() for p in params for v in optimizer.state[p].values()]


@pytest.mark.parametrize("fused", [True, False])
def test_a_skipped_update_changes_nothing_and_a_kept_one_is_the_plain_step(fused):
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    params, optimizer = adamw_after_one_step(fused)
    before = snapshot(params, optimizer)
    step_unless(optimizer, scaler, torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(params, optimizer)))  # moments and step counts too
    assert not hasattr(optimizer, "found_inf")  # a later plain step() is not skipped by a stale flag

    step_unless(optimizer, scaler, torch.tensor(False))
    reference, reference_optimizer = adamw_after_one_step(fused)
    reference_optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(snapshot(reference, reference_optimizer), snapshot(params, optimizer)))


def results_with(max_nonfinite: int = 2):
    state, lines = RunState(world_size=1, run_name="t"), []
    return StepResults(state, max_nonfinite, lines.append), state, lines


def add(results: StepResults, step: int, loss: float, norm: float = 1.0) -> None:
    skipped = not (torch.isfinite(torch.tensor(loss)) and torch.isfinite(torch.tensor(norm)))
    results.add(step, 0.01 * step, torch.tensor(loss), torch.tensor(norm), torch.tensor(skipped))


def test_steps_are_read_in_order_and_the_newest_can_wait():
    results, state, _ = results_with()
    assert results.settle() is None
    add(results, 1, 3.0)
    assert results.settle(keep_newest=True) is None and state.step_losses == []  # step 1 waits for step 2
    add(results, 2, 2.5, norm=0.5)
    last = results.settle(keep_newest=True)
    assert (last.step, last.loss, state.step_losses) == (1, 3.0, [3.0])
    add(results, 3, 2.0)
    last = results.settle()  # a reporting step: everything
    assert (last.step, last.lr, last.loss, last.grad_norm) == (3, 0.03, 2.0, 1.0)
    assert state.step_losses == [3.0, 2.5, 2.0] and results.pending == []


def test_non_finite_steps_are_counted_and_a_streak_stops_the_run():
    results, state, lines = results_with(max_nonfinite=2)
    add(results, 1, float("nan"))
    add(results, 2, 2.0)
    add(results, 3, 2.0, norm=float("inf"))
    results.settle()
    assert state.skipped_steps == 2 and results.streak == 1 and len(state.step_losses) == 3
    assert lines == ["[raypipe] step 1: non-finite loss nan / grad norm 1.0: update skipped",
                     "[raypipe] step 3: non-finite loss 2.0 / grad norm inf: update skipped"]
    add(results, 4, float("inf"))
    add(results, 5, 1.0)  # the run stops at step 4's streak, whatever came after it
    with pytest.raises(NonFiniteError, match=r"2 optimizer steps in a row .*\(last: step 4\).*\(step none\) is intact"):
        results.settle()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_step_times_are_the_gpus_even_when_the_host_runs_ahead():
    device = torch.device("cuda")
    clock = StepClock(Timed(lambda: None))
    torch.cuda._sleep(1000)  # warm the launch path
    torch.cuda.synchronize()
    cycles = 20_000_000  # ~10 ms of GPU time at 2 GHz; the host queues it in microseconds
    start = time.perf_counter()
    for i in range(6):
        with clock.step(device, sync=i == 5):
            torch.cuda._sleep(cycles * (2 if i == 2 else 1))
    wall = time.perf_counter() - start
    assert sum(clock.step_times) == pytest.approx(wall, rel=0.1)
    times = clock.step_times
    assert times[2] == pytest.approx(2 * times[0], rel=0.15) and times[1] == pytest.approx(times[0], rel=0.15)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_reading_a_step_does_not_wait_for_the_steps_queued_after_it():
    state = RunState(world_size=1, run_name="reads")
    results = StepResults(state, max_nonfinite_steps=3, log=lambda _: None)
    device = torch.device("cuda")
    torch.cuda._sleep(1000)
    torch.cuda.synchronize()
    for step, cycles in ((1, 2_000_000), (2, 400_000_000)):  # ~1 ms, then ~200 ms of GPU time
        torch.cuda._sleep(cycles)
        loss = torch.full((), float(step), device=device)
        results.add(step, 1e-3, loss, loss * 10, torch.zeros((), dtype=torch.bool, device=device))
    start = time.perf_counter()
    settled = results.settle(keep_newest=True)
    waited = time.perf_counter() - start
    assert (settled.step, settled.loss, settled.grad_norm) == (1, 1.0, 10.0)
    still_running = not torch.cuda.current_stream().query()
    assert waited < 0.05 and still_running  # step 2 was still on the GPU: the read did not wait for it
    assert results.settle().loss == 2.0 and state.step_losses == [1.0, 2.0]
