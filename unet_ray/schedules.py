"""Learning-rate schedules as pure functions of the (fractional) epoch. No torch, no Ray."""

from __future__ import annotations

import math


def warm_restart_lr(epoch: float, max_lr: float, min_lr: float, first_cycle_epochs: int) -> float:
    """Cosine annealing with warm restarts (SGDR, cycle length doubling after each restart)."""
    cycle_length = float(first_cycle_epochs)
    position = epoch
    while position >= cycle_length:
        position -= cycle_length
        cycle_length *= 2
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * position / cycle_length))


def cyclic_lr(epoch: float, max_lr: float, min_lr: float, cycle_epochs: int) -> float:
    """Triangular cyclic schedule: min -> max in half a cycle, back to min in the other half."""
    phase = (epoch % cycle_epochs) / cycle_epochs
    return min_lr + (max_lr - min_lr) * (1 - abs(2 * phase - 1))


def learning_rate(
    scheduler: str,
    epoch: float,
    max_lr: float,
    min_lr: float,
    restart_epochs: int,
    cycle_epochs: int,
) -> float:
    """The learning rate at a fractional epoch for the named scheduler."""
    if scheduler == "warm-restart":
        return warm_restart_lr(epoch, max_lr, min_lr, restart_epochs)
    if scheduler == "cyclic":
        return cyclic_lr(epoch, max_lr, min_lr, cycle_epochs)
    if scheduler == "constant":
        return max_lr
    raise ValueError(f"unknown scheduler '{scheduler}': use warm-restart, cyclic or constant")
