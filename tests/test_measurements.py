"""Per-nucleus measurements with named units and frames: level-0 pixels and microns, shape
features, mean probability, QuPath's frame, and the GeoJSON features' ids, class and
measurements; whole images and slide geometry alike (``io.writers``). No Ray."""

from __future__ import annotations

import csv
import io as bytes_io
import json
import math
import uuid

import numpy as np
import pytest
import shapely.geometry

from unet_ray.io.writers import (
    GEOJSON_MEASUREMENTS,
    NUCLEI_COLUMNS,
    NUCLEUS_COLOUR,
    PixelGeometry,
    column_units,
    encode_outputs,
    feature_id,
    geojson_from_labels,
    measure_nuclei,
    nuclei_table,
)

AREA_AGREEMENT = 0.02  # polygon area vs area_px for nuclei of >= 100 pixels


def shapes() -> np.ndarray:
    """1: a 10 x 10 square; 2: a 4 x 20 bar; 3: an L (solidity < 1); 4: a disc of radius 12."""
    labels = np.zeros((80, 90), dtype=np.int32)
    labels[5:15, 5:15] = 1
    labels[30:34, 5:25] = 2
    labels[50:70, 5:10] = 3
    labels[65:70, 10:25] = 3
    rows, columns = np.indices(labels.shape)
    labels[(rows - 25) ** 2 + (columns - 60) ** 2 <= 12**2] = 4
    return labels


def by_label(rows: list[dict]) -> dict[int, dict]:
    return {row["label"]: row for row in rows}


def test_shape_features_against_hand_computed_values():
    rows = by_label(measure_nuclei(shapes(), None))
    square, bar, ell, disc = rows[1], rows[2], rows[3], rows[4]
    assert square["area_px"] == 100 and bar["area_px"] == 80 and ell["area_px"] == 175
    assert (square["centroid_x_px"], square["centroid_y_px"]) == (10.0, 10.0)  # pixel corners
    assert (square["min_x_px"], square["max_x_px"]) == (5, 15)
    assert square["eccentricity"] == pytest.approx(0, abs=1e-3)  # a square's moments: a circle
    assert square["solidity"] == 1.0
    # a 4 x 20 bar: second moments (n^2 - 1) / 12 per axis, ellipse axes 4 * sqrt(moment)
    assert bar["major_axis_px"] == pytest.approx(4 * math.sqrt((20**2 - 1) / 12), abs=1e-3)
    assert bar["minor_axis_px"] == pytest.approx(4 * math.sqrt((4**2 - 1) / 12), abs=1e-3)
    assert bar["eccentricity"] > 0.95
    assert ell["solidity"] < 0.8  # the L's convex hull is much larger than the L
    assert disc["perimeter_px"] == pytest.approx(2 * math.pi * 12, rel=0.05)
    assert disc["eccentricity"] < 0.1
    assert all(row[column] is None for row in rows.values() for column in ("area_um2",))


