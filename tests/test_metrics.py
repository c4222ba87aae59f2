"""Tests for pixel and instance metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from unet_ray.core.config import IOU_THRESHOLDS
from unet_ray.core.metrics import (
    dsb_image_score,
    f1_from_counts,
    instance_counts,
    instance_f1,
    iou_from_counts,
    iou_matrix,
    pixel_counts,
    summarise_images,
)

SIZE = (32, 48)


def labels_with(*boxes: tuple[int, int, int, int, int]) -> np.ndarray:
    """A label image with each (label, row0, row1, col0, col1) box painted in order."""
    labels = np.zeros(SIZE, dtype=np.int32)
    for label, row0, row1, col0, col1 in boxes:
        labels[row0:row1, col0:col1] = label
    return labels


def test_pixel_counts_match_hand_count():
    pred = np.array([[1, 1, 0], [0, 1, 0]], dtype=bool)
    true = np.array([[1, 0, 0], [1, 1, 1]], dtype=np.uint8)
    assert pixel_counts(pred, true) == (2, 1, 2)
    assert f1_from_counts(2, 1, 2) == pytest.approx(4 / 7)
    assert iou_from_counts(2, 1, 2) == pytest.approx(2 / 5)


def test_pixel_counts_of_batches_add_up_to_the_whole():
    rng = np.random.default_rng(0)
    pred, true = rng.random((4, 16, 16)) > 0.5, rng.random((4, 16, 16)) > 0.6
    per_image = np.array([pixel_counts(p, t) for p, t in zip(pred, true, strict=True)])
    assert tuple(per_image.sum(axis=0)) == pixel_counts(pred, true)


def test_empty_pixel_counts_score_one():
    empty = np.zeros((4, 4), dtype=bool)
    assert pixel_counts(empty, empty) == (0, 0, 0)
    assert f1_from_counts(0, 0, 0) == 1.0
    assert iou_from_counts(0, 0, 0) == 1.0
    assert f1_from_counts(0, 3, 0) == 0.0


def test_pixel_counts_reject_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(2, 3\)"):
        pixel_counts(np.zeros((2, 2)), np.zeros((2, 3)))


def test_perfect_prediction_scores_one_whatever_the_label_numbers():
    true = labels_with((1, 0, 10, 0, 10), (2, 15, 25, 20, 40))
    pred = labels_with((900, 0, 10, 0, 10), (5, 15, 25, 20, 40))
    assert instance_counts(true, pred) == (2, 0, 0)
    assert dsb_image_score(true, pred) == 1.0
    assert instance_f1(true, pred) == 1.0


def test_shifted_object_scores_by_hand():
    true = labels_with((1, 0, 10, 0, 10))
    pred = labels_with((1, 0, 10, 2, 12))  # intersection 80, union 120: IoU 2/3
    assert iou_matrix(true, pred) == pytest.approx(np.array([[2 / 3]]))
    # matched at 0.50, 0.55, 0.60, 0.65 (score 1); unmatched at 0.70..0.95 (score 0)
    assert dsb_image_score(true, pred) == pytest.approx(4 / 10)
    assert instance_counts(true, pred, 0.7) == (0, 1, 1)


def test_merged_prediction_scores_by_hand():
    true = labels_with((1, 0, 10, 0, 10), (2, 0, 10, 10, 12))  # areas 100 and 20, touching
    pred = labels_with((1, 0, 10, 0, 12))  # one object over both: IoU 100/120 with the big one
    assert iou_matrix(true, pred) == pytest.approx(np.array([[100 / 120], [20 / 120]]))
    assert instance_counts(true, pred) == (1, 0, 1)
    # 0.50..0.80 (7 thresholds): TP 1, FN 1 -> 1/2; 0.85..0.95: TP 0, FP 1, FN 2 -> 0
    assert dsb_image_score(true, pred) == pytest.approx(7 * 0.5 / 10)


def test_merged_halves_match_nothing():
    true = labels_with((1, 0, 10, 0, 10), (2, 0, 10, 10, 20))
    pred = labels_with((1, 0, 10, 0, 20))  # IoU exactly 0.5 with each: not above 0.5
    assert instance_counts(true, pred) == (0, 1, 2)
    assert dsb_image_score(true, pred) == 0.0


def test_split_prediction_scores_by_hand():
    true = labels_with((1, 0, 10, 0, 20))  # area 200
    pred = labels_with((1, 0, 10, 0, 14), (2, 0, 10, 14, 20))  # IoU 0.7 and 0.3
    assert instance_counts(true, pred) == (1, 1, 0)
    # IoU 0.7 is above 0.50..0.65 (4 thresholds): TP 1, FP 1 -> 1/2; not above 0.70
    assert instance_counts(true, pred, 0.7) == (0, 2, 1)
    assert dsb_image_score(true, pred) == pytest.approx(4 * 0.5 / 10)


def test_empty_images():
    empty = np.zeros(SIZE, dtype=np.int32)
    some = labels_with((3, 5, 15, 5, 15))
    assert dsb_image_score(empty, empty) == 1.0
    assert dsb_image_score(empty, some) == 0.0
    assert dsb_image_score(some, empty) == 0.0
    assert instance_counts(empty, some) == (0, 1, 0)
    assert instance_counts(some, empty) == (0, 0, 1)
    assert instance_f1(empty, empty) == 1.0


def test_overlaps_agree_with_brute_force_on_random_labels():
    rng = np.random.default_rng(3)
    true = rng.integers(0, 6, size=(20, 20)) * 7  # labels 0, 7, 14, ...: not consecutive
    pred = np.where(rng.random((20, 20)) < 0.7, true, rng.integers(0, 4, size=(20, 20)))
    true_ids, pred_ids = np.unique(true[true > 0]), np.unique(pred[pred > 0])
    expected = np.array(
        [
            [
                np.sum((true == t) & (pred == p)) / np.sum((true == t) | (pred == p))
                for p in pred_ids
            ]
            for t in true_ids
        ]
    )
    assert iou_matrix(true, pred) == pytest.approx(expected)
    for threshold in IOU_THRESHOLDS:
        true_positive = int(np.sum(expected > threshold))
        assert instance_counts(true, pred, threshold) == (
            true_positive,
            len(pred_ids) - true_positive,
            len(true_ids) - true_positive,
        )


def test_summarise_images_by_hand():
    perfect = labels_with((1, 0, 10, 0, 10), (2, 15, 25, 20, 40))
    shifted_true = labels_with((1, 0, 10, 0, 10))
    shifted_pred = labels_with((1, 0, 10, 2, 12))
    summary = summarise_images([(perfect, perfect), (shifted_true, shifted_pred)])
    assert summary["n_images"] == 2
    assert summary["dsb_score"] == pytest.approx((1.0 + 0.4) / 2)
    assert summary["f1_50"] == pytest.approx(1.0)  # 3 true, 3 predicted, all matched at 0.5


def test_summarise_images_rejects_no_images():
    with pytest.raises(ValueError, match="no images"):
        summarise_images([])


def test_bad_label_images_are_rejected():
    labels = labels_with((1, 0, 10, 0, 10))
    with pytest.raises(ValueError, match="predicted labels must be an integer label image"):
        dsb_image_score(labels, labels.astype(np.float32))
    with pytest.raises(ValueError, match="true labels has negative labels"):
        dsb_image_score(-labels, labels)
    with pytest.raises(ValueError, match="shape"):
        dsb_image_score(labels, labels[:-1])
    with pytest.raises(ValueError, match="iou_threshold=0.3"):
        instance_counts(labels, labels, 0.3)
