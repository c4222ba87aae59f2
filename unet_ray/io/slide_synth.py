"""Synthetic pyramidal slides (tiled, compressed OME-TIFF; Leica SCN for a bounded slide) for the
slide tests and benchmark.

A slide is a plain background with synthetic H&E tissue patches (``unet_ray.io.synth``) pasted on
it; it is written tile by tile, every level from the patches, so a 16k x 16k slide never exists
in memory as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unet_ray.io.synth import generate_sample

BACKGROUND = (242, 240, 244)  # glass: bright and nearly unsaturated
SLIDE_TILE = 256
PATCH_SIDE = 512  # tissue is drawn in synthetic samples of at most this side
SMALLEST_LEVEL_SIDE = 512  # levels are halved until the longer side is at most this


@dataclass(frozen=True)
class Patch:
    top: int
    left: int
    pixels: np.ndarray  # H x W x 3 uint8


def tissue_patches(
    boxes: list[tuple[int, int, int, int]], seed: int = 0, style: str = "he"
) -> list[Patch]:
    """Synthetic tissue filling each (top, left, height, width) box, in samples of at most
    ``PATCH_SIDE`` px."""
    rng = np.random.default_rng(seed)
    patches = []
    for top, left, height, width in boxes:
        for row in range(top, top + height, PATCH_SIDE):
            for column in range(left, left + width, PATCH_SIDE):
                side_y = min(PATCH_SIDE, top + height - row)
                side_x = min(PATCH_SIDE, left + width - column)
                pixels = generate_sample(rng, side_y, side_x, style)[0]
                patches.append(Patch(row, column, pixels))
    return patches


def level_patches(patches: list[Patch], factor: int) -> list[Patch]:
    """The patches of a level ``factor`` times smaller (area averaging)."""
    import cv2

    if factor == 1:
        return patches
    reduced = []
    for patch in patches:
        top, left = patch.top // factor, patch.left // factor
        bottom = -(-(patch.top + patch.pixels.shape[0]) // factor)
        right = -(-(patch.left + patch.pixels.shape[1]) // factor)
        pixels = cv2.resize(
            patch.pixels, (right - left, bottom - top), interpolation=cv2.INTER_AREA
        )
        reduced.append(Patch(top, left, pixels))
    return reduced


def render_tile(patches: list[Patch], top: int, left: int, tile: int) -> np.ndarray:
    out = np.empty((tile, tile, 3), dtype=np.uint8)
    out[:] = BACKGROUND
    for patch in patches:
        height, width = patch.pixels.shape[:2]
        y0, y1 = max(top, patch.top), min(top + tile, patch.top + height)
        x0, x1 = max(left, patch.left), min(left + tile, patch.left + width)
        if y1 > y0 and x1 > x0:
            out[y0 - top : y1 - top, x0 - left : x1 - left] = patch.pixels[
                y0 - patch.top : y1 - patch.top, x0 - patch.left : x1 - patch.left
            ]
    return out


def level_tiles(patches: list[Patch], height: int, width: int, tile: int):
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            yield render_tile(patches, top, left, tile)


def write_synthetic_slide(
    path: str,
    height: int,
    width: int,
    patches: list[Patch],
    mpp: float | None = 0.5,
    tile: int = SLIDE_TILE,
    compression: str = "zlib",
) -> int:
    """Write a tiled pyramidal OME-TIFF of ``height x width`` RGB px: background plus
    ``patches``; levels halve down to ``SMALLEST_LEVEL_SIDE``. Returns the number of levels."""
    import tifffile

    factors = [1]
    while max(height, width) // (factors[-1] * 2) >= SMALLEST_LEVEL_SIDE:
        factors.append(factors[-1] * 2)
    resolution = {}
    metadata = {"axes": "YXS"}
    if mpp:
        metadata.update(PhysicalSizeX=mpp, PhysicalSizeY=mpp)
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tiff:
        for index, factor in enumerate(factors):
            level_height, level_width = -(-height // factor), -(-width // factor)
            if mpp:
                resolution = {
                    "resolution": (1e4 / (mpp * factor), 1e4 / (mpp * factor)),
                    "resolutionunit": "CENTIMETER",
                }
            options = (
                {"subifds": len(factors) - 1, "metadata": metadata}
                if index == 0
                else {"subfiletype": 1}
            )
            tiff.write(
                level_tiles(level_patches(patches, factor), level_height, level_width, tile),
                shape=(level_height, level_width, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                **resolution,
                **options,
            )
    return len(factors)


SCN_NAMESPACE = "http://www.leica-microsystems.com/scn/2010/10/01"
SCN_MACRO_FACTOR = 16  # the macro image (the whole glass) is this much smaller than level 0
NM_PER_UM = 1000


def write_leica_scn(
    path: str,
    height: int,
    width: int,
    bounds: tuple[int, int, int, int],
    patches: list[Patch],
    mpp: float = 0.5,
    tile: int = SLIDE_TILE,
) -> int:
    """Write a Leica SCN slide: a ``height x width`` (level-0 px) glass whose scanned image
    covers only ``bounds`` = (x, y, width, height), as Leica scanners write it. OpenSlide and
    tiffslide report that area as the slide's bounds (``openslide.bounds-*``,
    ``tiffslide.bounds-*``); level 0 is the whole glass, empty outside the bounds, and QuPath
    crops to them. ``patches`` are placed relative to the scanned image. The scanned image is a
    pyramid halved down to ``SMALLEST_LEVEL_SIDE`` (at least two levels); returns their number."""
    import tifffile

    left, top, image_width, image_height = bounds
    nm = round(mpp * NM_PER_UM)  # nanometres per level-0 pixel
    factors = [1, 2]  # a scanner writes a pyramid (tiffslide reads an SCN of one level wrong)
    while max(image_height, image_width) // (factors[-1] * 2) >= SMALLEST_LEVEL_SIDE:
        factors.append(factors[-1] * 2)
    macro_height, macro_width = -(-height // SCN_MACRO_FACTOR), -(-width // SCN_MACRO_FACTOR)
    dimensions = "".join(
        f'<dimension sizeX="{-(-image_width // factor)}" sizeY="{-(-image_height // factor)}" '
        f'r="{index}" ifd="{index + 1}"/>'
        for index, factor in enumerate(factors)
    )
    images = [
        scn_image("macro", 0.0, macro_width, macro_height, width * nm, height * nm, 0, 0, 0, ""),
        scn_image(
            "main",
            20.0,
            image_width,
            image_height,
            image_width * nm,
            image_height * nm,
            left * nm,
            top * nm,
            None,
            dimensions,
        ),
    ]
    description = (
        f'<?xml version="1.0" encoding="utf-8"?>\n<scn xmlns="{SCN_NAMESPACE}">'
        f'<collection name="synthetic" sizeX="{width * nm}" sizeY="{height * nm}">'
        f"{''.join(images)}</collection></scn>"
    )
    with tifffile.TiffWriter(path, bigtiff=True) as tiff:
        macro = np.empty((macro_height, macro_width, 3), dtype=np.uint8)
        macro[:] = BACKGROUND
        tiff.write(macro, photometric="rgb", description=description, metadata=None)
        for factor in factors:
            level_height, level_width = -(-image_height // factor), -(-image_width // factor)
            tiff.write(
                level_tiles(level_patches(patches, factor), level_height, level_width, tile),
                shape=(level_height, level_width, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="zlib",
                metadata=None,
            )
    return len(factors)


def scn_image(
    name: str,
    objective: float,
    width: int,
    height: int,
    view_width_nm: int,
    view_height_nm: int,
    offset_x_nm: int,
    offset_y_nm: int,
    ifd: int | None,
    dimensions: str,
) -> str:
    """One ``<image>`` of an SCN collection: its pixels (``dimensions``, or one level at
    ``ifd``) and where it lies on the glass (its view, in nanometres)."""
    if ifd is not None:
        dimensions = f'<dimension sizeX="{width}" sizeY="{height}" r="0" ifd="{ifd}"/>'
    return (
        f'<image name="{name}"><creationDate>2026-01-01T00:00:00.00Z</creationDate>'
        '<device model="Leica SCN400;Leica SCN" version="1.5.1.10864"/>'
        f'<pixels sizeX="{width}" sizeY="{height}">{dimensions}</pixels>'
        f'<view sizeX="{view_width_nm}" sizeY="{view_height_nm}" offsetX="{offset_x_nm}" '
        f'offsetY="{offset_y_nm}" spacingZ="0"/>'
        f"<scanSettings><objectiveSettings><objective>{objective}</objective>"
        "</objectiveSettings><illuminationSettings><numericalAperture>0.4</numericalAperture>"
        "<illuminationSource>brightfield</illuminationSource></illuminationSettings>"
        "</scanSettings></image>"
    )
