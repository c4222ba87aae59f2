"""Training losses on logits: binary cross-entropy, soft Dice, and their sum. Plain torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DICE_SMOOTH = 1.0  # added to numerator and denominator: Dice of an empty target and prediction = 1


def check_same_shape(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape:
        raise ValueError(
            f"logits shape {tuple(logits.shape)} and target shape {tuple(target.shape)} differ"
        )


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean pixel-wise binary cross-entropy with logits."""
    check_same_shape(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH
) -> torch.Tensor:
    """Soft Dice loss ``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` with ``p = sigmoid(logits)``.

    The sums run over the whole batch (every pixel of every image), so an image with no nuclei
    does not get a Dice of its own.
    """
    check_same_shape(logits, target)
    probabilities = torch.sigmoid(logits)
    target = target.to(probabilities.dtype)
    intersection = (probabilities * target).sum()
    total = probabilities.sum() + target.sum()
    return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


class BCELoss(nn.Module):
    """Pixel-wise binary cross-entropy with logits (the reference report's loss)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bce_loss(logits, target)


class DiceLoss(nn.Module):
    """Soft Dice loss on sigmoid probabilities, summed over the batch."""

    def __init__(self, smooth: float = DICE_SMOOTH):
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_loss(logits, target, self.smooth)


class BCEDiceLoss(nn.Module):
    """Binary cross-entropy plus soft Dice loss (unweighted sum)."""

    def __init__(self, smooth: float = DICE_SMOOTH):
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bce_loss(logits, target) + dice_loss(logits, target, self.smooth)


LOSS_CLASSES = {"bce": BCELoss, "dice": DiceLoss, "bce+dice": BCEDiceLoss}  # = config.LOSSES


def build_loss(name: str) -> nn.Module:
    """The loss called ``name``: one of ``"bce"``, ``"dice"``, ``"bce+dice"``."""
    if name not in LOSS_CLASSES:
        raise ValueError(f"unknown loss '{name}'; choose one of {list(LOSS_CLASSES)}")
    return LOSS_CLASSES[name]()
