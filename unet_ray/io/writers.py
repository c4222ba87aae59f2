"""Encoders for the segmentation outputs: mask PNG, uint32 labels TIFF, GeoJSON, nuclei CSV, overlay.

Each function turns arrays into the bytes of one file, so the caller can write it whole (atomic
rename or a single S3 put). No I/O, no Ray, no torch.

Coordinates follow QuPath's (and most viewers') convention: x to the right, y down, in pixels,
with the image's top-left *corner* at (0, 0), so pixel (row r, column c) covers
[c, c + 1) x [r, r + 1) and its centre is (c + 0.5, r + 0.5). Polygons trace the boundary half-way
between a nucleus's edge pixels and the background (marching squares at level 0.5), so a
polygon's area equals its pixel count up to the corners it cuts (a few percent for nuclei of 50
pixels, less for larger ones).

``<stem>.nuclei.csv`` reports mean intensities in the input image's own units: raw 16-bit values
for a 16-bit image, the file's values for a float image, 0..255 for an 8-bit one (never the 8-bit
rendering the network sees); its ``intensity_dtype`` column names that pixel type.
"""

from __future__ import annotations

import csv
import io as bytes_io
import json
from pathlib import PurePosixPath
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.measure import find_contours, regionprops_table
from skimage.segmentation import find_boundaries

from unet_ray.io.files import exists, read_bytes, write_bytes_atomic
from unet_ray.io.images import encode_png

MASK_SUFFIX = ".mask.png"
LABELS_SUFFIX = ".labels.tif"
GEOJSON_SUFFIX = ".geojson"
NUCLEI_SUFFIX = ".nuclei.csv"
OVERLAY_SUFFIX = ".overlay.png"
OUTPUT_SUFFIXES = {
    "mask": MASK_SUFFIX,
    "labels": LABELS_SUFFIX,
    "geojson": GEOJSON_SUFFIX,
    "nuclei": NUCLEI_SUFFIX,
    "overlay": OVERLAY_SUFFIX,
}
MASK_FOREGROUND = 255  # mask PNG: 0 background, 255 nucleus
OUTLINE_COLOUR = (255, 255, 0)  # overlay outlines: yellow shows on fluorescence and H&E alike
CONTOUR_LEVEL = 0.5  # half-way between background (0) and nucleus (1)
PIXEL_CENTRE = 0.5  # array index -> QuPath coordinate of the pixel centre
COORDINATE_DECIMALS = 2
TIFF_COMPRESSION = "zlib"
CLASSIC_TIFF_LIMIT = 2**32 - 2**25  # bytes; larger label images are written as BigTIFF
NUCLEUS_CLASS = "Nucleus"
NUCLEI_COLUMNS = (
    "label",
    "area",
    "centroid_x",
    "centroid_y",
    "min_x",
    "min_y",
    "max_x",
    "max_y",
    "mean_intensity",
    "mean_red",
    "mean_green",
    "mean_blue",
    "intensity_dtype",  # pixel type of the input, whose raw units the mean_* columns are in
)
INTENSITY_SIGNIFICANT_DIGITS = 7  # float32 precision, whatever the units (0..1 or 0..65535)


def output_names(stem: str) -> dict[str, str]:
    """File names of the five outputs of the image ``stem``, by kind."""
    return {kind: stem + suffix for kind, suffix in OUTPUT_SUFFIXES.items()}


def encode_mask_png(mask: np.ndarray) -> bytes:
    """A binary mask (H x W, nonzero = nucleus) as an 8-bit PNG of 0 and 255."""
    return encode_png(np.where(np.asarray(mask) != 0, MASK_FOREGROUND, 0).astype(np.uint8))


def encode_labels_tiff(labels: np.ndarray) -> bytes:
    """Instance labels as a single-page uint32 TIFF (zlib-compressed; BigTIFF when huge)."""
    import tifffile

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be H x W, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.uint32).max):
        raise ValueError("labels must lie in 0..2**32-1 to be written as uint32")
    labels = labels.astype(np.uint32, copy=False)
    buffer = bytes_io.BytesIO()
    tifffile.imwrite(
        buffer,
        labels,
        photometric="minisblack",
        compression=TIFF_COMPRESSION,
        bigtiff=labels.nbytes > CLASSIC_TIFF_LIMIT,
    )
    return buffer.getvalue()


