"""Training losses on logits: binary cross-entropy, soft Dice, and their sum, per output channel;
and the targets of each model head. Plain torch."""

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


class ChannelLoss(nn.Module):
    """One loss per output channel, weighted and summed: channel 0 (nucleus) has weight 1, the
    contour channel ``contour_weight``. Logits and targets are N x C x H x W."""

    def __init__(self, base: nn.Module, contour_weight: float = 1.0):
        super().__init__()
        self.base = base
        self.contour_weight = contour_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_same_shape(logits, target)
        loss = self.base(logits[:, :1], target[:, :1])
        if logits.shape[1] > 1:
            loss = loss + self.contour_weight * self.base(logits[:, 1:2], target[:, 1:2])
        return loss


def build_loss(name: str, contour_weight: float = 1.0) -> nn.Module:
    """The loss called ``name`` (``"bce"``, ``"dice"``, ``"bce+dice"``), applied to each output
    channel; the contour channel's loss is weighted by ``contour_weight``."""
    if name not in LOSS_CLASSES:
        raise ValueError(f"unknown loss '{name}'; choose one of {list(LOSS_CLASSES)}")
    return ChannelLoss(LOSS_CLASSES[name](), contour_weight)


def contour_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """Contour target (bool N x 1 x H x W) of instance labels (N x H x W): the nucleus pixels
    with an 8-neighbour of another label or of the background. The same rule as
    ``unet_ray.core.instances.contour_target`` (beyond the image border nothing differs)."""
    values = labels.float()[:, None]
    larger = F.max_pool2d(values, kernel_size=3, stride=1, padding=1)
    smaller = -F.max_pool2d(-values, kernel_size=3, stride=1, padding=1)
    return (values > 0) & ((larger != values) | (smaller != values))


def head_targets(batch: dict[str, torch.Tensor], channels: int) -> torch.Tensor:
    """float N x C x H x W targets of a training batch: the nucleus mask, then (two channels)
    the contour derived from the augmented instance labels."""
    if channels == 1:
        return batch["mask"]
    return torch.cat([batch["mask"], contour_from_labels(batch["labels"]).float()], dim=1)
