"""Probability maps -> nucleus instance labels. Plain numpy / scipy / OpenCV / scikit-image.

One function, ``instance_labels``, serves both model heads:

1. **Foreground**: the nucleus probability above ``threshold``; 8-connected components.
2. **Seeds**, one per nucleus:
   - ``mask+contour`` head: the *interior*, nucleus minus contour (contour probability below
     ``contour_threshold`` times its peak in the image); its 4-connected parts. The network was
     taught where touching nuclei meet, so the interiors of two touching nuclei are apart.
   - ``mask`` head: the *cores* of the nuclei, where the distance to the background is at least
     ``core_ratio`` times the largest distance nearby (within the image's typical nucleus
     radius). A neck narrower than that ratio of the width beside it splits two nuclei; the rule
     scales with the object, so a large irregular nucleus is not cut at its bumps, a pair of
     small ones still splits, and a small nucleus beside a big one keeps its own core.
   Seeds under ``min_seed_size`` pixels are ignored.
3. **Split only what needs it**: a component with at most one seed is one nucleus as it is (most
   of them); the pixels of a component holding several seeds go to their nearest seed (one
   OpenCV distance transform per band of rows). Where a pixel lies nearer to another
   component's seed, that component is flooded on its own bounding box instead (watershed on its
   negative distance transform).
4. Objects under ``min_size`` pixels are dropped; background holes enclosed by one nucleus are
   filled (``fill_holes``); labels are 1..N, uint32.

Seeds are regions, not single-pixel maxima, so a change of a few hundredths in the probabilities
(another tile size, another GPU) moves a border by a pixel at most instead of adding or removing a
seed. Everything runs on whole-image uint8/int32/float32 arrays with OpenCV's connected components
and distance transform; the per-object Python work is confined to the few components that hold
several seeds and to holes. Peak additional memory is about 15 bytes per pixel (see
``benchmarks/bench_instances.py`` for the measured speed and memory).
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage.segmentation import watershed

from unet_ray.core.config import InstanceConfig

CORE_DEPTH = 1.5  # mask head: a core reaches at least this far below the local maximum (px)
HOLE_FRACTION = 0.05  # holes up to this fraction of their object are filled before seeding
PEAK_SAMPLES = 200_000  # contour values sampled for its peak (a percentile needs no more)
MIN_CONTOUR_PEAK = 0.1  # a map without contours (below this) parts nothing
BAND_ROWS = 256  # components are split a band of about this many image rows at a time
HOLE_RING = np.ones((3, 3), dtype=np.uint8)  # 8-neighbourhood: the ring around a hole


def check_map(name: str, values: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"expected an H x W {name} map, got an array of shape {values.shape}")
    if not np.issubdtype(values.dtype, np.number) and values.dtype != bool:
        raise ValueError(f"{name} map must be numeric, got dtype {values.dtype}")
    if shape is not None and values.shape != shape:
        raise ValueError(f"{name} map has shape {values.shape}, the nucleus map {shape}")
    return values


def components(binary: np.ndarray, connectivity: int) -> tuple[int, np.ndarray, np.ndarray]:
    """``(count, int32 labels, stats)`` of a boolean image (OpenCV; label 0 is the rest)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        binary.view(np.uint8), connectivity=connectivity, ltype=cv2.CV_32S
    )
    return count, labels, stats


def box(stats: np.ndarray, index: int, pad: int = 0, shape=None) -> tuple[slice, slice]:
    """The bounding box of component ``index`` (OpenCV stats), grown by ``pad`` within ``shape``."""
    left, top, width, height = (int(value) for value in stats[index, :4])
    if pad:
        bottom, right = top + height + pad, left + width + pad
        top, left = max(0, top - pad), max(0, left - pad)
        return slice(top, min(bottom, shape[0])), slice(left, min(right, shape[1]))
    return slice(top, top + height), slice(left, left + width)


