"""Tile geometry and stitching: identity round trips, coverage, context and cost of both schemes."""

from __future__ import annotations

import numpy as np
import pytest

from unet_ray.core.config import SIZE_MULTIPLE
from unet_ray.core.tiling import (
    IMAGE_CONTEXT,
    REFERENCE_CORE,
    REFERENCE_TILE,
    TILE_CONTEXT,
    batch_tiles,
    extract_tile,
    pad_reflect,
    plan_for_scheme,
    plan_tiles,
    plan_whole_image,
    predict_tiled,
    round_up,
    stitch,
)

ODD_SIZES = [(1, 1), (1, 7), (5, 3), (31, 33), (97, 250), (257, 513), (333, 1001)]
GEOMETRIES = [(64, 0), (64, 16), (96, 31), (128, 40), (256, 64), (512, 32)]


def unique_image(height: int, width: int, channels: int | None = 3) -> np.ndarray:
    """An image whose every value is distinct, so any misplaced pixel shows."""
    shape = (height, width) if channels is None else (height, width, channels)
    return np.arange(np.prod(shape), dtype=np.int64).reshape(shape)


@pytest.mark.parametrize("context", [IMAGE_CONTEXT, TILE_CONTEXT])
@pytest.mark.parametrize("tile, margin", GEOMETRIES)
@pytest.mark.parametrize("height, width", ODD_SIZES)
def test_identity_predictor_returns_the_input_exactly(height, width, tile, margin, context):
    image = unique_image(height, width)
    plan = plan_tiles(height, width, tile, margin, context)
    windows = [extract_tile(image, spec) for spec in plan.tiles]
    assert all(window.shape[:2] == plan.window_shape for window in windows)
    np.testing.assert_array_equal(stitch(windows, plan), image)


@pytest.mark.parametrize("scheme", ["default", "reference"])
def test_both_named_schemes_round_trip_a_grayscale_float_image(scheme):
    image = np.random.default_rng(0).random((700, 1030)).astype(np.float32)
    plan = plan_for_scheme(*image.shape, scheme, 512, 32)
    stitched = predict_tiled(image, plan, lambda windows: windows, batch_size=3)
    np.testing.assert_array_equal(stitched, image)


@pytest.mark.parametrize("context", [IMAGE_CONTEXT, TILE_CONTEXT])
@pytest.mark.parametrize("height, width", [(1, 1), (200, 901), (1100, 640)])
def test_cores_cover_every_pixel_exactly_once(height, width, context):
    plan = plan_tiles(height, width, 256, 48, context)
    coverage = np.zeros((height, width), dtype=np.int32)
    for spec in plan.tiles:
        coverage[spec.core_slices] += 1
    assert (coverage == 1).all()


@pytest.mark.parametrize("size", [1, 30, 95, 512, 513, 1000, 4000])
def test_image_context_windows_sit_on_the_pooling_grid_of_the_padded_image(size):
    plan = plan_tiles(size, size, 512, 32, IMAGE_CONTEXT)
    padding_before = (round_up(size) - size) // 2  # as whole-image inference pads
    for spec in plan.tiles:
        assert (spec.rows.window_start + padding_before) % SIZE_MULTIPLE == 0
        assert spec.rows.pad_before <= padding_before  # only the image border is ever padded
        assert spec.rows.window_stop - spec.rows.window_start == plan.window_shape[0]
    assert plan.window_shape[0] % SIZE_MULTIPLE == 0


@pytest.mark.parametrize("tile, margin", [(256, 32), (512, 32), (512, 100), (96, 20)])
def test_every_kept_pixel_has_at_least_margin_context_inside_the_image(tile, margin):
    height, width = 1500, 2333
    plan = plan_tiles(height, width, tile, margin, IMAGE_CONTEXT)
    for spec in plan.tiles:
        for span, size in ((spec.rows, height), (spec.columns, width)):
            if span.core_start > 0:  # an interior edge: real pixels must lie before the core
                assert span.core_start - span.window_start >= margin
            if span.core_stop < size:
                assert span.window_stop - span.core_stop >= margin


def test_reference_scheme_pads_each_core_from_itself_like_the_report():
    image = unique_image(300, 260, channels=None)
    plan = plan_for_scheme(300, 260, "reference", tile=512, overlap=32)
    assert plan.window_shape == (REFERENCE_TILE, REFERENCE_TILE)
    first = plan.tiles[0]
    assert first.core_slices == (slice(0, REFERENCE_CORE), slice(0, REFERENCE_CORE))
    for spec in plan.tiles:
        window = extract_tile(image, spec)
        core_values = image[spec.core_slices]
        assert np.isin(window, core_values).all()  # no pixel of a neighbouring core
        np.testing.assert_array_equal(window[spec.core_in_window], core_values)


