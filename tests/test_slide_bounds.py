"""Bounded slides (Leica SCN here; MIRAX and others through OpenSlide): the reader takes the
bounds from the slide's own properties, only the bounds are segmented (the empty glass around
them is never read), and the outputs put the nuclei in QuPath's frame (which crops to the bounds
too) while the table keeps both frames. Real SCN files written by
``io.slide_synth``, read by tiffslide; regions assembled in process (no Ray: the Ray job on a
bounded slide is in test_slides.py)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely.geometry
import tifffile

from unet_ray import io
from unet_ray.core.config import SegmentConfig, SlideConfig
from unet_ray.core.regions import Box
from unet_ray.io import slide_writers
from unet_ray.io.slide_reader import SlideReader, read_frame_window, read_overview, slide_bounds
from unet_ray.io.slide_synth import tissue_patches, write_leica_scn
from unet_ray.io.writers import feature_id
from unet_ray.pipelines import slides

GLASS = (1200, 1600)  # level-0 height, width of the whole glass
BOUNDS = (320, 192, 1024, 768)  # x, y, width, height of the scanned area on it
MPP = 0.5
AREA_AGREEMENT = 0.02


@pytest.fixture(scope="module")
def scn_slide(tmp_path_factory) -> tuple[str, np.ndarray]:
    """A Leica SCN: tissue over the whole scanned area; its pixels."""
    path = str(tmp_path_factory.mktemp("scn") / "bounded.scn")
    patches = tissue_patches([(0, 0, BOUNDS[3], BOUNDS[2])], seed=5)
    write_leica_scn(path, *GLASS, BOUNDS, patches, mpp=MPP)
    scanned = np.zeros((BOUNDS[3], BOUNDS[2], 3), dtype=np.uint8)
    for patch in patches:
        height, width = patch.pixels.shape[:2]
        scanned[patch.top : patch.top + height, patch.left : patch.left + width] = patch.pixels
    return path, scanned


def test_the_reader_takes_the_bounds_from_the_slides_properties(scn_slide):
    path, scanned = scn_slide
    reader = SlideReader(path)
    try:
        assert reader.bounds == BOUNDS
        assert (reader.height, reader.width) == GLASS  # level 0 is the whole glass
        assert reader.mpp == MPP
        x, y = BOUNDS[:2]
        np.testing.assert_array_equal(reader.read(0, x, y, 200, 100), scanned[:100, :200])
        assert reader.read(0, 0, 0, 64, 64).max() == 0  # outside the bounds: nothing scanned
        # the frame starts at the bounds: at full and at half resolution
        window = read_frame_window(reader, Box(10, 74, 20, 100), 1.0)
        np.testing.assert_array_equal(window, scanned[10:74, 20:100])
        half = read_frame_window(reader, Box(0, BOUNDS[3] // 2, 0, BOUNDS[2] // 2), 2.0)
        assert half.shape == (BOUNDS[3] // 2, BOUNDS[2] // 2, 3)
        assert half.min(axis=(0, 1)).max() > 0  # no black glass came in
        overview = read_overview(reader, 96, 128)
        reduced = scanned.reshape(96, 8, 128, 8, 3).mean(axis=(1, 3))
        assert np.abs(overview.astype(float) - reduced).mean() < 4  # the scanned area only
    finally:
        reader.close()


def test_bounds_from_openslide_or_tiffslide_property_names():
    openslide = {
        "openslide.bounds-x": "100",
        "openslide.bounds-y": "40",
        "openslide.bounds-width": "800",
        "openslide.bounds-height": "600",
    }
    assert slide_bounds(openslide, 2000, 1000) == (100, 40, 800, 600)
    tiffslide = {"tiffslide.bounds-x": 7, "tiffslide.bounds-y": 9, "tiffslide.bounds-width": None}
    assert slide_bounds(tiffslide, 50, 60) == (7, 9, 43, 51)  # no size: to the far edges
    assert slide_bounds({"tiffslide.bounds-x": None}, 50, 60) is None  # an unbounded slide
    whole = {"openslide.bounds-x": 0, "openslide.bounds-y": 0}
    assert slide_bounds(whole, 50, 60) is None  # bounds that cover it all change nothing


def disc_part(region, radius: int = 7, step: int = 40) -> np.ndarray:
    """Labels on ``region``'s spill box: discs on a grid whose centres lie in its core."""
    spill, core = region.spill, region.core
    kept = np.zeros((spill.height, spill.width), dtype=np.uint32)
    rows, columns = np.indices(kept.shape)
    label = 0
    for centre_y in range(core.top + 12, core.bottom - 12, step):
        for centre_x in range(core.left + 12, core.right - 12, step):
            label += 1
            disc = (rows + spill.top - centre_y) ** 2 + (columns + spill.left - centre_x) ** 2
            kept[disc <= radius**2] = label
    return kept


