"""Learning-rate schedules as pure functions of the (fractional) epoch. No torch, no Ray.

A run's learning rate is ``warmup_factor * schedule``: a linear warm-up from 0 over the first
``warmup_epochs`` (SGD at the report's max lr 0.4 on a fresh decoder diverges without it), times
the scheduler's value. Warm-restart cycles double in length; with ``restart_epochs`` 0 the first
cycle is sized so that the run's last epoch ends exactly at the end of a cycle (where the learning
rate is lowest and the weights are best), e.g. 40 epochs in 2 cycles: 13.3 + 26.7 epochs.
"""

from __future__ import annotations

import math

RESTART_GROWTH = 2  # each warm-restart cycle is twice as long as the one before (SGDR's T_mult)
CYCLE_END_TOLERANCE = 1e-6  # epochs


def warm_restart_lr(epoch: float, max_lr: float, min_lr: float, first_cycle_epochs: float) -> float:
    """Cosine annealing with warm restarts (SGDR, cycle length doubling after each restart).

    A cycle's end belongs to that cycle: at its end (within ``CYCLE_END_TOLERANCE``, which
    floating-point sums of cycle lengths and step fractions need) the rate is the minimum, and
    the restart to the maximum comes just after it. Without the tolerance a run whose cycles are
    sized to it could take its last step at the peak rate when rounding put the run's last
    fractional epoch a hair past the cycle end (134 of the run lengths 1-200 did).
    """
    if first_cycle_epochs <= 0:
        raise ValueError(f"the first warm-restart cycle must be positive, got {first_cycle_epochs}")
    cycle_length = float(first_cycle_epochs)
    position = epoch
    while position > cycle_length + CYCLE_END_TOLERANCE:
        position -= cycle_length
        cycle_length *= RESTART_GROWTH
    position = min(position, cycle_length)
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * position / cycle_length))


def cyclic_lr(epoch: float, max_lr: float, min_lr: float, cycle_epochs: int) -> float:
    """Triangular cyclic schedule: min -> max in half a cycle, back to min in the other half."""
    phase = (epoch % cycle_epochs) / cycle_epochs
    return min_lr + (max_lr - min_lr) * (1 - abs(2 * phase - 1))


def first_restart_cycle(epochs: int, cycles: int) -> float:
    """First cycle length (epochs) so that ``cycles`` doubling cycles end exactly at ``epochs``."""
    return epochs / (RESTART_GROWTH**cycles - 1)


def restart_cycle_ends(first_cycle_epochs: float, until: float) -> list[float]:
    """Epochs at which warm-restart cycles end, up to and including the first at or past ``until``."""
    ends, end, length = [], 0.0, float(first_cycle_epochs)
    while end < until - CYCLE_END_TOLERANCE:
        end += length
        length *= RESTART_GROWTH
        ends.append(end)
    return ends


def schedule_cycle_ends(
    scheduler: str, epochs: int, restart_epochs: float, restart_cycles: int, cycle_epochs: int
) -> list[float]:
    """Where the schedule's cycles end (its learning-rate minima) up to the end of the run."""
    if scheduler == "warm-restart":
        first = restart_epochs or first_restart_cycle(epochs, restart_cycles)
        return restart_cycle_ends(first, epochs)
    if scheduler == "cyclic":
        return [float(end) for end in range(cycle_epochs, epochs + cycle_epochs, cycle_epochs)]
    return [float(epochs)]


def mid_cycle_warning(
    scheduler: str, epochs: int, restart_epochs: float, restart_cycles: int, cycle_epochs: int
) -> str:
    """A warning when ``epochs`` ends in the middle of a cycle (at a high learning rate), or ""."""
    ends = schedule_cycle_ends(scheduler, epochs, restart_epochs, restart_cycles, cycle_epochs)
    if abs(ends[-1] - epochs) <= CYCLE_END_TOLERANCE:
        return ""
    earlier = [end for end in ends if end < epochs]
    nearest = [round(end) for end in (earlier[-1:] + ends[-1:])]
    return (
        f"{epochs} epochs end in the middle of a {scheduler} cycle, at a high learning rate: "
        f"cycles end at epochs {', '.join(f'{end:g}' for end in ends)}; train for one of "
        f"{' or '.join(str(end) for end in nearest)} epochs"
        + (" or set train.restart_epochs to 0 (cycles sized to the run)" if restart_epochs else "")
    )


def step_epoch(epoch: int, step: int, steps_per_epoch: int) -> float:
    """The fractional epoch whose rate step ``step`` (0-based) of epoch ``epoch`` takes: the
    rate at the step's end, so the warm-up's first step learns and a run's last step takes the
    schedule's value at the run's end (a cycle's minimum when the cycles end with the run)."""
    return epoch + (step + 1) / steps_per_epoch


def warmup_factor(epoch: float, warmup_epochs: float) -> float:
    """Linear warm-up: 0 at epoch 0 up to 1 at ``warmup_epochs``. Training takes each step's
    rate at the step's end (``train.train_one_epoch``), so its first step runs at 1/steps of it."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return 1.0
    return max(epoch / warmup_epochs, 0.0)


def learning_rate(
    scheduler: str,
    epoch: float,
    max_lr: float,
    min_lr: float,
    restart_epochs: float,
    cycle_epochs: int,
    warmup_epochs: float = 0.0,
    epochs: int | None = None,
    restart_cycles: int = 2,
) -> float:
    """The learning rate at a fractional epoch for the named scheduler, after the warm-up.

    ``restart_epochs`` 0 sizes warm-restart cycles to ``epochs`` (``restart_cycles`` of them).
    """
    if scheduler == "warm-restart":
        first = restart_epochs
        if not first:
            if epochs is None:
                raise ValueError("warm-restart with restart_epochs 0 needs the run's epochs")
            first = first_restart_cycle(epochs, restart_cycles)
        value = warm_restart_lr(epoch, max_lr, min_lr, first)
    elif scheduler == "cyclic":
        value = cyclic_lr(epoch, max_lr, min_lr, cycle_epochs)
    elif scheduler == "constant":
        value = max_lr
    else:
        raise ValueError(f"unknown scheduler '{scheduler}': use warm-restart, cyclic or constant")
    return value * warmup_factor(epoch, warmup_epochs)


def config_learning_rate(train, epoch: float) -> float:
    """``learning_rate`` for a ``TrainConfig`` at a fractional epoch."""
    return learning_rate(
        train.scheduler,
        epoch,
        train.max_lr,
        train.min_lr,
        train.restart_epochs,
        train.cycle_epochs,
        warmup_epochs=train.warmup_epochs,
        epochs=train.epochs,
        restart_cycles=train.restart_cycles,
    )
