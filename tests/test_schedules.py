"""Learning-rate schedules."""

import math

import pytest

from unet_ray.core.schedules import cyclic_lr, learning_rate, warm_restart_lr


def test_warm_restart_starts_at_max_and_restarts():
    assert warm_restart_lr(0, 0.4, 0.0, 10) == pytest.approx(0.4)
    assert warm_restart_lr(5, 0.4, 0.0, 10) == pytest.approx(0.2)
    assert warm_restart_lr(9.999, 0.4, 0.0, 10) < 1e-6
    assert warm_restart_lr(10, 0.4, 0.0, 10) == 0.0  # the cycle's end is its minimum ...
    assert warm_restart_lr(10 + 1e-9, 0.4, 0.0, 10) == 0.0  # ... within rounding of it
    assert warm_restart_lr(10.001, 0.4, 0.0, 10) == pytest.approx(0.4)  # then the restart
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


def test_default_warm_restart_cycles_end_with_the_run():
    """40 epochs in 2 doubling cycles: 13.3 + 26.7, the last ending exactly at epoch 40."""
    from unet_ray.core.config import TrainConfig
    from unet_ray.core.schedules import config_learning_rate, schedule_cycle_ends

    train = TrainConfig()
    ends = schedule_cycle_ends(
        train.scheduler, train.epochs, train.restart_epochs, train.restart_cycles, 4
    )
    assert ends == pytest.approx([40 / 3, 40])
    lr_at_end = config_learning_rate(train, train.epochs - 1e-6)
    assert lr_at_end == pytest.approx(train.min_lr, rel=1e-3)  # the run ends at the minimum
    assert config_learning_rate(train, 40 / 3 + 1e-4) == pytest.approx(train.max_lr, rel=1e-3)


def test_warmup_ramps_linearly_from_zero():
    from unet_ray.core.schedules import warmup_factor

    assert learning_rate("constant", 0.0, 0.4, 0.0, 10, 4, warmup_epochs=2) == 0.0
    assert learning_rate("constant", 0.5, 0.4, 0.0, 10, 4, warmup_epochs=2) == pytest.approx(0.1)
    assert learning_rate("constant", 2.0, 0.4, 0.0, 10, 4, warmup_epochs=2) == pytest.approx(0.4)
    assert warmup_factor(5.0, 0) == 1.0
    # warm-up multiplies the schedule: warm restart at 1 epoch of 2 of warm-up is half its value
    assert learning_rate("warm-restart", 1.0, 0.4, 0.0, 10, 4, warmup_epochs=2) == pytest.approx(
        0.5 * warm_restart_lr(1.0, 0.4, 0.0, 10)
    )


@pytest.mark.parametrize(
    ("scheduler", "epochs", "restart_epochs", "cycle_epochs", "warns"),
    [
        ("warm-restart", 40, 10, 4, True),  # the old default: 40 ends inside the 30-70 cycle
        ("warm-restart", 30, 10, 4, False),
        ("warm-restart", 40, 0, 4, False),  # cycles sized to the run
        ("cyclic", 10, 0, 4, True),
        ("cyclic", 12, 0, 4, False),
        ("constant", 7, 0, 4, False),
    ],
)
def test_mid_cycle_warning(scheduler, epochs, restart_epochs, cycle_epochs, warns):
    from unet_ray.core.schedules import mid_cycle_warning

    message = mid_cycle_warning(scheduler, epochs, restart_epochs, 2, cycle_epochs)
    assert bool(message) == warns
    if scheduler == "warm-restart" and warns:
        assert "cycles end at epochs 10, 30, 70" in message and "30 or 70" in message


def test_warm_restart_needs_epochs_when_sized_to_the_run():
    with pytest.raises(ValueError, match="needs the run's epochs"):
        learning_rate("warm-restart", 1.0, 0.4, 0.0, 0, 4)


def test_the_first_warm_up_step_learns():
    """Each step takes the rate at its end: a one-step epoch under a one-epoch warm-up runs at
    the full rate, and the weights move (at the rate at its start, 0, they would not)."""
    import torch

    from unet_ray.core.config import Config
    from unet_ray.core.losses import build_loss
    from unet_ray.pipelines.train_loop import train_one_epoch

    torch.manual_seed(0)
    config = Config.from_dict(
        {"train": {"scheduler": "constant", "max_lr": 0.1, "warmup_epochs": 1.0}}
    )
    model = torch.nn.Conv2d(3, 1, 1)
    before = model.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    batch = {"image": torch.rand(2, 3, 8, 8), "mask": (torch.rand(2, 1, 8, 8) > 0.5).float()}
    loss, lr = train_one_epoch(
        model, optimizer, build_loss("bce"), iter([batch]), config, 0, 1, torch.device("cpu")
    )
    assert lr == pytest.approx(0.1) and loss > 0
    assert not torch.equal(model.weight.detach(), before)


@pytest.mark.parametrize("steps_per_epoch", [1, 7, 100])
def test_every_run_of_1_to_200_epochs_takes_its_last_step_at_the_cycle_minimum(steps_per_epoch):
    """The last step's rate, computed as training computes it (``step_epoch``), is the schedule's
    minimum for every run length 1-200: warm restart with cycles sized to the run (1-3 cycles)
    and cyclic with a cycle length that divides the run. Before the cycle-end tolerance, 134 of
    the warm-restart runs (max lr 0.4, warm-up 1, 2 cycles) took their last step at 0.4."""
    from unet_ray.core.config import TrainConfig
    from unet_ray.core.schedules import config_learning_rate, step_epoch

    for epochs in range(1, 201):
        last = step_epoch(epochs - 1, steps_per_epoch - 1, steps_per_epoch)
        runs = [
            TrainConfig(epochs=epochs, scheduler="warm-restart", restart_cycles=cycles)
            for cycles in (1, 2, 3)
        ] + [
            TrainConfig(epochs=epochs, scheduler="cyclic", cycle_epochs=cycle)
            for cycle in (1, 2, 4, 5)
            if epochs % cycle == 0
        ]
        for train in runs:
            lr = config_learning_rate(train, last)
            assert lr == pytest.approx(train.min_lr, abs=1e-9), (epochs, train.scheduler, lr)
