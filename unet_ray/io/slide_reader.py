"""Whole-slide reading: window by window, never a whole slide. No Ray, no model.

``SlideReader`` opens a pyramidal or tiled TIFF, OME-TIFF, SVS, NDPI, ... through ``tiffslide``
(local or s3:// through fsspec), or through OpenSlide where the ``[slides]`` extra is installed.
``read_frame_window`` reads a box of the *frame* (the slide at the resolution segmented) from the
finest pyramid level that suffices and resamples it; ``read_overview`` gives the low-resolution
overview the tissue mask and the overlay use. The frame covers the slide's ``extent``: all of
level 0, or a bounded slide's bounds (``openslide.bounds-*``: the scanned part of the glass,
which QuPath crops to), so nothing outside the scan is read and the frame's origin is QuPath's. Slides of more than 8 bits are scaled to RGB uint8
with one percentile range per slide (``slide_intensity_range``), the whole-image path's rule.
"""

from __future__ import annotations

import logging
import math
from pathlib import PurePosixPath

import numpy as np

from unet_ray.core.regions import (
    Box,
)
from unet_ray.io.files import fsspec_filesystem, is_s3, local_path
from unet_ray.io.images import (
    PERCENTILE_SAMPLE_PIXELS,
    ImageReadError,
    normalisation_range,
    scale_to_uint8,
)

logger = logging.getLogger(__name__)

OVERVIEW_BLOCK = 4096  # level pixels read at a time when the overview comes from a big level


LEVEL_TOLERANCE = 1.01  # a level up to 1 % coarser than the frame is still read (rounding)


OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide")
TIFF_SUFFIXES = (".tif", ".tiff")
SLIDE_SUFFIXES = OPENSLIDE_SUFFIXES  # listed as inputs besides IMAGE_SUFFIXES


INTENSITY_SAMPLE_SIDE = 2048  # 16-bit/float slides: percentiles from the coarsest level this large
INTENSITY_BLOCK = 512  # ... read in blocks of this side (a damaged tile loses only its block)


class SlideReader:
    """Windows of a slide (``tiffslide``, or OpenSlide for the formats only it reads).

    Local paths and ``s3://`` URIs (through fsspec/s3fs, ``AWS_ENDPOINT_URL`` honoured); pixels
    come back as RGB uint8 arrays (grayscale repeated, alpha dropped). A slide of other pixel
    types (16-bit, float) is scaled to 8 bits with ``intensity``, the (low, high) range of the
    whole slide (``slide_intensity_range``), so every region of it is scaled alike."""

    def __init__(self, uri: str, intensity: tuple[float, float] | list[float] | None = None):
        self.uri = str(uri)
        self.intensity = tuple(intensity) if intensity is not None else None
        self._file = None
        self._slide = open_slide_backend(self.uri, self)
        self._is_openslide = type(self._slide).__module__.startswith("openslide")
        self.level_dimensions = [tuple(size) for size in self._slide.level_dimensions]
        self.level_downsamples = [float(factor) for factor in self._slide.level_downsamples]
        self.width, self.height = self.level_dimensions[0]
        self.mpp = slide_mpp(self._slide.properties)
        self.bounds = slide_bounds(self._slide.properties, self.width, self.height)

    @property
    def extent(self) -> tuple[int, int, int, int]:
        """(x, y, width, height) on level 0 of what is segmented: the bounds, else all of it."""
        return self.bounds if self.bounds is not None else (0, 0, self.width, self.height)

    def read(self, level: int, left: int, top: int, width: int, height: int) -> np.ndarray:
        """``height x width`` RGB uint8 pixels of ``level`` whose top-left corner is (``left``,
        ``top``) in level-0 pixels; outside the slide is padded (tiffslide: zeros)."""
        return to_rgb(self.read_raw(level, left, top, width, height), self.uri, self.intensity)

    @property
    def dtype(self) -> np.dtype:
        """The slide's pixel type, from its metadata (OpenSlide: always 8-bit RGBA)."""
        if self._is_openslide:
            return np.dtype(np.uint8)
        try:
            store = self._slide.ts_zarr_grp  # a zarr group of the levels, or one array
            return np.dtype((store if hasattr(store, "dtype") else store["0"]).dtype)
        except Exception:  # a layout without that view: one pixel tells
            last = len(self.level_dimensions) - 1
            return self.read_raw(last, 0, 0, 1, 1).dtype

    def read_raw(self, level: int, left: int, top: int, width: int, height: int) -> np.ndarray:
        """As ``read``, in the slide's own pixel type and channels."""
        try:
            if self._is_openslide:  # a PIL image, RGBA
                pixels = np.asarray(self._slide.read_region((left, top), level, (width, height)))
            else:
                pixels = self._slide.read_region((left, top), level, (width, height), as_array=True)
        except Exception as error:
            raise ImageReadError(
                f"{self.uri}: cannot read the {width}x{height} window at ({left}, {top}) of level "
                f"{level}: {type(error).__name__}: {error}"
            ) from error
        return np.asarray(pixels)

    def close(self) -> None:
        self._slide.close()
        if self._file is not None:
            self._file.close()


