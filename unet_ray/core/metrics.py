"""Segmentation metrics in numpy: pixel F1 / IoU from counts, instance matching, DSB2018 score.

Conventions (also in each docstring):

- Pixel metrics are computed from summed counts ``(tp, fp, fn)`` so that data-parallel workers can
  add their counts and get the exact global value. With no positive pixel anywhere
  (``tp = fp = fn = 0``) prediction and truth agree perfectly: F1 = IoU = 1.0.
- Instances are matched one-to-one by IoU: at a threshold ``t >= 0.5`` a true and a predicted
  object match when their IoU is strictly greater than ``t`` (as in the DSB2018 evaluation);
  since two objects of one image cannot both overlap a third by more than half its union, such
  matches are unique and no assignment problem has to be solved.
- DSB2018 score of one image: the mean over ``IOU_THRESHOLDS`` (0.50, 0.55, ..., 0.95) of
  ``TP / (TP + FP + FN)``. No objects in truth or prediction: 1.0; objects in only one: 0.0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from unet_ray.core.config import IOU_THRESHOLDS

MATCHING_IOU = 0.5  # instance F1 is reported at this IoU threshold ("f1_50")
MIN_UNIQUE_MATCH_IOU = 0.5  # above this IoU an object can match at most one other object
EMPTY_SCORE = 1.0  # F1, IoU and DSB score when there is nothing to find and nothing was found


def pixel_counts(pred_mask: np.ndarray, true_mask: np.ndarray) -> tuple[int, int, int]:
    """Pixel counts ``(tp, fp, fn)`` of a predicted against a true binary mask (nonzero = on)."""
    pred_mask, true_mask = np.asarray(pred_mask), np.asarray(true_mask)
    if pred_mask.shape != true_mask.shape:
        raise ValueError(
            f"predicted mask shape {pred_mask.shape} and true mask shape {true_mask.shape} differ"
        )
    pred_on, true_on = pred_mask.astype(bool), true_mask.astype(bool)
    true_positive = int(np.count_nonzero(pred_on & true_on))
    false_positive = int(np.count_nonzero(pred_on)) - true_positive
    false_negative = int(np.count_nonzero(true_on)) - true_positive
    return true_positive, false_positive, false_negative


def f1_from_counts(tp: int, fp: int, fn: int) -> float:
    """F1 (= Dice) ``2 tp / (2 tp + fp + fn)``; 1.0 when all counts are zero."""
    denominator = 2 * tp + fp + fn
    return EMPTY_SCORE if denominator == 0 else 2 * tp / denominator


def iou_from_counts(tp: int, fp: int, fn: int) -> float:
    """IoU (= Jaccard) ``tp / (tp + fp + fn)``; 1.0 when all counts are zero."""
    denominator = tp + fp + fn
    return EMPTY_SCORE if denominator == 0 else tp / denominator


@dataclass(frozen=True)
class InstanceOverlaps:
    """Every overlapping (true, predicted) object pair of one image, with its IoU.

    ``true_ids`` / ``pred_ids`` are the sorted nonzero labels present; ``pair_true`` and
    ``pair_pred`` index into them, one entry per overlapping pair, with ``pair_iou`` its IoU.
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    pair_true: np.ndarray
    pair_pred: np.ndarray
    pair_iou: np.ndarray

    @property
    def n_true(self) -> int:
        return len(self.true_ids)

    @property
    def n_pred(self) -> int:
        return len(self.pred_ids)


def check_labels(labels: np.ndarray, name: str) -> np.ndarray:
    """Return ``labels`` as an array after checking it is a non-negative integer label image."""
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be an integer label image, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name} has negative labels; 0 is background, objects are 1, 2, ...")
    return labels


def compute_overlaps(true_labels: np.ndarray, pred_labels: np.ndarray) -> InstanceOverlaps:
    """IoU of every overlapping (true, predicted) pair, from a sparse contingency table.

    Memory and time grow with the number of pixels, not with ``n_true * n_pred``.
    """
    true_labels = check_labels(true_labels, "true labels")
    pred_labels = check_labels(pred_labels, "predicted labels")
    if true_labels.shape != pred_labels.shape:
        raise ValueError(
            f"true labels shape {true_labels.shape} and predicted labels shape "
            f"{pred_labels.shape} differ"
        )
    true_flat, pred_flat = true_labels.ravel(), pred_labels.ravel()
    true_ids, true_areas = np.unique(true_flat[true_flat > 0], return_counts=True)
    pred_ids, pred_areas = np.unique(pred_flat[pred_flat > 0], return_counts=True)
    both = (true_flat > 0) & (pred_flat > 0)
    true_index = np.searchsorted(true_ids, true_flat[both]).astype(np.int64)
    pred_index = np.searchsorted(pred_ids, pred_flat[both]).astype(np.int64)
    pair_codes, intersections = np.unique(
        true_index * max(len(pred_ids), 1) + pred_index, return_counts=True
    )
    pair_true, pair_pred = np.divmod(pair_codes, max(len(pred_ids), 1))
    unions = true_areas[pair_true] + pred_areas[pair_pred] - intersections
    return InstanceOverlaps(
        true_ids=true_ids,
        pred_ids=pred_ids,
        pair_true=pair_true,
        pair_pred=pair_pred,
        pair_iou=intersections / unions,
    )


