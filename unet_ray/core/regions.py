"""Whole-slide geometry: boxes, regions with a halo, tissue on the overview, nucleus ownership.

Pure arrays and integers, no slide and no model: ``unet_ray.io.slide_reader`` reads what these
boxes name, ``unet_ray.pipelines.slides`` runs the regions. As StarDist's ``big.py`` does for
``predict_instances_big``: a slide is the whole-image path applied per region, plus this
geometry (each nucleus belongs to the one region whose core holds its centroid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

OVERVIEW_MAX_SIDE = 1024  # longest side of the low-resolution overview (tissue mask, overlay)


TISSUE_MIN_SATURATION = 0.05  # below this (HSV S in 0..1) a pixel is never tissue
TISSUE_DILATION = 2  # overview pixels the tissue mask grows by (edges of small fragments)
TISSUE_SMOOTHING = 5  # median filter side on the saturation before Otsu (pen dust, noise)


@dataclass(frozen=True)
class Box:
    """Rows [top, bottom) and columns [left, right) of the frame."""

    top: int
    bottom: int
    left: int
    right: int

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def is_empty(self) -> bool:
        return self.height <= 0 or self.width <= 0

    def grow(self, margin: int, height: int, width: int) -> Box:
        """This box grown by ``margin`` on each side, clipped to a ``height x width`` frame."""
        return Box(
            max(0, self.top - margin),
            min(height, self.bottom + margin),
            max(0, self.left - margin),
            min(width, self.right + margin),
        )

    def intersect(self, other: Box) -> Box:
        return Box(
            max(self.top, other.top),
            min(self.bottom, other.bottom),
            max(self.left, other.left),
            min(self.right, other.right),
        )

    def within(self, outer: Box) -> tuple[slice, slice]:
        """Where this box lies in an array covering ``outer``."""
        return (
            slice(self.top - outer.top, self.bottom - outer.top),
            slice(self.left - outer.left, self.right - outer.left),
        )


@dataclass(frozen=True)
class Region:
    row: int
    column: int
    core: Box  # the pixels this region owns (the cores partition the frame)
    window: Box  # core + halo: what is read and segmented
    spill: Box  # core + (halo - overlap): where the nuclei it owns may reach

    @property
    def key(self) -> str:
        return f"r{self.row:04d}_c{self.column:04d}"


def plan_regions(height: int, width: int, region: int, halo: int, spill: int) -> list[Region]:
    """Row-major regions of a ``height x width`` frame: ``region``-sided cores (the last row and
    column shorter) with their windows (``halo``) and spill boxes (``spill``), clipped."""
    regions = []
    for row, top in enumerate(range(0, height, region)):
        for column, left in enumerate(range(0, width, region)):
            core = Box(top, min(height, top + region), left, min(width, left + region))
            regions.append(
                Region(
                    row,
                    column,
                    core,
                    core.grow(halo, height, width),
                    core.grow(spill, height, width),
                )
            )
    return regions


def overview_shape(height: int, width: int, max_side: int = OVERVIEW_MAX_SIDE) -> tuple[int, int]:
    """An overview of at most ``max_side`` px on its longer side (never larger than the frame)."""
    factor = max(1.0, max(height, width) / max_side)
    return max(1, round(height / factor)), max(1, round(width / factor))


def tissue_mask(overview: np.ndarray) -> np.ndarray | None:
    """Tissue pixels of an RGB overview: saturation above its Otsu threshold (and above
    ``TISSUE_MIN_SATURATION``), slightly grown. None when the slide has no colour contrast
    (grayscale or fluorescence): then nothing can be told apart and nothing is skipped."""
    import cv2
    from skimage.filters import threshold_otsu

    hsv = cv2.cvtColor(overview, cv2.COLOR_RGB2HSV)
    saturation = cv2.medianBlur(hsv[:, :, 1], TISSUE_SMOOTHING).astype(np.float32) / 255.0
    if saturation.max() < TISSUE_MIN_SATURATION or saturation.min() == saturation.max():
        return None
    threshold = max(float(threshold_otsu(saturation)), TISSUE_MIN_SATURATION)
    mask = (saturation > threshold).astype(np.uint8)
    kernel = np.ones((2 * TISSUE_DILATION + 1,) * 2, dtype=np.uint8)
    return cv2.dilate(mask, kernel).astype(bool)


def region_has_tissue(mask: np.ndarray, core: Box, frame_height: int, frame_width: int) -> bool:
    """Whether the overview ``mask`` shows tissue inside ``core`` (frame coordinates)."""
    scale_y, scale_x = mask.shape[0] / frame_height, mask.shape[1] / frame_width
    top, left = math.floor(core.top * scale_y), math.floor(core.left * scale_x)
    bottom = max(top + 1, math.ceil(core.bottom * scale_y))
    right = max(left + 1, math.ceil(core.right * scale_x))
    return bool(mask[top:bottom, left:right].any())


def centroids(labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) centroid of labels 1..count in pixel-centre coordinates (index + 0.5),
    summed band by band so no coordinate grid of the window's size is built."""
    sums_y = np.zeros(count + 1)
    sums_x = np.zeros(count + 1)
    areas = np.zeros(count + 1)
    columns = np.arange(labels.shape[1], dtype=np.float64)
    band = 256
    for start in range(0, labels.shape[0], band):
        rows = labels[start : start + band]
        flat = rows.ravel()
        areas += np.bincount(flat, minlength=count + 1)
        row_index = np.repeat(
            np.arange(start, start + rows.shape[0], dtype=np.float64), rows.shape[1]
        )
        sums_y += np.bincount(flat, weights=row_index, minlength=count + 1)
        sums_x += np.bincount(flat, weights=np.tile(columns, rows.shape[0]), minlength=count + 1)
    areas[0] = 1
    return sums_y / areas + 0.5, sums_x / areas + 0.5


def keep_owned_nuclei(
    labels: np.ndarray, region: Region, frame_height: int, frame_width: int
) -> tuple[np.ndarray, int]:
    """The nuclei whose centroid lies in ``region.core``, relabelled 1..K, on the spill box;
    and how many of them reach past it (cut: the halo was smaller than that nucleus)."""
    count = int(labels.max()) if labels.size else 0
    spill_slices = region.spill.within(region.window)
    if count == 0:
        return np.zeros((region.spill.height, region.spill.width), dtype=np.uint32), 0
    centre_y, centre_x = centroids(labels, count)
    centre_y += region.window.top
    centre_x += region.window.left
    core = region.core
    owned = (centre_y >= core.top) & (centre_y < core.bottom)
    owned &= (centre_x >= core.left) & (centre_x < core.right)
    owned[0] = False
    lookup = np.zeros(count + 1, dtype=np.uint32)
    lookup[owned] = np.arange(1, int(owned.sum()) + 1, dtype=np.uint32)
    kept = lookup[labels[spill_slices]]
    outside = np.ones(labels.shape, dtype=bool)
    outside[spill_slices] = False
    cut = len(np.unique(lookup[labels[outside]])) - 1 if outside.any() else 0
    return kept, max(0, cut)
