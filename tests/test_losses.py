"""Tests for the losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from unet_ray.core.config import LOSSES
from unet_ray.core.losses import DICE_SMOOTH, bce_loss, build_loss, dice_loss

CONFIDENT_LOGIT = 50.0  # sigmoid(50) = 1 to float precision


def test_bce_of_zero_logits_is_log_2():
    target = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert bce_loss(torch.zeros(2, 2), target).item() == pytest.approx(math.log(2))


def test_bce_matches_hand_computed_value():
    logits = torch.tensor([2.0, -1.0])
    target = torch.tensor([1.0, 1.0])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(1.0))) / 2
    assert bce_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_dice_of_perfect_prediction_is_zero():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1.0
    logits = (target * 2 - 1) * CONFIDENT_LOGIT
    assert dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_of_opposite_prediction_is_nearly_one():
    target = torch.zeros(1, 1, 8, 8)
    target[..., :4] = 1.0
    logits = (1 - target * 2) * CONFIDENT_LOGIT
    expected = 1 - DICE_SMOOTH / (64 + DICE_SMOOTH)  # sum(p) + sum(t) = 32 + 32
    assert dice_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_dice_of_zero_logits_matches_hand_computed_value():
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    # p = 0.5 everywhere: intersection 1.0, sum(p) + sum(t) = 2 + 2
    expected = 1 - (2 * 1.0 + DICE_SMOOTH) / (4.0 + DICE_SMOOTH)
    assert dice_loss(torch.zeros(1, 4), target).item() == pytest.approx(expected)


def test_dice_of_empty_target_and_empty_prediction_is_zero():
    target = torch.zeros(1, 1, 4, 4)
    assert dice_loss(torch.full_like(target, -CONFIDENT_LOGIT), target).item() == pytest.approx(
        0.0, abs=1e-6
    )


def test_bce_plus_dice_is_the_sum():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    combined = build_loss("bce+dice")(logits, target)
    assert combined.item() == pytest.approx(
        (bce_loss(logits, target) + dice_loss(logits, target)).item()
    )


@pytest.mark.parametrize("name", LOSSES)
def test_every_configured_loss_builds_and_backpropagates(name):
    logits = torch.zeros(1, 1, 4, 4, requires_grad=True)
    target = torch.ones(1, 1, 4, 4)
    loss = build_loss(name)(logits, target)
    loss.backward()
    assert loss.item() > 0
    assert (logits.grad < 0).all()  # raising the logits of true pixels lowers every loss


def test_unknown_loss_name_is_rejected():
    with pytest.raises(ValueError, match="unknown loss 'focal'.*'bce', 'dice', 'bce\\+dice'"):
        build_loss("focal")


def test_shape_mismatch_is_rejected():
    with pytest.raises(
        ValueError, match=r"logits shape \(1, 1, 4, 4\) and target shape \(1, 4, 4\)"
    ):
        dice_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4))
