import math

import pytest

from raypipe.config import TrainConfig
from raypipe.optim import lr_at


def test_schedule_key_steps():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == 0.0  # warmup starts at 0 (the seed's LinearLR started at lr / 3)
    assert lr_at(5, cfg) == pytest.approx(5e-4)
    assert lr_at(10, cfg) == pytest.approx(1e-3)  # peak at the end of warmup
    assert lr_at(60, cfg) == pytest.approx((1e-3 + 1e-4) / 2)  # cosine midpoint
    assert lr_at(110, cfg) == pytest.approx(1e-4)  # min_lr at the end
    steps = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))  # decays monotonically


def test_no_warmup_starts_at_peak():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=0.0, warmup_steps=0, max_steps=4)
    assert lr_at(0, cfg) == 1e-3 and lr_at(4, cfg) == 0.0
    assert lr_at(2, cfg) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 2)))
