"""Output encoders: mask PNG, uint32 labels TIFF, QuPath GeoJSON, nuclei CSV and overlay PNG."""

from __future__ import annotations

import csv
import io as bytes_io
import json

import numpy as np
import pytest
import tifffile

from unet_ray.core.instances import labels_from_mask
from unet_ray.io.images import decode_image
from unet_ray.io.synth import generate_sample
from unet_ray.io.writers import (
    NUCLEI_COLUMNS,
    OUTLINE_COLOUR,
    encode_geojson,
    encode_labels_tiff,
    encode_mask_png,
    encode_nuclei_csv,
    encode_outputs,
    encode_overlay_png,
    geojson_from_labels,
    output_names,
    signed_area,
)

AREA_TOLERANCE = 0.05  # polygon area vs pixel count, relative, for nuclei of >= 50 pixels


def disc_labels(shape=(120, 160)) -> np.ndarray:
    """Five discs of radius 4..16 and a square, labelled 1..6."""
    rows, columns = np.indices(shape)
    labels = np.zeros(shape, dtype=np.int32)
    centres = [(20, 20, 4), (30, 60, 7), (70, 40, 10), (70, 110, 16), (105, 20, 12)]
    for label, (row, column, radius) in enumerate(centres, start=1):
        labels[(rows - row) ** 2 + (columns - column) ** 2 <= radius**2] = label
    labels[100:110, 140:155] = 6
    return labels


def parse_csv(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(bytes_io.StringIO(data.decode())))


def test_mask_png_is_zero_and_255():
    mask = np.zeros((17, 23), dtype=bool)
    mask[3:9, 4:20] = True
    decoded = decode_image(encode_mask_png(mask), "mask.png")[:, :, 0]
    assert set(np.unique(decoded)) == {0, 255}
    np.testing.assert_array_equal(decoded == 255, mask)


def test_labels_tiff_is_uint32_and_exact():
    labels = disc_labels()
    labels[0, 0] = 70_000  # beyond uint16
    read_back = tifffile.imread(bytes_io.BytesIO(encode_labels_tiff(labels)))
    assert read_back.dtype == np.uint32
    np.testing.assert_array_equal(read_back, labels)


def test_labels_tiff_refuses_negative_labels():
    with pytest.raises(ValueError, match="0..2\\*\\*32-1"):
        encode_labels_tiff(np.full((4, 4), -1))