def open_slide_backend(uri: str, reader: SlideReader):
    """A ``tiffslide.TiffSlide`` (any source), else an ``openslide.OpenSlide`` (local files)."""
    import tiffslide

    try:
        if is_s3(uri):
            filesystem, path = fsspec_filesystem(uri)
            reader._file = filesystem.open(path, "rb")
            return tiffslide.TiffSlide(reader._file)
        return tiffslide.TiffSlide(local_path(uri))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{uri}: no such file") from error
    except Exception as tiff_error:
        if reader._file is not None:
            reader._file.close()
            reader._file = None
        try:
            import openslide
        except ImportError:
            raise ImageReadError(
                f"{uri}: not a slide tiffslide can read ({type(tiff_error).__name__}: "
                f"{tiff_error}); for other formats install the extra: pip install "
                "'unet_ray[slides]' (openslide-python, openslide-bin)"
            ) from tiff_error
        if is_s3(uri):
            raise ImageReadError(
                f"{uri}: tiffslide cannot read it ({tiff_error}) and OpenSlide reads local files "
                "only: copy the slide to a local disk"
            ) from tiff_error
        try:
            return openslide.OpenSlide(local_path(uri))
        except Exception as error:
            raise ImageReadError(
                f"{uri}: neither tiffslide ({tiff_error}) nor OpenSlide ({error}) can read it"
            ) from error


def slide_mpp(properties) -> float | None:
    """Microns per pixel of level 0 (the mean of x and y) when the file says, else None."""
    values = []
    for key in ("tiffslide.mpp-x", "tiffslide.mpp-y", "openslide.mpp-x", "openslide.mpp-y"):
        try:
            value = float(properties.get(key) or 0)
        except (TypeError, ValueError):
            continue
        if value > 0:
            values.append(value)
    return float(np.mean(values)) if values else None


BOUNDS_KEYS = ("bounds-x", "bounds-y", "bounds-width", "bounds-height")
BOUNDS_PREFIXES = ("openslide.", "tiffslide.")  # OpenSlide's names, then tiffslide's


def slide_bounds(properties, width: int, height: int) -> tuple[int, int, int, int] | None:
    """(x, y, width, height) of a bounded slide's non-empty area on level 0, as OpenSlide
    (``openslide.bounds-*``) or tiffslide (``tiffslide.bounds-*``) reports it (Leica SCN, MIRAX,
    ...); QuPath crops such a slide to its bounds, so its (0, 0) is level-0 (x, y). None when
    the slide states no bounds or they cover it whole."""
    for prefix in BOUNDS_PREFIXES:
        try:
            values = [properties.get(prefix + key) for key in BOUNDS_KEYS]
            if any(value in (None, "") for value in values[:2]):
                continue
            x, y = int(float(values[0])), int(float(values[1]))
            bounds_width = int(float(values[2])) if values[2] not in (None, "") else width - x
            bounds_height = int(float(values[3])) if values[3] not in (None, "") else height - y
        except (TypeError, ValueError):
            continue
        if (x, y, bounds_width, bounds_height) == (0, 0, width, height):
            return None
        return x, y, bounds_width, bounds_height
    return None


