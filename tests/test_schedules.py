"""Learning-rate schedules."""

import math

import pytest

from unet_ray.schedules import cyclic_lr, learning_rate, warm_restart_lr


def test_warm_restart_starts_at_max_and_restarts():
    assert warm_restart_lr(0, 0.4, 0.0, 10) == pytest.approx(0.4)
    assert warm_restart_lr(5, 0.4, 0.0, 10) == pytest.approx(0.2)
    assert warm_restart_lr(9.999, 0.4, 0.0, 10) < 1e-6
    assert warm_restart_lr(10, 0.4, 0.0, 10) == pytest.approx(0.4)  # restart
    assert warm_restart_lr(20, 0.4, 0.0, 10) == pytest.approx(0.2)  # second cycle is 20 epochs long


def test_cyclic_is_triangular():
    assert cyclic_lr(0, 0.4, 0.1, 4) == pytest.approx(0.1)
    assert cyclic_lr(2, 0.4, 0.1, 4) == pytest.approx(0.4)
    assert cyclic_lr(1, 0.4, 0.1, 4) == pytest.approx(0.25)
    assert cyclic_lr(4, 0.4, 0.1, 4) == pytest.approx(0.1)


def test_constant_and_unknown():
    assert learning_rate("constant", 3.3, 0.05, 0.0, 10, 4) == 0.05
    with pytest.raises(ValueError, match="unknown scheduler 'step'"):
        learning_rate("step", 0, 0.1, 0.0, 10, 4)


def test_warm_restart_never_leaves_its_range():
    values = [warm_restart_lr(step / 10, 0.4, 1e-4, 3) for step in range(400)]
    assert min(values) >= 1e-4 - 1e-12 and max(values) <= 0.4 + 1e-12
    assert not any(math.isnan(value) for value in values)
