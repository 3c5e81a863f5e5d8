"""Schedules: values at the boundaries (step 0, warmup end, decay start, cycle end, after) for
every schedule; CS336's reference values for the cosine schedule; build_schedule from configs."""
from __future__ import annotations

import itertools
import math
import pickle

import pytest

from lmrun.errors import ConfigError
from lmrun.optim import (
    ScheduleConfig,
    build_schedule,
    constant_schedule,
    cosine_schedule,
    linear_schedule,
    wsd_schedule,
)


def test_cosine_matches_cs336_reference_values():
    # CS336 assignment 1, test_get_lr_cosine_schedule: max 1, min 0.1, warmup 7, cycle 21, 25 steps
    expected = [0, 0.14285714285714285, 0.2857142857142857, 0.42857142857142855, 0.5714285714285714,
                0.7142857142857143, 0.8571428571428571, 1.0, 0.9887175604818206, 0.9554359905560885,
                0.9018241671106134, 0.8305704108364301, 0.7452476826029011, 0.6501344202803414,
                0.55, 0.44986557971965857, 0.3547523173970989, 0.26942958916356996, 0.19817583288938662,
                0.14456400944391146, 0.11128243951817937, 0.1, 0.1, 0.1, 0.1]
    got = [cosine_schedule(it, 1.0, 0.1, 7, 21) for it in range(25)]
    assert got == pytest.approx(expected, rel=1e-7, abs=0)  # numpy.testing.assert_allclose's default, as CS336


def test_cosine_boundaries():
    f = lambda it: cosine_schedule(it, 3e-3, 3e-4, 10, 100)
    assert f(0) == 0.0
    assert f(5) == pytest.approx(1.5e-3)
    assert f(10) == pytest.approx(3e-3)
    assert f(55) == pytest.approx(0.5 * (3e-3 + 3e-4))
    assert f(100) == pytest.approx(3e-4)
    assert f(101) == f(10_000) == 3e-4
    assert cosine_schedule(0, 1.0, 0.1, 0, 10) == 1.0  # no warmup: max at step 0
    assert cosine_schedule(5, 1.0, 0.1, 5, 5) == 0.1  # no cosine part


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_wsd_boundaries(shape):
    f = lambda it: wsd_schedule(it, 1.0, 0.1, 10, 100, 0.2, shape)
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)
    assert f(10) == 1.0 and f(50) == 1.0 and f(79) == 1.0
    assert f(80) == pytest.approx(1.0)  # decay starts at 100 - 20
    assert f(100) == pytest.approx(0.1) and f(150) == 0.1
    mid = {"linear": 0.55, "cosine": 0.55, "sqrt": 0.1 + 0.9 * (1 - math.sqrt(0.5))}[shape]
    assert f(90) == pytest.approx(mid)
    quarter = {"linear": 0.1 + 0.9 * 0.75, "cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)),
               "sqrt": 0.1 + 0.9 * 0.5}[shape]
    assert f(85) == pytest.approx(quarter)
    values = [f(it) for it in range(80, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_wsd_no_decay_and_errors():
    assert wsd_schedule(99, 1.0, 0.0, 0, 100, 0.0) == 1.0
    assert wsd_schedule(100, 1.0, 0.0, 0, 100, 0.0) == 0.0
    with pytest.raises(ValueError, match="overlaps"):
        wsd_schedule(0, 1.0, 0.0, 50, 100, 0.6)
    with pytest.raises(ValueError, match="decay_shape"):
        wsd_schedule(0, 1.0, 0.0, 0, 100, 0.2, "exp")


def test_constant_and_linear_boundaries():
    assert constant_schedule(0, 2.0) == 2.0
    assert constant_schedule(0, 2.0, 4) == 0.0 and constant_schedule(2, 2.0, 4) == 1.0
    assert constant_schedule(4, 2.0, 4) == 2.0 and constant_schedule(10**6, 2.0, 4) == 2.0
    f = lambda it: linear_schedule(it, 1.0, 0.2, 10, 50)
    assert f(0) == 0.0 and f(5) == pytest.approx(0.5)
    assert f(10) == 1.0
    assert f(30) == pytest.approx(0.6)
    assert f(50) == pytest.approx(0.2) and f(51) == 0.2 and f(1000) == 0.2


@pytest.mark.parametrize("name", ["cosine", "wsd", "constant", "linear"])
def test_build_schedule_every_name(name):
    cfg = ScheduleConfig(name=name, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.3, decay_shape="cosine")
    f = build_schedule(cfg, max_lr=2e-3, total_steps=100)
    assert f(0) == 0.0 and f(5) == pytest.approx(1e-3) and f(10) == pytest.approx(2e-3)
    end = 2e-3 if name == "constant" else 2e-4
    assert f(100) == pytest.approx(end) and f(200) == pytest.approx(end)
    assert f(69) == pytest.approx(2e-3 if name in ("wsd", "constant") else f(69))
    assert pickle.loads(pickle.dumps(f))(37) == f(37)


def test_build_schedule_warmup_fraction_and_errors():
    f = build_schedule(ScheduleConfig(name="cosine", warmup_fraction=0.1, min_lr_ratio=0.0), 1.0, 200)
    assert f.keywords["warmup_iters"] == 20 and f.keywords["cosine_cycle_iters"] == 200
    assert f(20) == 1.0 and f(200) == 0.0
    with pytest.raises(ConfigError, match="warmup_steps"):
        build_schedule(ScheduleConfig(warmup_steps=500), 1.0, 100)
    with pytest.raises(ConfigError, match="decay_fraction"):
        build_schedule(ScheduleConfig(name="wsd", warmup_steps=90, decay_fraction=0.2), 1.0, 100)
    with pytest.raises(ConfigError, match="total_steps"):
        build_schedule(ScheduleConfig(), 1.0, 0)
    with pytest.raises(ConfigError, match="schedule.name"):
        build_schedule(ScheduleConfig(name="step"), 1.0, 100)