def test_default_scheme_computes_far_fewer_pixels_than_the_reference():
    default = plan_for_scheme(4096, 4096, "default", 512, 32)
    reference = plan_for_scheme(4096, 4096, "reference", 512, 32)
    assert reference.computed_pixels_per_output_pixel == pytest.approx(4.0)
    assert default.computed_pixels_per_output_pixel < 1.4
    assert len(reference.tiles) == (4096 // REFERENCE_CORE) ** 2


@pytest.mark.parametrize("size", [513, 600, 896, 1000, 1344, 1500, 2333, 3000])
def test_windows_are_shortened_to_what_the_axis_needs(size):
    """As many windows as full tiles would need, each as short as still covers the axis: no
    plan costs more than with full tiles, and one grid step shorter would leave a gap."""
    tile, margin = 512, 32
    plan = plan_tiles(size, size, tile, margin, IMAGE_CONTEXT)
    window = plan.window_shape[0]
    full_count = 1 + -(-(round_up(size) - tile) // (tile - 2 * margin))
    assert window <= tile and int(len(plan.tiles) ** 0.5) == full_count
    shorter = window - SIZE_MULTIPLE
    step = (shorter - 2 * margin) // SIZE_MULTIPLE * SIZE_MULTIPLE
    assert (full_count - 1) * step + shorter < round_up(size)  # the shorter one cannot cover


def test_shortening_saves_the_redundant_part_of_the_last_window():
    assert plan_tiles(896, 896, 512, 32).window_shape == (480, 480)  # 2 x 480 covers 896
    assert plan_tiles(1000, 1000, 512, 32).window_shape == (384, 384)  # 3 x 384 covers 1024
    assert plan_tiles(1000, 1000, 512, 32).computed_pixels_per_output_pixel < 1.35  # was 2.36
    assert plan_tiles(1792, 1792, 512, 32).window_shape == (512, 512)  # nothing to save


def test_images_smaller_than_a_tile_become_one_padded_window():
    plan = plan_tiles(100, 60, 512, 32)
    assert len(plan.tiles) == 1
    assert plan.window_shape == (128, 64)
    assert plan == plan_whole_image(100, 60)
    one_pixel = plan_for_scheme(1, 1, "default", 512, 32)
    window = extract_tile(np.array([[[7, 8, 9]]], dtype=np.uint8), one_pixel.tiles[0])
    assert window.shape == (32, 32, 3)
    assert (window == [7, 8, 9]).all()


def test_pad_reflect_mirrors_past_the_array_size():
    row = np.array([[1, 2, 3]])
    padded = pad_reflect(row, (0, 0), (5, 5))
    np.testing.assert_array_equal(padded[0], [2, 1, 2, 3, 2, 1, 2, 3, 2, 1, 2, 3, 2])
    assert pad_reflect(row, (2, 1), (0, 0)).tolist() == [[1, 2, 3]] * 4  # a 1-row axis repeats


@pytest.mark.parametrize(
    "tile, margin, message",
    [(500, 32, "multiple of 32; try 512"), (256, 120, "at most 112"), (256, -1, "negative")],
)
def test_bad_geometry_fails_with_the_fix_in_the_message(tile, margin, message):
    with pytest.raises(ValueError, match=message):
        plan_tiles(100, 100, tile, margin)


def test_empty_image_and_unknown_scheme_are_refused():
    with pytest.raises(ValueError, match="empty image"):
        plan_tiles(0, 10, 256, 32)
    with pytest.raises(ValueError, match="not one of"):
        plan_for_scheme(10, 10, "blended", 256, 32)


def test_stitch_refuses_a_wrong_number_of_predictions():
    plan = plan_tiles(600, 600, 256, 32)
    with pytest.raises(ValueError, match="predictions for a plan of"):
        stitch([np.zeros(plan.window_shape)], plan)


def test_batch_tiles_keeps_order_and_size():
    plan = plan_tiles(1000, 1000, 256, 32)
    batches = list(batch_tiles(plan, 4))
    assert [len(batch) for batch in batches[:-1]] == [4] * (len(batches) - 1)
    assert [spec for batch in batches for spec in batch] == list(plan.tiles)
