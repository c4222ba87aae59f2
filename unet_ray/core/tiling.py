"""Tile geometry and stitching for large images. No I/O, no Ray.

A plan cuts an image of ``height x width`` into network-sized windows and says which part of each
window's prediction is kept (its *core*); the cores partition the image exactly, so stitching the
kept cores of an identity predictor returns the input unchanged.

Two schemes:

* ``default`` (context ``"image"``): the image is reflect-padded to the next multiple of
  ``SIZE_MULTIPLE`` (exactly what whole-image inference does) and covered by ``tile``-sized
  windows whose starts lie on the network's pooling grid (multiples of ``SIZE_MULTIPLE`` in the
  padded frame). Neighbouring windows overlap by at least ``2 * margin`` and each keeps the part
  nearer its own centre, so every kept pixel sees at least ``margin`` pixels of real image context
  (or the image border). The number of windows per axis is the fewest that ``tile``-sized windows
  need; the windows are then shortened to the shortest grid multiple that still covers the axis
  (``shortest_window``), so an image just over a core's multiple does not pay for a mostly
  redundant last window. With tile 512 and margin 32 a large image costs about
  (512 / 448)^2 = 1.31 computed pixels per output pixel (1.31-1.43 for square sides of
  1344-6000 px, as the window count is whole). Images smaller than a tile become one
  window of the padded size, i.e. whole-image inference.
* ``reference`` (context ``"tile"``): the reference report's scheme. The image is cut into
  128 x 128 cores, each core is reflect-padded *by itself* to 256 x 256 (no neighbouring
  context) and only the centre is kept: 4 computed pixels per output pixel.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from unet_ray.core.config import SIZE_MULTIPLE

IMAGE_CONTEXT = "image"  # windows read real neighbouring pixels; reflect only beyond the image
TILE_CONTEXT = "tile"  # each core is reflect-padded by itself (the reference report's scheme)
CONTEXTS = (IMAGE_CONTEXT, TILE_CONTEXT)

REFERENCE_TILE = 256  # report: the network input side
REFERENCE_CORE = 128  # report: the kept centre of each padded tile
REFERENCE_MARGIN = (REFERENCE_TILE - REFERENCE_CORE) // 2


@dataclass(frozen=True)
class AxisSpan:
    """One window along one axis, in image coordinates (stop exclusive)."""

    window_start: int  # may be negative or run past the image: that part is reflect-padded
    window_stop: int
    core_start: int  # the kept part; the cores of an axis partition [0, size)
    core_stop: int
    source_start: int  # the image pixels read into the window
    source_stop: int

    @property
    def pad_before(self) -> int:
        return self.source_start - self.window_start

    @property
    def pad_after(self) -> int:
        return self.window_stop - self.source_stop


@dataclass(frozen=True)
class TileSpec:
    """One tile: the rows and columns of its window, kept core and read source."""

    rows: AxisSpan
    columns: AxisSpan

    @property
    def core_slices(self) -> tuple[slice, slice]:
        """Where the core lies in the image."""
        return slice(self.rows.core_start, self.rows.core_stop), slice(
            self.columns.core_start, self.columns.core_stop
        )

    @property
    def core_in_window(self) -> tuple[slice, slice]:
        """Where the core lies in the window (the network's prediction for this tile)."""
        top = self.rows.core_start - self.rows.window_start
        left = self.columns.core_start - self.columns.window_start
        return slice(top, top + self.rows.core_stop - self.rows.core_start), slice(
            left, left + self.columns.core_stop - self.columns.core_start
        )


@dataclass(frozen=True)
class TilePlan:
    """All tiles of one image; every window has ``window_shape``."""

    height: int
    width: int
    window_shape: tuple[int, int]
    tiles: tuple[TileSpec, ...]

    @property
    def computed_pixels_per_output_pixel(self) -> float:
        """Network input pixels per image pixel: the scheme's cost (1.0 is the ideal)."""
        window_pixels = self.window_shape[0] * self.window_shape[1]
        return len(self.tiles) * window_pixels / (self.height * self.width)


def round_up(value: int, multiple: int = SIZE_MULTIPLE) -> int:
    return -(-value // multiple) * multiple


def check_tile_geometry(tile: int, margin: int) -> None:
    """Raise ValueError, with a fix, for a tile/margin pair no plan can use."""
    if tile <= 0 or tile % SIZE_MULTIPLE:
        nearest = max(SIZE_MULTIPLE, round(tile / SIZE_MULTIPLE) * SIZE_MULTIPLE)
        raise ValueError(
            f"tile={tile} must be a positive multiple of {SIZE_MULTIPLE}; try {nearest}"
        )
    if margin < 0:
        raise ValueError(f"overlap/margin={margin} must not be negative")
    if tile - 2 * margin < SIZE_MULTIPLE:
        largest = (tile - SIZE_MULTIPLE) // 2
        raise ValueError(
            f"overlap/margin={margin} leaves a core of {tile - 2 * margin} px in a {tile}-px tile; "
            f"use a margin of at most {largest} or a larger tile"
        )


def plan_axis_image_context(size: int, tile: int, margin: int) -> list[AxisSpan]:
    """Windows on the pooling grid of the image padded to a multiple of ``SIZE_MULTIPLE``."""
    padded = round_up(size)
    offset = (padded - size) // 2  # whole-image inference pads the same way
    if padded <= tile:
        return [_span(-offset, padded - offset, 0, size, size)]
    count = 1 + math.ceil((padded - tile) / largest_grid_step(tile, margin))
    window = shortest_window(padded, count, tile, margin)
    travel_units = (padded - window) // SIZE_MULTIPLE
    starts = [
        SIZE_MULTIPLE * (index * travel_units // (count - 1)) - offset for index in range(count)
    ]
    boundaries = [0]
    for start, next_start in itertools.pairwise(starts):
        boundaries.append((next_start + start + window) // 2)  # middle of the overlap
    boundaries.append(size)
    return [
        _span(start, start + window, max(0, low), min(size, high), size)
        for start, low, high in zip(starts, boundaries[:-1], boundaries[1:], strict=True)
    ]


def largest_grid_step(window: int, margin: int) -> int:
    """The largest start-to-start step on the grid that keeps ``2 * margin`` of overlap."""
    return ((window - 2 * margin) // SIZE_MULTIPLE) * SIZE_MULTIPLE


def shortest_window(padded: int, count: int, tile: int, margin: int) -> int:
    """The shortest window (a grid multiple, at most ``tile``) with which ``count`` windows on
    the grid still cover ``padded`` pixels with ``2 * margin`` of overlap: e.g. 896 px takes two
    480-px windows instead of two 512-px ones (1.07 instead of 1.14 computed pixels per image
    pixel along that axis). The candidates start at the shortest grid multiple that still allows
    a step of one grid unit."""
    for window in range(round_up(2 * margin + SIZE_MULTIPLE), tile + 1, SIZE_MULTIPLE):
        if (count - 1) * largest_grid_step(window, margin) + window >= padded:
            return window
    return tile


def plan_axis_tile_context(size: int, tile: int, core: int) -> list[AxisSpan]:
    """Cores of ``core`` pixels from 0, each centred in a ``tile`` window padded from itself."""
    spans = []
    for core_start in range(0, size, core):
        core_stop = min(core_start + core, size)
        window_start = core_start - (tile - (core_stop - core_start)) // 2
        spans.append(
            AxisSpan(
                window_start, window_start + tile, core_start, core_stop, core_start, core_stop
            )
        )
    return spans


def _span(window_start: int, window_stop: int, core_start: int, core_stop: int, size: int):
    return AxisSpan(
        window_start,
        window_stop,
        core_start,
        core_stop,
        max(0, window_start),
        min(size, window_stop),
    )


def plan_tiles(
    height: int, width: int, tile: int, margin: int, context: str = IMAGE_CONTEXT
) -> TilePlan:
    """Plan the tiles of a ``height x width`` image (see the module docstring for the schemes)."""
    if height < 1 or width < 1:
        raise ValueError(f"cannot tile an empty image of {height}x{width} pixels")
    check_tile_geometry(tile, margin)
    if context == IMAGE_CONTEXT:
        row_spans = plan_axis_image_context(height, tile, margin)
        column_spans = plan_axis_image_context(width, tile, margin)
    elif context == TILE_CONTEXT:
        core = tile - 2 * margin
        row_spans = plan_axis_tile_context(height, tile, core)
        column_spans = plan_axis_tile_context(width, tile, core)
    else:
        raise ValueError(f"tiling context '{context}' is not one of {CONTEXTS}")
    window_shape = (_window_length(row_spans[0]), _window_length(column_spans[0]))
    tiles = tuple(TileSpec(rows, columns) for rows in row_spans for columns in column_spans)
    return TilePlan(height, width, window_shape, tiles)


def _window_length(span: AxisSpan) -> int:
    return span.window_stop - span.window_start


def plan_for_scheme(height: int, width: int, scheme: str, tile: int, overlap: int) -> TilePlan:
    """The plan of a named scheme: ``default`` uses ``tile``/``overlap``; ``reference`` is fixed."""
    if scheme == "reference":
        return plan_tiles(height, width, REFERENCE_TILE, REFERENCE_MARGIN, TILE_CONTEXT)
    if scheme == "default":
        return plan_tiles(height, width, tile, overlap, IMAGE_CONTEXT)
    raise ValueError(f"tiling scheme '{scheme}' is not one of ('default', 'reference')")


def plan_whole_image(height: int, width: int) -> TilePlan:
    """One window: the whole image reflect-padded to multiples of ``SIZE_MULTIPLE``."""
    return plan_tiles(height, width, round_up(max(height, width)), 0, IMAGE_CONTEXT)


def pad_reflect(array: np.ndarray, pad_rows: tuple[int, int], pad_columns: tuple[int, int]):
    """Mirror-pad the first two axes by any amount, also past the array's own size.

    ``np.pad(mode="reflect")`` reflects repeatedly for large pads but cannot reflect an axis of
    length 1, so such an axis is repeated instead (a 1x1 image becomes a flat tile).
    """
    widths = [pad_rows, pad_columns] + [(0, 0)] * (array.ndim - 2)
    if not any(pad_rows) and not any(pad_columns):
        return array
    for axis in (0, 1):
        if array.shape[axis] == 1 and any(widths[axis]):
            axis_widths = [(0, 0)] * array.ndim
            axis_widths[axis] = widths[axis]
            array = np.pad(array, axis_widths, mode="edge")
            widths[axis] = (0, 0)
    return np.pad(array, widths, mode="reflect")


def extract_tile(image: np.ndarray, spec: TileSpec) -> np.ndarray:
    """The window of ``spec`` from ``image`` (H x W or H x W x C), reflect-padded where needed."""
    rows, columns = spec.rows, spec.columns
    source = image[rows.source_start : rows.source_stop, columns.source_start : columns.source_stop]
    return pad_reflect(
        source, (rows.pad_before, rows.pad_after), (columns.pad_before, columns.pad_after)
    )


def place_tile(output: np.ndarray, prediction: np.ndarray, spec: TileSpec) -> None:
    """Copy the kept core of one window's prediction into the stitched ``output``."""
    output[spec.core_slices] = prediction[spec.core_in_window]


def stitch(predictions: Iterable[np.ndarray], plan: TilePlan, dtype=None) -> np.ndarray:
    """Assemble one prediction per tile (in ``plan.tiles`` order) into a full-size map."""
    predictions = list(predictions)
    if len(predictions) != len(plan.tiles):
        raise ValueError(
            f"stitch got {len(predictions)} predictions for a plan of {len(plan.tiles)} tiles"
        )
    extra_shape = predictions[0].shape[2:]
    output = np.empty((plan.height, plan.width, *extra_shape), dtype=dtype or predictions[0].dtype)
    for prediction, spec in zip(predictions, plan.tiles, strict=True):
        place_tile(output, prediction, spec)
    return output


def batch_tiles(plan: TilePlan, batch_size: int) -> Iterable[Sequence[TileSpec]]:
    """The plan's tiles in consecutive groups of at most ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    for start in range(0, len(plan.tiles), batch_size):
        yield plan.tiles[start : start + batch_size]


def predict_tiled(
    image: np.ndarray,
    plan: TilePlan,
    predict_batch: Callable[[np.ndarray], np.ndarray],
    batch_size: int,
) -> np.ndarray:
    """Run ``predict_batch`` (N x h x w x 3 windows -> N x h x w, or N x C x h x w) over the
    plan, one batch at a time, stitching into one preallocated float32 map (H x W, or
    C x H x W: each channel contiguous) so no more than a batch of windows is held."""
    output = None
    for specs in batch_tiles(plan, batch_size):
        windows = np.stack([extract_tile(image, spec) for spec in specs])
        predictions = predict_batch(windows)
        if output is None:
            channels = predictions.shape[1:-2]
            output = np.empty((*channels, plan.height, plan.width), dtype=np.float32)
        for prediction, spec in zip(predictions, specs, strict=True):
            output[(..., *spec.core_slices)] = prediction[(..., *spec.core_in_window)]
    return output