def one_pixel_each(labels: np.ndarray, count: int) -> np.ndarray:
    """A flat index of one pixel of each label 1..count-1 (any one; all labels must occur)."""
    flat = labels.ravel()
    where = np.flatnonzero(flat)
    pixel = np.zeros(count, dtype=np.int64)
    pixel[flat[where]] = where
    return pixel[1:]


def interior_seeds(foreground: np.ndarray, contour: np.ndarray, fraction: float) -> np.ndarray:
    """Nucleus minus contour (contour head): where the contour probability is below
    ``fraction`` of its peak (the 99th percentile within the nuclei). A network's contour
    probabilities run low (a thin, rare class) and lower the less it trained; relative to its own
    peak, the same rule parts touching nuclei for a young model and a converged one."""
    inside = contour[foreground]
    peak = (
        float(np.percentile(inside[:: max(1, len(inside) // PEAK_SAMPLES)], 99))
        if len(inside)
        else 1.0
    )
    interior = contour < np.float32(fraction * max(peak, MIN_CONTOUR_PEAK))
    interior &= foreground
    return interior


def core_seeds(foreground: np.ndarray, blobs: np.ndarray, count: int, ratio: float) -> np.ndarray:
    """The cores of the nuclei (mask head): where the distance to the background is at least
    ``ratio`` times the largest distance nearby, within the typical nucleus radius (the median of
    the components' largest distances), and at least 1 px."""
    distance = cv2.distanceTransform(foreground.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5)
    # without any background pixel OpenCV's distances are huge: no nucleus is wider than the map
    np.minimum(distance, np.float32(max(foreground.shape)), out=distance)
    widest = np.zeros(count, dtype=np.float32)
    np.maximum.at(widest, blobs.ravel(), distance.ravel())
    radius = max(1, int(round(float(np.median(widest[1:])))))
    window = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * radius + 1, 2 * radius + 1))
    nearby = cv2.dilate(distance, window)
    # ratio * the largest distance nearby, but at least CORE_DEPTH below it (a small nucleus
    # keeps a core of a few pixels) and at least 1 px
    scaled = nearby * np.float32(ratio)
    np.subtract(nearby, np.float32(CORE_DEPTH), out=nearby)
    np.minimum(nearby, scaled, out=nearby)
    del scaled
    np.maximum(nearby, np.float32(1.0), out=nearby)
    cores = distance >= nearby
    cores &= foreground
    return cores


def instance_labels(
    nucleus: np.ndarray,
    contour: np.ndarray | None = None,
    parameters: InstanceConfig | None = None,
) -> np.ndarray:
    """Instance labels (uint32, 0 = background, nuclei 1..N) from an H x W nucleus probability
    map and, for the ``mask+contour`` head, its contour probability map (see the module doc)."""
    parameters = parameters or InstanceConfig()
    nucleus = check_map("nucleus probability", nucleus)
    if contour is not None:
        contour = check_map("contour probability", contour, nucleus.shape)
    foreground = nucleus > parameters.threshold
    count, blobs, blob_stats = components(foreground, connectivity=8)
    if count == 1:
        return np.zeros(nucleus.shape, dtype=np.uint32)
    if parameters.fill_holes:
        fill_small_holes(foreground, blobs, blob_stats)
    if contour is None:
        seed_pixels = core_seeds(foreground, blobs, count, parameters.core_ratio)
    else:
        seed_pixels = interior_seeds(foreground, contour, parameters.contour_threshold)
    del foreground
    seed_count, seeds, seed_stats = components(seed_pixels, connectivity=4)
    del seed_pixels
    # the component of each seed; seeds too small to count are dropped
    seed_blob = np.zeros(seed_count, dtype=np.int32)
    seed_blob[1:] = blobs.ravel()[one_pixel_each(seeds, seed_count)]
    seed_blob[seed_stats[:, cv2.CC_STAT_AREA] < parameters.min_seed_size] = 0
    seed_blob[0] = 0
    seeds_per_blob = np.bincount(seed_blob, minlength=count)
    seeds_per_blob[0] = 0

    several = seeds_per_blob > 1
    # components with at most one seed are one nucleus each, numbered in one gather
    single = (blob_stats[:, cv2.CC_STAT_AREA] >= parameters.min_size) & ~several
    single[0] = False
    lookup = np.zeros(count, dtype=np.uint32)
    lookup[single] = np.arange(1, int(single.sum()) + 1, dtype=np.uint32)
    labels = lookup[blobs]
    next_label = int(single.sum()) + 1
    for band, band_blobs in row_bands(blob_stats, np.flatnonzero(several)):
        next_label = split_band(
            labels, blobs, seeds, seed_blob, blob_stats, band, band_blobs, next_label, parameters
        )
    del seeds, blobs
    if parameters.fill_holes:
        fill_enclosed_holes(labels)
    return labels


def row_bands(stats: np.ndarray, indices: np.ndarray, rows: int = BAND_ROWS):
    """Group components by their top row into horizontal bands of about ``rows`` rows, each
    band tall enough to hold its components whole: yields ``(row slice, component indices)``, so whole-image work on the components runs
    on one band at a time (bounded memory)."""
    if len(indices) == 0:
        return
    tops = stats[indices, cv2.CC_STAT_TOP]
    bottoms = tops + stats[indices, cv2.CC_STAT_HEIGHT]
    order = np.argsort(tops, kind="stable")
    start, stop, members = int(tops[order[0]]), 0, []
    for position in order:
        if members and tops[position] - start >= rows:  # bands may overlap; components do not
            yield slice(start, stop), np.array(members)
            start, stop, members = int(tops[position]), 0, []
        members.append(int(indices[position]))
        stop = max(stop, int(bottoms[position]))
    yield slice(start, stop), np.array(members)


def split_band(
    labels, blobs, seeds, seed_blob, blob_stats, band, band_blobs, next_label, parameters
) -> int:
    """Split the components ``band_blobs`` (several seeds each, all within the rows ``band``):
    each pixel goes to its nearest seed; a component with a pixel nearer to another
    component's seed than to all of its own is flooded on its own (``flood_component``).
    Pieces under ``min_size`` pixels are dropped. Returns the next free label."""
    members = np.zeros(len(blob_stats), dtype=bool)
    members[band_blobs] = True
    band_blob_map = blobs[band]
    region = members[band_blob_map]
    region_blobs = band_blob_map[region]
    region_seeds = nearest_seed_map(seeds[band], seed_blob > 0)[region]
    flooded = np.unique(region_blobs[seed_blob[region_seeds] != region_blobs])
    # one label per seed of the cleanly split components, if its piece has min_size pixels
    sizes = np.bincount(region_seeds, minlength=len(seed_blob))
    clean = members
    clean[flooded] = False
    keep = clean[seed_blob] & (sizes >= parameters.min_size)
    keep[0] = False
    seed_label = np.zeros(len(seed_blob), dtype=np.uint32)
    seed_label[keep] = np.arange(next_label, next_label + int(keep.sum()), dtype=np.uint32)
    next_label += int(keep.sum())
    band_labels = labels[band]
    band_labels[region] = seed_label[region_seeds]
    for blob in flooded:
        next_label = flood_component(
            labels, blobs, seeds, seed_blob, blob_stats, int(blob), next_label, parameters
        )
    return next_label


def nearest_seed_map(seeds: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """The id of the nearest counted seed (Euclidean) of every pixel, int32: one OpenCV distance
    transform labelling each seed pixel, whose labels run in raster order."""
    not_seed = (counted[seeds] == 0).view(np.uint8)  # the counted seeds' pixels are the zeros
    seed_of_zero = seeds[not_seed == 0]  # the seed id of each zero pixel, in raster order
    if len(seed_of_zero) == 0:
        return np.zeros(seeds.shape, dtype=np.int32)
    distance, nearest = cv2.distanceTransformWithLabels(
        not_seed, cv2.DIST_L2, cv2.DIST_MASK_5, labelType=cv2.DIST_LABEL_PIXEL
    )
    del distance, not_seed
    lookup = np.zeros(len(seed_of_zero) + 1, dtype=np.int32)
    lookup[1:] = seed_of_zero
    del seed_of_zero
    return np.take(lookup, nearest, out=nearest)


def flood_component(
    labels, blobs, seeds, seed_blob, blob_stats, blob, next_label, parameters
) -> int:
    """Flood one component from its seeds over its negative distance transform, on its own
    bounding box; write the pieces of at least ``min_size`` pixels from ``next_label`` on."""
    rows, columns = box(blob_stats, blob)
    own = blobs[rows, columns] == blob
    local_seeds = seeds[rows, columns]
    markers = np.where(own & (seed_blob[local_seeds] == blob), local_seeds, 0)
    distance = cv2.distanceTransform(own.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5)
    pieces = watershed(-distance, markers, mask=own, connectivity=2)
    piece_ids, sizes = np.unique(pieces[own], return_counts=True)
    kept = piece_ids[(sizes >= parameters.min_size) & (piece_ids > 0)]
    renumber = np.zeros(int(pieces.max()) + 1, dtype=np.uint32)
    renumber[kept] = np.arange(next_label, next_label + len(kept), dtype=np.uint32)
    target = labels[rows, columns]
    target[own] = renumber[pieces[own]]
    return next_label + len(kept)


def enclosed_regions(labels: np.ndarray):
    """``(region mask in its box, box, the one label around it)`` of every background region
    that touches no image border and is surrounded by a single nonzero label."""
    background = labels == 0
    count, regions, stats = components(background, connectivity=4)
    del background
    height, width = labels.shape
    for index in range(1, count):
        left, top, region_width, region_height, _ = (int(value) for value in stats[index])
        if top == 0 or left == 0 or top + region_height == height or left + region_width == width:
            continue
        rows, columns = box(stats, index, pad=1, shape=labels.shape)
        hole = (regions[rows, columns] == index).view(np.uint8)
        ring = cv2.dilate(hole, HOLE_RING).astype(bool) & ~hole.astype(bool)
        around = np.unique(labels[rows, columns][ring])
        if len(around) == 1 and around[0] != 0:
            yield hole.astype(bool), (rows, columns), around[0]


def fill_small_holes(foreground: np.ndarray, blobs: np.ndarray, blob_stats: np.ndarray) -> None:
    """Before seeding: holes of at most ``HOLE_FRACTION`` of the component around them become
    foreground of that component (a dark nucleolus must not warp the seeds)."""
    for hole, (rows, columns), blob in list(enclosed_regions(blobs)):
        area = int(hole.sum())
        if area <= HOLE_FRACTION * blob_stats[blob, cv2.CC_STAT_AREA]:
            foreground[rows, columns][hole] = True
            blobs[rows, columns][hole] = blob
            blob_stats[blob, cv2.CC_STAT_AREA] += area


def fill_enclosed_holes(labels: np.ndarray) -> None:
    """Give every background region that touches no image border and is surrounded by one
    nucleus alone to that nucleus (a hole between several nuclei stays background)."""
    for hole, (rows, columns), label in list(enclosed_regions(labels)):
        labels[rows, columns][hole] = label


def labels_from_mask(mask: np.ndarray, parameters: InstanceConfig | None = None) -> np.ndarray:
    """Instance labels from a binary mask (nonzero = nucleus), split as the ``mask`` head's."""
    return instance_labels(np.asarray(mask).astype(bool).astype(np.float32), None, parameters)


def contour_target(labels: np.ndarray) -> np.ndarray:
    """The contour target of an instance label image: the nucleus pixels with an 8-neighbour of
    another label or of the background (so touching nuclei are parted by a 2-px band)."""
    labels = np.asarray(labels)
    as_float = labels.astype(np.float32)
    larger = cv2.dilate(as_float, HOLE_RING, borderType=cv2.BORDER_REPLICATE)
    smaller = cv2.erode(as_float, HOLE_RING, borderType=cv2.BORDER_REPLICATE)
    return (labels > 0) & ((larger != as_float) | (smaller != as_float))