def test_a_coarser_frame_is_measured_in_level_0_pixels_and_microns():
    """A label array segmented at half resolution (scale 2), placed at (top 10, left 20) of the
    frame, on a 0.25 um/px slide whose bounds (where the frame and QuPath's start) are at (7, 3):
    every length doubles, every area quadruples, microns follow the level-0 pixel size, level 0
    adds the bounds to QuPath's frame."""
    labels = shapes()
    plain = by_label(measure_nuclei(labels, None))
    geometry = PixelGeometry(top=10, left=20, scale=2.0, mpp=0.25, bounds_x=7, bounds_y=3)
    scaled = by_label(measure_nuclei(labels, None, None, geometry))
    for label, row in scaled.items():
        base = plain[label]
        assert row["area_px"] == pytest.approx(4 * base["area_px"])
        assert row["area_um2"] == pytest.approx(row["area_px"] * 0.25**2)
        # (rounded to 0.001 before and after)
        expected_x, expected_y = (base["centroid_x_px"] + 20) * 2, (base["centroid_y_px"] + 10) * 2
        assert row["qupath_centroid_x_px"] == pytest.approx(expected_x, abs=3e-3)
        assert row["qupath_centroid_y_px"] == pytest.approx(expected_y, abs=3e-3)
        assert row["centroid_x_px"] == pytest.approx(expected_x + 7, abs=3e-3)
        assert row["centroid_y_px"] == pytest.approx(expected_y + 3, abs=3e-3)
        assert row["centroid_x_um"] == pytest.approx(row["centroid_x_px"] * 0.25, abs=1e-3)
        assert row["min_x_px"] == (base["min_x_px"] + 20) * 2 + 7
        for name in ("perimeter", "major_axis", "minor_axis"):
            assert row[f"{name}_px"] == pytest.approx(2 * base[f"{name}_px"], abs=2e-3)
            assert row[f"{name}_um"] == pytest.approx(row[f"{name}_px"] * 0.25, abs=1e-3)
        assert (row["eccentricity"], row["solidity"]) == (base["eccentricity"], base["solidity"])
        assert row["qupath_centroid_x_px"] == pytest.approx(row["centroid_x_px"] - 7, abs=1e-3)
        assert row["qupath_centroid_y_px"] == pytest.approx(row["centroid_y_px"] - 3, abs=1e-3)
        assert row["qupath_centroid_y_um"] == pytest.approx(
            (row["centroid_y_px"] - 3) * 0.25, abs=1e-3
        )
        assert row["qupath_max_x_px"] == row["max_x_px"] - 7


def test_mean_probability_is_the_mean_over_each_nucleus():
    labels = shapes()
    probability = np.zeros(labels.shape, dtype=np.float16)
    probability[labels == 1] = 0.75
    probability[labels == 2] = 0.5
    probability[30, 5] = 1.0  # one pixel of the 80 of nucleus 2
    probability[0, 0] = 1.0  # background changes nothing
    rows = by_label(measure_nuclei(labels, None, probability))
    assert rows[1]["mean_probability"] == 0.75
    assert rows[2]["mean_probability"] == pytest.approx((79 * 0.5 + 1.0) / 80, abs=1e-4)
    assert rows[3]["mean_probability"] == 0.0
    with pytest.raises(ValueError, match="differ in size"):
        measure_nuclei(labels, None, probability[:10])


def test_geojson_features_carry_id_class_colour_and_measurements():
    labels = shapes()
    probability = np.full(labels.shape, 0.9)
    first = geojson_from_labels(labels, "case-7", probability, PixelGeometry(mpp=0.5))
    again = geojson_from_labels(labels, "case-7", probability, PixelGeometry(mpp=0.5))
    other = geojson_from_labels(labels, "case-8")
    ids = [feature["id"] for feature in first["features"]]
    assert ids == [feature["id"] for feature in again["features"]]  # deterministic
    assert len(set(ids)) == 4 and not set(ids) & {f["id"] for f in other["features"]}
    assert uuid.UUID(ids[0]).version == 5  # a name-based UUID
    assert ids[2] == feature_id("case-7", 3)
    for feature in first["features"]:
        properties = feature["properties"]
        assert properties["classification"] == {"name": "Nucleus", "color": list(NUCLEUS_COLOUR)}
        measurements = properties["measurements"]
        assert set(measurements) == set(GEOJSON_MEASUREMENTS)
        assert measurements["mean_probability"] == 0.9
        assert measurements["area_um2"] == pytest.approx(measurements["area_px"] * 0.25)
        assert all(isinstance(value, int | float) for value in measurements.values())
    unknown = other["features"][0]["properties"]["measurements"]
    assert "area_um2" not in unknown and "mean_probability" not in unknown  # never null