def iou_matrix(true_labels: np.ndarray, pred_labels: np.ndarray) -> np.ndarray:
    """Dense ``n_true x n_pred`` IoU matrix (rows: sorted true labels, columns: predicted)."""
    overlaps = compute_overlaps(true_labels, pred_labels)
    matrix = np.zeros((overlaps.n_true, overlaps.n_pred))
    matrix[overlaps.pair_true, overlaps.pair_pred] = overlaps.pair_iou
    return matrix


def check_threshold(iou_threshold: float) -> None:
    if not MIN_UNIQUE_MATCH_IOU <= iou_threshold < 1.0:
        raise ValueError(
            f"iou_threshold={iou_threshold} must be in [{MIN_UNIQUE_MATCH_IOU}, 1): below "
            f"{MIN_UNIQUE_MATCH_IOU} matches are not unique"
        )


def counts_from_overlaps(overlaps: InstanceOverlaps, iou_threshold: float) -> tuple[int, int, int]:
    """Instance ``(tp, fp, fn)``: a pair matches when its IoU is strictly above the threshold."""
    check_threshold(iou_threshold)
    true_positive = int(np.count_nonzero(overlaps.pair_iou > iou_threshold))
    return (
        true_positive,
        overlaps.n_pred - true_positive,
        overlaps.n_true - true_positive,
    )


def instance_counts(
    true_labels: np.ndarray, pred_labels: np.ndarray, iou_threshold: float = MATCHING_IOU
) -> tuple[int, int, int]:
    """Instance counts ``(tp, fp, fn)`` at ``iou_threshold`` (>= 0.5; match when IoU > it).

    tp: true objects with a matching prediction; fp: unmatched predicted objects; fn: unmatched
    true objects. Label images use 0 for background; labels need not be consecutive.
    """
    return counts_from_overlaps(compute_overlaps(true_labels, pred_labels), iou_threshold)


def instance_f1(
    true_labels: np.ndarray, pred_labels: np.ndarray, iou_threshold: float = MATCHING_IOU
) -> float:
    """Instance F1 ``2 tp / (2 tp + fp + fn)`` at ``iou_threshold``; 1.0 if both are empty."""
    return f1_from_counts(*instance_counts(true_labels, pred_labels, iou_threshold))


def dsb_image_score(
    true_labels: np.ndarray,
    pred_labels: np.ndarray,
    iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
) -> float:
    """DSB2018 score of one image: mean over the IoU thresholds of ``TP / (TP + FP + FN)``.

    Both images without objects: 1.0 (nothing to find, nothing found). Objects in only one of
    them: 0.0 (every threshold has TP = 0 and FP + FN > 0).
    """
    return dsb_score_from_overlaps(compute_overlaps(true_labels, pred_labels), iou_thresholds)


def dsb_score_from_overlaps(
    overlaps: InstanceOverlaps, iou_thresholds: Sequence[float] = IOU_THRESHOLDS
) -> float:
    """:func:`dsb_image_score` from precomputed overlaps."""
    if overlaps.n_true == 0 and overlaps.n_pred == 0:
        return EMPTY_SCORE
    scores = [
        iou_from_counts(*counts_from_overlaps(overlaps, threshold)) for threshold in iou_thresholds
    ]
    return float(np.mean(scores))


def summarise_images(
    label_pairs: Iterable[tuple[np.ndarray, np.ndarray]],
) -> dict[str, float | int]:
    """Instance metrics over images given as ``(true_labels, pred_labels)`` pairs.

    ``dsb_score``: mean over images of :func:`dsb_image_score`; ``f1_50``: instance F1 at IoU 0.5
    from the counts summed over all images (so each object weighs the same); ``n_images``.
    """
    scores = []
    totals = np.zeros(3, dtype=np.int64)
    for true_labels, pred_labels in label_pairs:
        overlaps = compute_overlaps(true_labels, pred_labels)
        scores.append(dsb_score_from_overlaps(overlaps))
        totals += counts_from_overlaps(overlaps, MATCHING_IOU)
    if not scores:
        raise ValueError("summarise_images got no images")
    return {
        "dsb_score": float(np.mean(scores)),
        "f1_50": f1_from_counts(*(int(count) for count in totals)),
        "n_images": len(scores),
    }
