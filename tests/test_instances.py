"""Probability maps -> instance labels, for both heads: touching nuclei split, big irregular ones
kept whole, ground-truth maps recovered, contours as training derives them, stable seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.draw import disk, ellipse

from unet_ray.core.config import InstanceConfig
from unet_ray.core.instances import contour_target, instance_labels, labels_from_mask
from unet_ray.core.losses import contour_from_labels
from unet_ray.core.metrics import compute_overlaps, dsb_image_score, iou_matrix
from unet_ray.io.synth import place_nuclei

SIZE = (96, 96)


def discs(*centres_and_radii: tuple[int, int, int], size=SIZE) -> np.ndarray:
    """Label image with one disc per (row, column, radius); later discs win where they overlap."""
    labels = np.zeros(size, dtype=np.int32)
    for label, (row, column, radius) in enumerate(centres_and_radii, start=1):
        rows, columns = disk((row, column), radius, shape=size)
        labels[rows, columns] = label
    return labels


def maps_from_truth(labels: np.ndarray, blur: float = 1.0):
    """What a well-trained model of each head would output: blurred mask and contour maps."""
    nucleus = ndimage.gaussian_filter((labels > 0).astype(np.float32), blur)
    contour = ndimage.gaussian_filter(contour_target(labels).astype(np.float32), 0.7)
    return nucleus, contour


def both_heads(labels: np.ndarray, parameters: InstanceConfig | None = None):
    nucleus, contour = maps_from_truth(labels)
    return {
        "mask": instance_labels(nucleus, None, parameters),
        "mask+contour": instance_labels(nucleus, contour, parameters),
    }


@pytest.mark.parametrize("separation", [19, 17, 15])  # synth.TOUCH_DISTANCE: 0.75-0.95
def test_two_touching_discs_become_two_instances_with_either_head(separation):
    true = discs((48, 30, 10), (48, 30 + separation, 10))
    assert ndimage.label(true > 0)[1] == 1  # one connected blob
    for head, labels in both_heads(true).items():
        assert labels.max() == 2, head
        assert np.all(iou_matrix(true, labels).max(axis=1) > 0.85), head


def test_touching_nuclei_of_several_sizes_keep_their_own_seeds():
    """A small nucleus beside a big one is not swallowed; a chain of three splits in three."""
    true = discs((30, 24, 14), (30, 45, 7), (75, 15, 8), (75, 30, 8), (75, 45, 8), (75, 76, 12))
    for head, labels in both_heads(true).items():
        assert labels.max() == 6, head
        assert dsb_image_score(true, labels) > 0.9, head


@pytest.mark.parametrize("rotation", [0.0, 0.7, 1.2])
def test_elongated_nucleus_is_not_split(rotation):
    mask = np.zeros(SIZE, dtype=bool)
    rows, columns = ellipse(48, 48, 10, 30, shape=SIZE, rotation=rotation)
    mask[rows, columns] = True
    labels = labels_from_mask(mask)
    assert labels.max() == 1
    assert np.array_equal(labels > 0, mask)


def test_large_irregular_nucleus_is_not_cut_at_its_bumps():
    """A histology-sized nucleus (radius ~35 px) with a wavy outline stays one object."""
    size = (128, 128)
    rows, columns = np.mgrid[: size[0], : size[1]].astype(np.float32)
    angle = np.arctan2(rows - 64, columns - 64)
    outline = 35 * (1 + 0.08 * np.cos(3 * angle) + 0.06 * np.cos(5 * angle + 1.0))
    mask = np.hypot(rows - 64, columns - 64) <= outline
    labels = labels_from_mask(mask)
    assert labels.max() == 1


def test_ground_truth_maps_of_synthetic_clusters_are_recovered():
    """Synthetic images with touching and overlapping nuclei of several sizes: the contour
    head's maps give the instances back (DSB >= 0.9); the mask head, which never saw where
    nuclei meet, still splits most touching pairs."""
    scores = {"mask": [], "mask+contour": []}
    for seed, style in enumerate(("fluorescence", "brightfield", "he")):
        true, _ = place_nuclei(np.random.default_rng(seed), 192, 192, style)
        for head, labels in both_heads(true).items():
            scores[head].append(dsb_image_score(true, labels))
    assert np.mean(scores["mask+contour"]) >= 0.9
    assert np.mean(scores["mask"]) >= 0.35


def test_a_faint_contour_channel_parts_nuclei_as_well_as_a_confident_one():
    """A young model's contour probabilities peak far below 1 (a thin, rare class); the interior
    is taken relative to the map's own peak, so the same nuclei come out."""
    true, _ = place_nuclei(np.random.default_rng(5), 192, 192, "he")
    nucleus, contour = maps_from_truth(true)
    confident = instance_labels(nucleus, contour)
    for faintness in (0.6, 0.3):
        faint = instance_labels(nucleus, contour * faintness)
        np.testing.assert_array_equal(faint, confident)
    assert dsb_image_score(true, confident) >= 0.9
    # no contour at all: nothing is parted, the blobs come out whole
    blobs = ndimage.label(nucleus > 0.5, structure=np.ones((3, 3)))[1]
    assert instance_labels(nucleus, np.zeros_like(contour)).max() <= blobs


def test_min_size_removes_specks_and_the_mask_is_the_union_of_the_labels():
    true = discs((48, 48, 10))
    mask = true > 0
    mask[5:8, 5:8] = True  # 9 pixels
    mask[90, 10] = True  # 1 pixel
    labels = labels_from_mask(mask, InstanceConfig(min_size=16))
    assert labels.max() == 1
    assert np.array_equal(labels > 0, true > 0)
    assert labels_from_mask(mask, InstanceConfig(min_size=1, min_seed_size=1)).max() == 3