def test_geojson_polygons_lie_in_qupaths_frame_and_agree_with_the_areas():
    """At scale 2 on a bounded slide, each polygon is the outline scaled into QuPath's frame
    (which starts at the bounds, as the segmented frame does), and its area (shapely) agrees
    with ``area_px`` to 2 % for nuclei of >= 100 pixels."""
    labels = shapes()
    plain = geojson_from_labels(labels)["features"]
    geometry = PixelGeometry(top=4, left=6, scale=2.0, mpp=0.5, bounds_x=11, bounds_y=5)
    moved = geojson_from_labels(labels, "s", None, geometry)["features"]
    for before, after in zip(plain, moved, strict=True):
        ring = np.array(before["geometry"]["coordinates"][0])
        expected = (ring + (6, 4)) * 2
        np.testing.assert_allclose(np.array(after["geometry"]["coordinates"][0]), expected)
        polygon = shapely.geometry.shape(after["geometry"])
        assert polygon.is_valid
        area = after["properties"]["measurements"]["area_px"]
        assert area == 4 * before["properties"]["measurements"]["area_px"]
        if area >= 4 * 100:
            assert abs(polygon.area - area) / area < AREA_AGREEMENT, (area, polygon.area)


def test_image_outputs_name_units_and_fill_microns_when_the_pixel_size_is_known():
    labels = shapes()
    image = np.full((*labels.shape, 3), 100, dtype=np.uint8)
    probability = np.where(labels > 0, 0.8, 0.1)
    outputs = encode_outputs(image, labels > 0, labels, "cells", None, probability, mpp=0.5)
    rows = list(csv.DictReader(bytes_io.StringIO(outputs["cells.nuclei.csv"].decode())))
    assert list(rows[0]) == list(NUCLEI_COLUMNS)
    first = rows[0]
    assert float(first["area_um2"]) == pytest.approx(100 * 0.25)
    assert float(first["centroid_x_um"]) == pytest.approx(5.0)
    assert float(first["mean_probability"]) == pytest.approx(0.8)
    assert first["id"] == feature_id("cells", 1)
    features = json.loads(outputs["cells.geojson"])["features"]
    assert [feature["id"] for feature in features] == [row["id"] for row in rows]
    table = nuclei_table(labels, image, probability, PixelGeometry(), "cells")
    assert [row["area_um2"] for row in table] == [None] * 4  # no pixel size: blank
    units = column_units(NUCLEI_COLUMNS)
    assert units["area_um2"] == "square microns"
    assert units["centroid_x_px"] == "level-0 pixels, the input's level 0"
    assert "eccentricity" not in units and "label" not in units


def test_finish_image_writes_probability_and_microns_into_the_image_outputs(tmp_path):
    """The image job's stage 2 (in process): the nucleus map's mean per nucleus and the image's
    pixel size reach the nuclei CSV and the GeoJSON measurements."""
    from unet_ray.core.config import InstanceConfig
    from unet_ray.pipelines.segment import finish_image

    rows, columns = np.indices((96, 96))
    nucleus = np.zeros((96, 96), dtype=np.float16)
    for centre_y, centre_x in ((30, 30), (60, 70)):
        nucleus[(rows - centre_y) ** 2 + (columns - centre_x) ** 2 <= 10**2] = 0.875
    image = np.full((96, 96, 3), 200, dtype=np.uint8)
    count = finish_image(
        "in/cells.png", str(tmp_path), image, nucleus[None], InstanceConfig(), None, 0.4
    )
    assert count == 2
    table = list(csv.DictReader((tmp_path / "cells.nuclei.csv").open()))
    for row in table:
        assert float(row["mean_probability"]) == 0.875
        assert float(row["area_um2"]) == pytest.approx(float(row["area_px"]) * 0.16, rel=1e-3)
    features = json.loads((tmp_path / "cells.geojson").read_text())["features"]
    assert [feature["id"] for feature in features] == [row["id"] for row in table]
    assert all(f["properties"]["measurements"]["mean_probability"] == 0.875 for f in features)