def remove_collinear_points(ring: np.ndarray) -> np.ndarray:
    """Drop the points of a closed ring (first == last) that lie on a straight run."""
    points = ring[:-1]
    if len(points) < 4:
        return ring
    previous_points = np.roll(points, 1, axis=0)
    next_points = np.roll(points, -1, axis=0)
    cross = (points[:, 0] - previous_points[:, 0]) * (next_points[:, 1] - points[:, 1]) - (
        points[:, 1] - previous_points[:, 1]
    ) * (next_points[:, 0] - points[:, 0])
    kept = points[np.abs(cross) > 1e-9]
    if len(kept) < 3:
        return ring
    return np.vstack([kept, kept[:1]])


def signed_area(ring_xy: np.ndarray) -> float:
    """Shoelace area of a closed ring of (x, y) points; positive when counterclockwise."""
    x, y = ring_xy[:, 0], ring_xy[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def polygon_rings(object_mask: np.ndarray, top: int, left: int) -> list[np.ndarray]:
    """The outer rings (x, y) of one object's mask cropped at (top, left); holes are filled."""
    filled = ndimage.binary_fill_holes(object_mask)
    padded = np.pad(filled, 1).astype(np.float32)  # closes every contour
    rings = []
    for contour in find_contours(padded, CONTOUR_LEVEL, fully_connected="high"):
        ring = remove_collinear_points(contour)
        ring_xy = np.column_stack(
            [ring[:, 1] + left - 1 + PIXEL_CENTRE, ring[:, 0] + top - 1 + PIXEL_CENTRE]
        )
        area = signed_area(ring_xy)
        if area == 0:
            continue
        rings.append(ring_xy if area > 0 else ring_xy[::-1])  # RFC 7946: counterclockwise
    return rings


def feature_for_object(label: int, area: int, rings: list[np.ndarray]) -> dict[str, Any]:
    """One QuPath detection Feature (Polygon, or MultiPolygon for a split object)."""
    coordinates = [np.round(ring, COORDINATE_DECIMALS).tolist() for ring in rings]
    if len(coordinates) == 1:
        geometry = {"type": "Polygon", "coordinates": coordinates}
    else:
        geometry = {"type": "MultiPolygon", "coordinates": [[ring] for ring in coordinates]}
    return {
        "type": "Feature",
        "geometry": geometry,
        "properties": {
            "objectType": "detection",
            "classification": {"name": NUCLEUS_CLASS},
            "measurements": {"label": int(label), "area_pixels": int(area)},
        },
    }


def geojson_from_labels(labels: np.ndarray) -> dict[str, Any]:
    """A QuPath-importable FeatureCollection: one detection polygon per labelled nucleus."""
    labels = np.asarray(labels)
    features = []
    for index, slices in enumerate(ndimage.find_objects(labels), start=1):
        if slices is None:
            continue
        object_mask = labels[slices] == index
        rings = polygon_rings(object_mask, slices[0].start, slices[1].start)
        if rings:
            features.append(feature_for_object(index, int(object_mask.sum()), rings))
    return {"type": "FeatureCollection", "features": features}


def encode_geojson(labels: np.ndarray) -> bytes:
    return json.dumps(geojson_from_labels(labels), separators=(",", ":")).encode()


def nuclei_table(labels: np.ndarray, image: np.ndarray) -> list[dict[str, Any]]:
    """One row per nucleus: label, area (pixels), centroid, bbox and mean intensities.

    Coordinates as in the module docstring (bbox max is the far edge, i.e. exclusive). The
    intensities are of ``image`` as given, (H x W) or (H x W x 3) of any numeric dtype, in its
    own units (pass the original, not the 8-bit rendering): ``mean_red/green/blue`` per channel
    (all three equal for a grayscale image) and ``mean_intensity`` their average.
    """
    labels = np.asarray(labels)
    image = np.asarray(image)
    if image.shape[:2] != labels.shape:
        raise ValueError(f"labels {labels.shape} and image {image.shape[:2]} differ in size")
    if image.ndim == 3 and image.shape[2] != 3:
        raise ValueError(f"image must be H x W or H x W x 3, got shape {image.shape}")
    if not labels.any():
        return []
    table = regionprops_table(
        labels.astype(np.int32, copy=False),
        intensity_image=image,
        properties=("label", "area", "centroid", "bbox", "intensity_mean"),
    )
    if image.ndim == 2:
        channel_means = [table["intensity_mean"]] * 3
    else:
        channel_means = [table[f"intensity_mean-{channel}"] for channel in range(3)]
    rows = []
    for index in range(len(table["label"])):
        red, green, blue = (float(means[index]) for means in channel_means)
        rows.append(
            {
                "label": int(table["label"][index]),
                "area": int(table["area"][index]),
                "centroid_x": round(float(table["centroid-1"][index]) + PIXEL_CENTRE, 3),
                "centroid_y": round(float(table["centroid-0"][index]) + PIXEL_CENTRE, 3),
                "min_x": int(table["bbox-1"][index]),
                "min_y": int(table["bbox-0"][index]),
                "max_x": int(table["bbox-3"][index]),
                "max_y": int(table["bbox-2"][index]),
                "mean_intensity": round_intensity((red + green + blue) / 3),
                "mean_red": round_intensity(red),
                "mean_green": round_intensity(green),
                "mean_blue": round_intensity(blue),
                "intensity_dtype": image.dtype.name,
            }
        )
    return rows


def round_intensity(value: float) -> float:
    """``value`` to ``INTENSITY_SIGNIFICANT_DIGITS`` significant digits."""
    return float(f"{value:.{INTENSITY_SIGNIFICANT_DIGITS}g}")


def encode_csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> bytes:
    """CSV bytes with a header row (written even when there are no rows)."""
    buffer = bytes_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def encode_nuclei_csv(labels: np.ndarray, image: np.ndarray) -> bytes:
    """The nuclei table of ``nuclei_table`` as CSV; ``image`` in the input's own units."""
    return encode_csv(nuclei_table(labels, image), NUCLEI_COLUMNS)


def draw_outlines(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A copy of the RGB image with each nucleus's inner boundary pixels in ``OUTLINE_COLOUR``."""
    overlay = np.array(image, dtype=np.uint8, copy=True)
    overlay[find_boundaries(labels, mode="inner")] = OUTLINE_COLOUR
    return overlay


def encode_overlay_png(image: np.ndarray, labels: np.ndarray) -> bytes:
    return encode_png(draw_outlines(image, labels))


def encode_outputs(
    image: np.ndarray,
    mask: np.ndarray,
    labels: np.ndarray,
    stem: str,
    original: np.ndarray | None = None,
) -> dict[str, bytes]:
    """{file name: bytes} of all five outputs of one image.

    ``image`` is the RGB uint8 rendering (drawn on in the overlay); ``original`` the image in its
    own units (``decode_image_with_original``) for the nuclei table's intensities, by default
    ``image`` itself.
    """
    names = output_names(stem)
    intensities = image if original is None else original
    return {
        names["mask"]: encode_mask_png(mask),
        names["labels"]: encode_labels_tiff(labels),
        names["geojson"]: encode_geojson(labels),
        names["nuclei"]: encode_nuclei_csv(labels, intensities),
        names["overlay"]: encode_overlay_png(image, labels),
    }


MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ("input", "status", "message", "nuclei", "seconds")
STATUS_OK, STATUS_ERROR, STATUS_SKIPPED = "ok", "error", "skipped"
MANIFEST_STATUSES = (STATUS_OK, STATUS_ERROR, STATUS_SKIPPED)


def image_stem(uri: str) -> str:
    """The file name without its last suffix: ``s3://b/x/slide.1.tif`` -> ``slide.1``."""
    return PurePosixPath(str(uri).replace("\\", "/")).stem


def manifest_row(
    uri: str, status: str, message: str = "", nuclei: int | str = "", seconds: float = 0.0
) -> dict[str, Any]:
    """One manifest row; ``nuclei`` is blank when unknown (errors)."""
    return {
        "input": uri,
        "status": status,
        "message": message,
        "nuclei": nuclei,
        "seconds": round(seconds, 3),
    }


def read_previous_nuclei(manifest_uri: str) -> dict[str, str]:
    """{input: nuclei} of an earlier manifest, so skipped rows keep their counts."""
    if not exists(manifest_uri):
        return {}
    try:
        text = read_bytes(manifest_uri).decode()
    except (OSError, UnicodeDecodeError):
        return {}
    return {
        row["input"]: row.get("nuclei", "")
        for row in csv.DictReader(bytes_io.StringIO(text))
        if row.get("status") in (STATUS_OK, STATUS_SKIPPED) and "input" in row
    }


def write_manifest(rows: list[dict[str, Any]], manifest_uri: str) -> None:
    """``manifest.csv`` sorted by input, written whole."""
    buffer = bytes_io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=list(MANIFEST_COLUMNS), lineterminator="\n", extrasaction="ignore"
    )
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda row: row["input"]))
    write_bytes_atomic(manifest_uri, buffer.getvalue().encode())