def polygon_area(geometry: dict) -> float:
    polygons = (
        [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    )
    return sum(signed_area(np.array(polygon[0])) for polygon in polygons)


def test_geojson_is_a_qupath_feature_collection_of_closed_rings():
    collection = json.loads(encode_geojson(disc_labels()))
    assert collection["type"] == "FeatureCollection"
    assert len(collection["features"]) == 6
    for feature in collection["features"]:
        assert feature["type"] == "Feature"
        assert feature["properties"]["objectType"] == "detection"
        assert feature["properties"]["classification"]["name"] == "Nucleus"
        ring = feature["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) >= 4
        assert signed_area(np.array(ring)) > 0  # counterclockwise exterior


def test_geojson_coordinates_use_pixel_corner_origin():
    labels = np.zeros((20, 30), dtype=np.int32)
    labels[5:10, 12:20] = 1  # rows 5..9, columns 12..19
    ring = np.array(geojson_from_labels(labels)["features"][0]["geometry"]["coordinates"][0])
    assert ring[:, 0].min() == pytest.approx(12, abs=0.5)  # x: the left edge of column 12
    assert ring[:, 0].max() == pytest.approx(20, abs=0.5)
    assert ring[:, 1].min() == pytest.approx(5, abs=0.5)  # y: the top edge of row 5
    assert ring[:, 1].max() == pytest.approx(10, abs=0.5)


def test_geojson_areas_agree_with_label_areas():
    labels = disc_labels()
    for feature in geojson_from_labels(labels)["features"]:
        label = feature["properties"]["measurements"]["label"]
        pixels = int((labels == label).sum())
        assert feature["properties"]["measurements"]["area_px"] == pixels
        area = polygon_area(feature["geometry"])
        assert abs(area - pixels) / pixels < AREA_TOLERANCE, (label, area, pixels)


def test_geojson_areas_agree_on_watershed_labels_of_a_synthetic_image():
    _, true_labels = generate_sample(np.random.default_rng(3), 256, 256, "fluorescence")
    labels = labels_from_mask(true_labels > 0)
    features = geojson_from_labels(labels)["features"]
    assert len(features) == labels.max() > 5
    polygon_total = sum(polygon_area(feature["geometry"]) for feature in features)
    pixel_total = int((labels > 0).sum())
    assert abs(polygon_total - pixel_total) / pixel_total < AREA_TOLERANCE
    for feature in features:
        pixels = feature["properties"]["measurements"]["area_px"]
        if pixels >= 50:
            relative = abs(polygon_area(feature["geometry"]) - pixels) / pixels
            assert relative < 2 * AREA_TOLERANCE


def test_a_label_in_two_pieces_becomes_a_multipolygon():
    labels = np.zeros((20, 20), dtype=np.int32)
    labels[2:6, 2:6] = 1
    labels[10:16, 10:16] = 1
    geometry = geojson_from_labels(labels)["features"][0]["geometry"]
    assert geometry["type"] == "MultiPolygon"
    assert polygon_area(geometry) == pytest.approx(16 + 36, rel=AREA_TOLERANCE)


def test_empty_labels_give_empty_collection_and_header_only_csv():
    labels = np.zeros((8, 8), dtype=np.int32)
    assert geojson_from_labels(labels)["features"] == []
    rows = parse_csv(encode_nuclei_csv(labels, np.zeros((8, 8, 3), dtype=np.uint8)))
    assert rows == []
    header = encode_nuclei_csv(labels, np.zeros((8, 8, 3), dtype=np.uint8)).decode().split(",")
    assert header[0] == "label"


def test_nuclei_csv_rows_match_the_labels():
    labels = np.zeros((30, 40), dtype=np.int32)
    labels[2:6, 10:20] = 1  # 4 x 10
    labels[20:25, 5:8] = 2  # 5 x 3
    image = np.zeros((30, 40, 3), dtype=np.uint8)
    image[labels == 1] = (30, 60, 90)
    image[labels == 2] = 200
    rows = parse_csv(encode_nuclei_csv(labels, image))
    assert list(rows[0]) == list(NUCLEI_COLUMNS)
    first, second = rows
    assert (first["label"], first["area_px"], second["area_px"]) == ("1", "40", "15")
    assert float(first["centroid_x_px"]) == pytest.approx(15.0)  # columns 10..19 -> centre 15
    assert float(first["centroid_y_px"]) == pytest.approx(4.0)  # rows 2..5 -> centre 4
    assert (first["min_x_px"], first["min_y_px"], first["max_x_px"], first["max_y_px"]) == (
        "10",
        "2",
        "20",
        "6",
    )
    assert first["area_um2"] == first["centroid_x_um"] == ""  # no pixel size: blank
    assert float(first["mean_intensity"]) == pytest.approx(60.0)
    assert float(first["mean_blue"]) == pytest.approx(90.0)
    assert float(second["mean_intensity"]) == pytest.approx(200.0)
    assert first["intensity_dtype"] == "uint8"


def two_nuclei(shape=(40, 50)) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.int32)
    labels[5:15, 5:15] = 1
    labels[20:30, 30:45] = 2
    return labels


def test_nuclei_csv_reports_16_bit_and_float_images_in_their_own_units():
    labels = two_nuclei()
    gray16 = np.full(labels.shape, 1000, dtype=np.uint16)
    gray16[labels == 1] = 30000
    gray16[labels == 2] = 52000
    gray16[20, 30] = 51000  # nucleus 2 is not uniform: mean (149 * 52000 + 51000) / 150
    gray16[0, 0] = 65535  # a hot background pixel changes nothing
    first, second = parse_csv(encode_nuclei_csv(labels, gray16))
    assert float(first["mean_intensity"]) == pytest.approx(30000)
    assert float(first["mean_red"]) == float(first["mean_blue"]) == pytest.approx(30000)
    assert float(second["mean_intensity"]) == pytest.approx((149 * 52000 + 51000) / 150)
    assert first["intensity_dtype"] == "uint16"

    rgb16 = np.zeros((*labels.shape, 3), dtype=np.uint16)
    rgb16[labels == 1] = (40000, 10000, 30000)
    first, _ = parse_csv(encode_nuclei_csv(labels, rgb16))
    reds_greens_blues = [float(first[f"mean_{colour}"]) for colour in ("red", "green", "blue")]
    assert reds_greens_blues == [40000, 10000, 30000]
    assert float(first["mean_intensity"]) == pytest.approx(80000 / 3)

    floats = np.zeros(labels.shape, dtype=np.float32)
    floats[labels == 1] = 0.123456
    first, _ = parse_csv(encode_nuclei_csv(labels, floats))
    assert float(first["mean_intensity"]) == pytest.approx(0.123456, rel=1e-6)  # not 0.123
    assert first["intensity_dtype"] == "float32"


def test_nuclei_csv_refuses_an_image_of_another_size():
    with pytest.raises(ValueError, match="differ in size"):
        encode_nuclei_csv(two_nuclei(), np.zeros((10, 10), np.uint16))


def test_overlay_draws_outlines_and_keeps_the_rest():
    labels = np.zeros((20, 20), dtype=np.int32)
    labels[5:15, 5:15] = 1
    image = np.full((20, 20, 3), 40, dtype=np.uint8)
    overlay = decode_image(encode_overlay_png(image, labels), "overlay.png")
    assert tuple(overlay[5, 10]) == OUTLINE_COLOUR  # boundary row of the square
    assert tuple(overlay[10, 10]) == (40, 40, 40)  # interior untouched
    assert tuple(overlay[0, 0]) == (40, 40, 40)  # background untouched


def test_encode_outputs_names_all_five_files():
    labels = disc_labels()
    image = np.zeros((*labels.shape, 3), dtype=np.uint8)
    outputs = encode_outputs(image, labels > 0, labels, "slide.1")
    assert sorted(outputs) == sorted(output_names("slide.1").values())
    assert set(outputs) == {
        "slide.1.mask.png",
        "slide.1.labels.tif",
        "slide.1.geojson",
        "slide.1.nuclei.csv",
        "slide.1.overlay.png",
    }
    assert all(len(data) > 0 for data in outputs.values())


def test_encode_outputs_takes_intensities_from_the_original():
    labels = two_nuclei()
    original = np.where(labels > 0, 30000, 1000).astype(np.uint16)
    rendering = np.where(labels > 0, 255, 0).astype(np.uint8)[:, :, None].repeat(3, axis=2)
    outputs = encode_outputs(rendering, labels > 0, labels, "cells", original)
    rows = parse_csv(outputs["cells.nuclei.csv"])
    assert [float(row["mean_intensity"]) for row in rows] == [30000, 30000]
    overlay = decode_image(outputs["cells.overlay.png"], "overlay.png")
    assert tuple(overlay[0, 0]) == (0, 0, 0)  # drawn on the 8-bit rendering
    rows = parse_csv(encode_outputs(rendering, labels > 0, labels, "cells")["cells.nuclei.csv"])
    assert [float(row["mean_intensity"]) for row in rows] == [255, 255]  # default: the image
