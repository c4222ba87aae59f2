"""Probability map -> nucleus instance labels: threshold, drop specks, distance-transform watershed.

Plain numpy / scipy / scikit-image; no torch, no Ray.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.morphology import h_maxima
from skimage.segmentation import relabel_sequential, watershed

DEFAULT_THRESHOLD = 0.5  # probability above which a pixel is nucleus (config.InstanceConfig)
DEFAULT_MIN_SIZE = 16  # objects with fewer pixels are dropped
DEFAULT_MIN_DISTANCE = 4  # minimum distance between two watershed seeds (pixels)
SPLIT_DEPTH = 1.0  # a seed must rise this many pixels of distance above the neck to its neighbour
CONNECTIVITY = np.ones((3, 3), dtype=bool)  # 8-connected objects


def remove_small_objects(mask: np.ndarray, min_size: int) -> np.ndarray:
    """``mask`` without the 8-connected components of fewer than ``min_size`` pixels."""
    components, count = ndimage.label(mask, structure=CONNECTIVITY)
    if count == 0:
        return mask
    sizes = np.bincount(components.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[components]


def find_seeds(distance: np.ndarray, components: np.ndarray, min_distance: int) -> np.ndarray:
    """Watershed markers: one per distance-transform peak, at least one per component.

    A peak is a regional maximum of the distance at least ``SPLIT_DEPTH`` above the neck to any
    higher one (h-maxima: a flat or jagged ridge inside one nucleus gives one peak). Of two peaks
    in one component closer than ``min_distance``, only the higher is kept.
    """
    tall_maxima = h_maxima(distance, SPLIT_DEPTH).astype(bool) & (components > 0)
    maxima_regions, region_count = ndimage.label(tall_maxima, structure=CONNECTIVITY)
    if region_count == 0:
        return add_missing_seeds(maxima_regions.astype(np.int32), distance, components)
    region_ids = np.arange(1, region_count + 1)
    peak_positions = np.array(
        ndimage.maximum_position(distance, labels=maxima_regions, index=region_ids)
    )
    peak_heights = np.zeros(distance.shape)
    peak_heights[tuple(peak_positions.T)] = distance[tuple(peak_positions.T)]
    kept_positions = peak_local_max(
        peak_heights,
        min_distance=max(1, min_distance),
        labels=components,
        exclude_border=False,
    )
    kept_regions = maxima_regions[tuple(kept_positions.T)]
    seeds = np.where(np.isin(maxima_regions, kept_regions), maxima_regions, 0).astype(np.int32)
    return add_missing_seeds(seeds, distance, components)


def add_missing_seeds(
    seeds: np.ndarray, distance: np.ndarray, components: np.ndarray
) -> np.ndarray:
    """Give every component without a seed one at its distance maximum (e.g. thin objects)."""
    component_ids = np.unique(components[components > 0])
    seeded = np.unique(components[seeds > 0])
    unseeded = np.setdiff1d(component_ids, seeded)
    if len(unseeded) == 0:
        return seeds
    next_label = int(seeds.max()) + 1
    peaks = ndimage.maximum_position(distance, labels=components, index=unseeded)
    for offset, position in enumerate(peaks):
        seeds[position] = next_label + offset
    return seeds


def labels_from_probabilities(
    probabilities: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    min_size: int = DEFAULT_MIN_SIZE,
    min_distance: int = DEFAULT_MIN_DISTANCE,
) -> np.ndarray:
    """Instance labels (int32, 0 = background, objects 1..N) from an H x W probability map.

    Pixels above ``threshold`` are foreground; components under ``min_size`` pixels are dropped;
    touching nuclei are split by a watershed on the negative distance transform, seeded at its
    peaks (at least ``min_distance`` pixels apart).
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 2:
        raise ValueError(
            f"expected an H x W probability map, got an array of shape {probabilities.shape}"
        )
    if not np.issubdtype(probabilities.dtype, np.number) and probabilities.dtype != bool:
        raise ValueError(f"probability map must be numeric, got dtype {probabilities.dtype}")
    foreground = remove_small_objects(probabilities > threshold, min_size)
    if not foreground.any():
        return np.zeros(probabilities.shape, dtype=np.int32)
    components, _ = ndimage.label(foreground, structure=CONNECTIVITY)
    distance = ndimage.distance_transform_edt(foreground)
    seeds = find_seeds(distance, components, min_distance)
    labels = watershed(-distance, seeds, mask=foreground)
    relabelled, _, _ = relabel_sequential(labels)
    return relabelled.astype(np.int32)


def labels_from_mask(
    mask: np.ndarray, min_size: int = DEFAULT_MIN_SIZE, min_distance: int = DEFAULT_MIN_DISTANCE
) -> np.ndarray:
    """Instance labels from a binary mask (nonzero = nucleus), split as for probabilities."""
    return labels_from_probabilities(
        np.asarray(mask).astype(bool).astype(np.float32),
        threshold=DEFAULT_THRESHOLD,
        min_size=min_size,
        min_distance=min_distance,
    )
