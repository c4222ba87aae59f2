"""Tests for probability map -> instance labels."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.draw import disk, ellipse

from unet_ray.instances import labels_from_mask, labels_from_probabilities
from unet_ray.metrics import dsb_image_score, iou_matrix

SIZE = (96, 96)


def discs(*centres_and_radii: tuple[int, int, int]) -> np.ndarray:
    """Label image with one disc per (row, column, radius); later discs win where they overlap."""
    labels = np.zeros(SIZE, dtype=np.int32)
    for label, (row, column, radius) in enumerate(centres_and_radii, start=1):
        rows, columns = disk((row, column), radius, shape=SIZE)
        labels[rows, columns] = label
    return labels


@pytest.mark.parametrize("separation", [18, 16, 14])
def test_two_touching_discs_become_two_instances(separation):
    true = discs((48, 30, 10), (48, 30 + separation, 10))
    assert ndimage.label(true > 0)[1] == 1  # one connected blob
    labels = labels_from_mask(true > 0)
    assert labels.max() == 2
    assert np.all(iou_matrix(true, labels).max(axis=1) > 0.85)


def test_chain_of_three_and_separate_discs():
    true = discs((30, 20, 9), (30, 37, 9), (30, 54, 9), (75, 70, 12))
    labels = labels_from_probabilities(np.where(true > 0, 0.9, 0.1))
    assert labels.max() == 4
    assert dsb_image_score(true, labels) > 0.9


@pytest.mark.parametrize("rotation", [0.0, 0.7, 1.2])
def test_elongated_nucleus_is_not_split(rotation):
    mask = np.zeros(SIZE, dtype=bool)
    rows, columns = ellipse(48, 48, 10, 30, shape=SIZE, rotation=rotation)
    mask[rows, columns] = True
    labels = labels_from_mask(mask)
    assert labels.max() == 1
    assert np.array_equal(labels > 0, mask)


def test_min_size_removes_specks():
    true = discs((48, 48, 10))
    mask = true > 0
    mask[5:8, 5:8] = True  # 9 pixels
    mask[90, 10] = True  # 1 pixel
    labels = labels_from_mask(mask, min_size=16)
    assert labels.max() == 1
    assert np.array_equal(labels > 0, true > 0)
    assert labels_from_mask(mask, min_size=1).max() == 3


def test_threshold_decides_foreground():
    probabilities = np.zeros(SIZE, dtype=np.float32)
    probabilities[10:30, 10:30] = 0.6
    probabilities[50:70, 50:70] = 0.4
    assert labels_from_probabilities(probabilities, threshold=0.5).max() == 1
    assert labels_from_probabilities(probabilities, threshold=0.3).max() == 2


def test_labels_are_consecutive_int32():
    true = discs((20, 20, 6), (20, 60, 7), (70, 30, 8), (70, 70, 5))
    labels = labels_from_mask(true > 0)
    assert labels.dtype == np.int32
    assert labels.shape == SIZE
    assert list(np.unique(labels)) == [0, 1, 2, 3, 4]


def test_noisy_probabilities_of_touching_discs():
    rng = np.random.default_rng(0)
    true = discs((48, 39, 10), (48, 57, 10))
    probabilities = ndimage.gaussian_filter((true > 0).astype(float), 1.5)
    probabilities += rng.normal(0.0, 0.05, SIZE)
    labels = labels_from_probabilities(probabilities)
    assert labels.max() == 2
    assert dsb_image_score(true, labels) > 0.8


def test_empty_probabilities_give_no_labels():
    labels = labels_from_probabilities(np.zeros(SIZE))
    assert labels.dtype == np.int32 and not labels.any()


def test_wrong_dimensions_are_rejected():
    with pytest.raises(ValueError, match=r"H x W probability map.*\(1, 96, 96\)"):
        labels_from_probabilities(np.zeros((1, *SIZE)))