def test_threshold_decides_foreground():
    probabilities = np.zeros(SIZE, dtype=np.float32)
    probabilities[10:30, 10:30] = 0.6
    probabilities[50:70, 50:70] = 0.4
    assert instance_labels(probabilities, None, InstanceConfig(threshold=0.5)).max() == 1
    assert instance_labels(probabilities, None, InstanceConfig(threshold=0.3)).max() == 2


def test_labels_are_consecutive_uint32():
    true = discs((20, 20, 6), (20, 60, 7), (70, 30, 8), (70, 70, 5), (70, 81, 6))
    for head, labels in both_heads(true).items():
        assert labels.dtype == np.uint32 and labels.shape == SIZE, head
        assert list(np.unique(labels)) == [0, 1, 2, 3, 4, 5], head


def test_hole_inside_one_nucleus_is_filled_but_a_gap_between_nuclei_is_not():
    ring = discs((30, 30, 12))
    ring[29:32, 29:32] = 0  # a dark nucleolus (2 % of the nucleus)
    rosette = discs(
        *((int(70 + 13 * np.sin(a)), int(66 + 13 * np.cos(a)), 7) for a in np.arange(6) * np.pi / 3)
    )
    mask = (ring > 0) | (rosette > 0)
    enclosed = ndimage.binary_fill_holes(rosette > 0) & (rosette == 0)
    assert enclosed.any()  # the rosette encloses background
    filled = labels_from_mask(mask)
    assert np.all(filled[29:32, 29:32] == filled[30, 20])
    assert not filled[enclosed].any()
    unfilled = labels_from_mask(mask, InstanceConfig(fill_holes=False))
    assert not unfilled[29:32, 29:32].any()


def test_noisy_probabilities_of_touching_discs():
    rng = np.random.default_rng(0)
    true = discs((48, 39, 10), (48, 57, 10))
    nucleus, contour = maps_from_truth(true, blur=1.5)
    nucleus += rng.normal(0.0, 0.05, SIZE).astype(np.float32)
    contour += rng.normal(0.0, 0.05, SIZE).astype(np.float32)
    for candidate in (None, contour):
        labels = instance_labels(nucleus, candidate)
        assert labels.max() == 2
        assert dsb_image_score(true, labels) > 0.8


def test_small_probability_changes_keep_the_same_nuclei():
    """Seeds are regions, not 1-px maxima: maps that differ by a few hundredths (as two tile
    sizes give) yield the same nuclei, >= 97 % matched one to one at IoU 0.8, for both heads."""
    true, _ = place_nuclei(np.random.default_rng(7), 384, 384, "fluorescence")
    nucleus, contour = maps_from_truth(true, blur=1.5)
    rng = np.random.default_rng(1)
    wobble = ndimage.gaussian_filter(rng.normal(0, 1, true.shape), 4).astype(np.float32)
    wobble *= 0.03 / np.abs(wobble).max()  # smooth differences of up to 0.03
    for candidate in (None, contour):
        first = instance_labels(nucleus, candidate)
        second = instance_labels(
            nucleus + wobble, None if candidate is None else candidate - wobble
        )
        matched = int(np.count_nonzero(compute_overlaps(first, second).pair_iou > 0.8))
        assert matched >= 0.97 * max(first.max(), second.max())


def test_contour_target_parts_touching_nuclei_and_matches_the_training_rule():
    true = discs((48, 30, 10), (48, 46, 10), (20, 80, 6))
    contour = contour_target(true)
    interior = (true > 0) & ~contour
    assert ndimage.label(interior)[1] == 3  # touching nuclei apart once the contour is removed
    assert not contour[true == 0].any()
    meet = int(np.flatnonzero((true[48, :-1] == 1) & (true[48, 1:] == 2))[0])
    assert contour[48, meet] and contour[48, meet + 1]  # a 2-px band where they touch
    assert not contour[48, meet - 2] and not contour[48, meet + 3]
    trained = contour_from_labels(torch.from_numpy(true)[None])[0, 0].numpy()
    np.testing.assert_array_equal(trained, contour)


def test_empty_probabilities_give_no_labels():
    labels = instance_labels(np.zeros(SIZE, dtype=np.float32))
    assert labels.dtype == np.uint32 and not labels.any()


def test_wrong_maps_are_rejected():
    with pytest.raises(ValueError, match=r"H x W nucleus probability map.*\(1, 96, 96\)"):
        instance_labels(np.zeros((1, *SIZE)))
    with pytest.raises(ValueError, match=r"contour probability map has shape \(48, 48\)"):
        instance_labels(np.zeros(SIZE), np.zeros((48, 48)))


@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (3, 3), (64, 64), (50, 17)])
def test_any_map_gives_labels_also_without_background(shape):
    """Maps of every kind, also all nucleus (no background pixel at all, as in a crop inside a
    big nucleus), give uint32 labels of the same shape."""
    rng = np.random.default_rng(0)
    for nucleus in (np.zeros(shape), np.ones(shape), rng.random(shape)):
        for contour in (None, rng.random(shape), np.ones(shape)):
            labels = instance_labels(nucleus.astype(np.float32), contour)
            assert labels.shape == shape and labels.dtype == np.uint32
    assert instance_labels(np.ones(shape, np.float32)).max() == int(np.prod(shape) >= 16)