def rgb_channels(pixels: np.ndarray, uri: str) -> np.ndarray:
    """H x W x 3 in the slide's own pixel type: gray repeated, alpha dropped."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    elif pixels.shape[2] == 4:
        pixels = pixels[:, :, :3]
    if pixels.shape[2] != 3:
        raise ImageReadError(f"{uri}: {pixels.shape[2]} channels per pixel are unsupported")
    return pixels


def to_rgb(
    pixels: np.ndarray, uri: str, intensity: tuple[float, float] | None = None
) -> np.ndarray:
    """H x W x 3 uint8 from what a slide backend returns: 8-bit as it is; other pixel types
    scaled from the slide's ``intensity`` range (low, high) to 0..255, clipped."""
    pixels = rgb_channels(pixels, uri)
    if pixels.dtype == np.uint8:
        return np.ascontiguousarray(pixels)
    if pixels.dtype == bool:
        return pixels.astype(np.uint8) * 255
    if not (np.issubdtype(pixels.dtype, np.integer) or np.issubdtype(pixels.dtype, np.floating)):
        raise ImageReadError(f"{uri}: unsupported pixel type {pixels.dtype}")
    if intensity is None:
        raise ImageReadError(
            f"{uri}: {pixels.dtype} pixels and no intensity range to scale them with "
            "(slide_intensity_range gives it)"
        )
    return scale_to_uint8(pixels, *intensity)