def test_a_bounded_slide_at_half_resolution_is_written_in_qupaths_frame(scn_slide, tmp_path):
    """Planned at --mpp 1.0 (half the slide's 0.5 um/px), regions of known nuclei assembled:
    GeoJSON polygons lie in QuPath's frame (level 0 minus the bounds), their areas agree with
    area_px (level-0 pixels) to 2 %, the table keeps both frames and says so in its metadata."""
    path, _ = scn_slide
    segment = SegmentConfig()
    plan = slides.plan_slide(path, str(tmp_path), SlideConfig(region=256, mpp=1.0), segment)
    assert plan.bounds == list(BOUNDS) and plan.scale == 2.0 and plan.mpp == 1.0
    assert (plan.frame_height, plan.frame_width) == (BOUNDS[3] // 2, BOUNDS[2] // 2)
    by_key = plan.region_by_key()
    image = np.zeros((1, 1, 3), np.uint8)
    for key in plan.to_segment:
        region = by_key[key]
        kept = disc_part(region)
        spill_image = np.broadcast_to(image, (*kept.shape, 3))
        probability = np.where(kept > 0, 0.9, 0.05)
        part = slide_writers.encode_region_part(kept, spill_image, probability, region, plan)
        io.write_bytes_atomic(slide_writers.part_uri(plan, key), part)
    nuclei = slide_writers.assemble_slide(plan, {"seconds": {}, "checkpoint": "ckpt"})

    features = json.loads((tmp_path / "bounded.geojson").read_text())["features"]
    assert len(features) == nuclei > 20
    table = pq.read_table(tmp_path / "bounded.nuclei.parquet").to_pandas().set_index("label")
    labels = tifffile.imread(tmp_path / "bounded.labels.ome.tif")
    assert labels.shape == (BOUNDS[3] // 2, BOUNDS[2] // 2)  # QuPath's image, at --mpp
    frame_areas = np.bincount(labels.ravel())
    extent = shapely.geometry.box(0, 0, BOUNDS[2], BOUNDS[3])
    for feature in features:
        measurements = feature["properties"]["measurements"]
        label = measurements["label"]
        row = table.loc[label]
        polygon = shapely.geometry.shape(feature["geometry"])
        assert polygon.is_valid and feature["id"] == row["id"] == feature_id("bounded", label)
        assert extent.contains(polygon)
        assert measurements["area_px"] == row["area_px"] == 4 * frame_areas[label]
        assert abs(polygon.area - row["area_px"]) / row["area_px"] < AREA_AGREEMENT
        assert row["area_um2"] == pytest.approx(row["area_px"] * MPP**2)
        centre = polygon.centroid  # QuPath's frame = level 0 - bounds
        assert centre.x == pytest.approx(row["qupath_centroid_x_px"], abs=0.5)
        assert centre.y == pytest.approx(row["qupath_centroid_y_px"], abs=0.5)
        assert row["qupath_centroid_x_px"] == pytest.approx(row["centroid_x_px"] - BOUNDS[0])
        assert row["qupath_centroid_y_um"] == pytest.approx(row["qupath_centroid_y_px"] * MPP)
        assert row["mean_probability"] == pytest.approx(0.9)
    metadata = pq.read_metadata(tmp_path / "bounded.nuclei.parquet").metadata
    values = {
        key.decode()[len("unet_ray.") :]: json.loads(value)
        for key, value in metadata.items()
        if key.startswith(b"unet_ray.")
    }
    assert values["pixel_size_um"] == MPP and values["segmented_pixel_size_um"] == 1.0
    assert values["frame_scale"] == 2.0 and values["bounds_px"] == list(BOUNDS)
    assert values["qupath_offset_px"] == list(BOUNDS[:2])
    assert values["source"] == path and values["checkpoint"] == "ckpt" and values["version"]
    assert values["units"]["area_um2"] == "square microns"
    summary = json.loads((tmp_path / "bounded.slide.json").read_text())
    assert summary["bounds"] == list(BOUNDS)