def slide_intensity_range(reader: SlideReader) -> tuple[float, float] | None:
    """None for an 8-bit slide. Otherwise the (low, high) pixel values that map to 0 and 255:
    the same percentiles as for whole images (``normalisation_range``: 1st and 99.8th,
    joint over the channels), from the coarsest pyramid level at least
    ``INTENSITY_SAMPLE_SIDE`` px on its longer side, read block by block and sampled on a
    regular grid of about ``PERCENTILE_SAMPLE_PIXELS`` values. One range per slide, so all
    its regions are scaled alike (a coarser level is area-averaged, so its brightest pixels
    are a little dimmer than the full resolution's)."""
    if reader.dtype == np.uint8:
        return None
    scale = max(reader.extent[2:]) / INTENSITY_SAMPLE_SIDE
    level = best_level(reader.level_downsamples, max(1.0, scale))
    downsample = reader.level_downsamples[level]
    origin_x, origin_y, level_width, level_height = level_extent(reader, level)
    step = max(1, math.ceil(math.sqrt(level_width * level_height / PERCENTILE_SAMPLE_PIXELS)))
    block = max(step, INTENSITY_BLOCK // step * step)  # a multiple of the step: one regular grid
    samples, unreadable = [], []
    for top in range(0, level_height, block):
        for left in range(0, level_width, block):
            try:
                pixels = reader.read_raw(
                    level,
                    round((origin_x + left) * downsample),
                    round((origin_y + top) * downsample),
                    min(block, level_width - left),
                    min(block, level_height - top),
                )
            except ImageReadError as error:  # a damaged tile fails its region, not the slide
                unreadable.append(str(error))
                continue
            samples.append(rgb_channels(pixels, reader.uri)[::step, ::step].reshape(-1, 1, 3))
    if not samples:
        raise ImageReadError(f"{reader.uri}: no readable pixels: {unreadable[0]}")
    if unreadable:
        logger.warning(
            "%s: intensity range without %d unreadable block(s): %s",
            reader.uri,
            len(unreadable),
            unreadable[0],
        )
    return normalisation_range(np.concatenate(samples))


def level_extent(reader: SlideReader, level: int) -> tuple[int, int, int, int]:
    """The reader's ``extent`` in pixels of ``level``: (left, top, width, height), covering it
    (rounded outwards) and clipped to the level."""
    x, y, width, height = reader.extent
    downsample = reader.level_downsamples[level]
    level_width, level_height = reader.level_dimensions[level]
    left, top = math.floor(x / downsample), math.floor(y / downsample)
    right = min(level_width, math.ceil((x + width) / downsample))
    bottom = min(level_height, math.ceil((y + height) / downsample))
    return left, top, max(1, right - left), max(1, bottom - top)


def best_level(downsamples: list[float], scale: float) -> int:
    """The coarsest pyramid level no coarser than ``scale`` (level pixels per frame pixel)."""
    candidates = [
        index for index, factor in enumerate(downsamples) if factor <= scale * LEVEL_TOLERANCE
    ]
    return max(candidates, key=lambda index: downsamples[index]) if candidates else 0


def read_frame_window(reader: SlideReader, box: Box, scale: float) -> np.ndarray:
    """The frame's pixels in ``box`` (RGB uint8), where one frame pixel is ``scale`` level-0
    pixels and the frame starts at the reader's ``extent``: the best level is read and, unless
    it matches the frame, resampled (bilinear)."""
    import cv2

    level = best_level(reader.level_downsamples, scale)
    downsample = reader.level_downsamples[level]
    ratio = scale / downsample  # level pixels per frame pixel, in [1, 2) unless upsampling
    shift_x, shift_y = (offset / downsample for offset in reader.extent[:2])  # level pixels
    first_x, first_y = box.left * ratio + shift_x, box.top * ratio + shift_y  # in level pixels
    if abs(ratio - 1.0) < 1e-9 and first_x.is_integer() and first_y.is_integer():
        left, top = round(first_x * downsample), round(first_y * downsample)
        return reader.read(level, left, top, box.width, box.height)
    left, top = math.floor(first_x), math.floor(first_y)
    width = math.ceil(box.right * ratio + shift_x) - left + 1
    height = math.ceil(box.bottom * ratio + shift_y) - top + 1
    level_width, level_height = reader.level_dimensions[level]
    width, height = min(width, level_width - left), min(height, level_height - top)
    source = reader.read(level, round(left * downsample), round(top * downsample), width, height)
    # frame pixel centre (c + 0.5) sits at level coordinate (c + 0.5) * ratio
    transform = np.array(
        [
            [ratio, 0.0, first_x - left + 0.5 * ratio - 0.5],
            [0.0, ratio, first_y - top + 0.5 * ratio - 0.5],
        ]
    )
    return cv2.warpAffine(
        source,
        transform,
        (box.width, box.height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )


def read_overview(reader: SlideReader, height: int, width: int) -> np.ndarray:
    """The slide's ``extent`` as a ``height x width`` RGB image (area-averaged), read block by
    block from the coarsest level that is still at least as fine, so no large level is held
    whole."""
    import cv2

    scale = min(reader.extent[2] / width, reader.extent[3] / height)
    level = best_level(reader.level_downsamples, scale)
    downsample = reader.level_downsamples[level]
    origin_x, origin_y, level_width, level_height = level_extent(reader, level)
    overview = np.zeros((height, width, 3), dtype=np.uint8)
    step_y, step_x = height / level_height, width / level_width  # overview px per level px
    for top in range(0, level_height, OVERVIEW_BLOCK):
        for left in range(0, level_width, OVERVIEW_BLOCK):
            bottom = min(level_height, top + OVERVIEW_BLOCK)
            right = min(level_width, left + OVERVIEW_BLOCK)
            out_top, out_bottom = round(top * step_y), round(bottom * step_y)
            out_left, out_right = round(left * step_x), round(right * step_x)
            if out_bottom <= out_top or out_right <= out_left:
                continue
            block = reader.read(
                level,
                round((origin_x + left) * downsample),
                round((origin_y + top) * downsample),
                right - left,
                bottom - top,
            )
            overview[out_top:out_bottom, out_left:out_right] = cv2.resize(
                block, (out_right - out_left, out_bottom - out_top), interpolation=cv2.INTER_AREA
            )
    return overview


def is_slide(uri: str, region: int) -> bool:
    """Whether an input goes the slide path: an OpenSlide-format suffix, or a TIFF with a side
    longer than one region (read by window, tiled or not). Unreadable TIFFs go the image path,
    whose error row names the problem."""
    name = PurePosixPath(str(uri)).name.lower()
    if name.endswith(OPENSLIDE_SUFFIXES):
        return True
    if not name.endswith(TIFF_SUFFIXES):
        return False
    import tifffile

    filesystem, path = fsspec_filesystem(uri)
    try:
        with filesystem.open(path, "rb") as handle, tifffile.TiffFile(handle) as tiff:
            page = tiff.series[0].levels[0] if tiff.series else tiff.pages[0]
            shape = page.shape
            axes = getattr(page, "axes", "YX")
    except Exception:
        return False
    sides = [size for axis, size in zip(axes, shape, strict=False) if axis in "YX"]
    return bool(sides) and max(sides) > region
