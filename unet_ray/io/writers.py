"""Encoders for the segmentation outputs: mask PNG, uint32 labels TIFF, GeoJSON, nuclei CSV, overlay.

Each function turns arrays into the bytes of one file, so the caller can write it whole (atomic
rename or a single S3 put). No I/O, no Ray, no torch.

Coordinates follow QuPath's (and most viewers') convention: x to the right, y down, in pixels,
with the image's top-left *corner* at (0, 0), so pixel (row r, column c) covers
[c, c + 1) x [r, r + 1) and its centre is (c + 0.5, r + 0.5). Polygons trace the boundary half-way
between a nucleus's edge pixels and the background (marching squares at level 0.5), so a
polygon's area equals its pixel count up to the corners it cuts (a few percent for nuclei of 50
pixels, less for larger ones).

Every measurement names its unit and its frame (``NUCLEI_COLUMNS``): ``*_px`` in level-0 pixels
of the input (a slide segmented at a coarser ``--mpp`` is measured in its level-0 pixels, like its
polygons), ``*_um``/``*_um2`` in microns when the pixel size is known (blank otherwise);
``qupath_*`` columns (slides) are in QuPath's frame, shifted by a bounded slide's bounds offset.
``PixelGeometry`` says where a label array lies in those frames.

``<stem>.nuclei.csv`` reports mean intensities in the input image's own units: raw 16-bit values
for a 16-bit image, the file's values for a float image, 0..255 for an 8-bit one (never the 8-bit
rendering the network sees); its ``intensity_dtype`` column names that pixel type.
"""

from __future__ import annotations

import csv
import io as bytes_io
import json
import uuid
from dataclasses import dataclass
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
NUCLEUS_COLOUR = OUTLINE_COLOUR  # the class colour QuPath shows: the overlay's outline colour
FEATURE_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://unet-ray/nucleus")  # feature ids
NUCLEI_COLUMNS = (
    "label",
    "id",  # the GeoJSON feature's id: uuid5 of the input's stem and the label
    "centroid_x_px",  # level-0 pixels of the input, origin at its top-left corner
    "centroid_y_px",
    "centroid_x_um",  # the same point in microns (blank: pixel size unknown)
    "centroid_y_um",
    "min_x_px",  # bounding box, level-0 pixels; max is the far edge (exclusive)
    "min_y_px",
    "max_x_px",
    "max_y_px",
    "area_px",  # level-0 pixels (squared)
    "area_um2",
    "perimeter_px",  # level-0 pixels (skimage's perimeter, 4-connected)
    "perimeter_um",
    "major_axis_px",  # axes of the ellipse with the same second moments, level-0 pixels
    "minor_axis_px",
    "major_axis_um",
    "minor_axis_um",
    "eccentricity",  # of that ellipse: 0 a circle, towards 1 elongated
    "solidity",  # area / convex hull area
    "mean_probability",  # the network's mean nucleus probability over the nucleus
    "mean_intensity",
    "mean_red",
    "mean_green",
    "mean_blue",
    "intensity_dtype",  # pixel type of the input, whose raw units the mean_* columns are in
)
QUPATH_COLUMNS = (  # slides: QuPath's frame (level-0 minus a bounded slide's bounds-x/-y)
    "qupath_centroid_x_px",
    "qupath_centroid_y_px",
    "qupath_centroid_x_um",
    "qupath_centroid_y_um",
    "qupath_min_x_px",
    "qupath_min_y_px",
    "qupath_max_x_px",
    "qupath_max_y_px",
)
GEOJSON_MEASUREMENTS = (  # per feature, QuPath's "measurements" (omitted when unknown)
    "label",
    "area_px",
    "area_um2",
    "perimeter_px",
    "perimeter_um",
    "major_axis_px",
    "minor_axis_px",
    "major_axis_um",
    "minor_axis_um",
    "eccentricity",
    "solidity",
    "mean_probability",
)
LENGTH_DECIMALS = 3  # coordinates, lengths and areas
RATIO_DECIMALS = 4  # eccentricity, solidity, probability
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


@dataclass(frozen=True)
class PixelGeometry:
    """Where a label array lies in the output frames, and how large its pixels are.

    Array pixel (row r, column c) covers [(left + c) * scale, (left + c + 1) * scale) in x (rows
    alike) of QuPath's frame, in level-0 pixels: ``top``/``left`` place the array in the
    segmented frame, ``scale`` is level-0 pixels per frame pixel (1 for whole images; 2 for a
    slide segmented at half its resolution). A bounded slide's frame starts at its bounds, as
    QuPath's does: level 0 is QuPath's frame shifted by ``(bounds_x, bounds_y)``. ``mpp`` is
    microns per level-0 pixel (None: unknown)."""

    top: int = 0
    left: int = 0
    scale: float = 1.0
    mpp: float | None = None
    bounds_x: int = 0
    bounds_y: int = 0

    def to_qupath(self, ring_xy: np.ndarray) -> np.ndarray:
        """Array (x, y) coordinates (pixel corners as in the module docstring) -> QuPath's
        frame, level-0 pixels."""
        return (ring_xy + (self.left, self.top)) * self.scale

    def to_level0(self, ring_xy: np.ndarray) -> np.ndarray:
        """Array (x, y) coordinates -> the slide's level 0 (QuPath's frame plus the bounds)."""
        return self.to_qupath(ring_xy) + (self.bounds_x, self.bounds_y)


def feature_id(stem: str, label: int) -> str:
    """A deterministic UUID for nucleus ``label`` of the input ``stem`` (QuPath's feature id)."""
    return str(uuid.uuid5(FEATURE_ID_NAMESPACE, f"{stem}/{int(label)}"))


def feature_for_object(
    label: int,
    rings: list[np.ndarray],
    measurements: dict[str, Any],
    object_id: str | None = None,
) -> dict[str, Any]:
    """One QuPath detection Feature (Polygon, or MultiPolygon for a split object): its id, the
    Nucleus class with its colour, and ``measurements`` (numbers only; None values left out)."""
    coordinates = [np.round(ring, COORDINATE_DECIMALS).tolist() for ring in rings]
    if len(coordinates) == 1:
        geometry = {"type": "Polygon", "coordinates": coordinates}
    else:
        geometry = {"type": "MultiPolygon", "coordinates": [[ring] for ring in coordinates]}
    feature: dict[str, Any] = {"type": "Feature"}
    if object_id is not None:
        feature["id"] = object_id
    values = {"label": int(label)}
    values.update({key: value for key, value in measurements.items() if value is not None})
    feature.update(
        geometry=geometry,
        properties={
            "objectType": "detection",
            "classification": {"name": NUCLEUS_CLASS, "color": list(NUCLEUS_COLOUR)},
            "measurements": values,
        },
    )
    return feature


def label_features(
    labels: np.ndarray,
    rows: list[dict[str, Any]],
    geometry: PixelGeometry,
    stem: str | None = None,
) -> list[dict[str, Any]]:
    """One Feature per nucleus of ``labels`` (rows from ``measure_nuclei``, same labels), in
    QuPath's frame; with ``stem`` each gets its id (slides add it once labels are final)."""
    by_label = {row["label"]: row for row in rows}
    features = []
    for index, slices in enumerate(ndimage.find_objects(labels), start=1):
        if slices is None or index not in by_label:
            continue
        rings = polygon_rings(labels[slices] == index, slices[0].start, slices[1].start)
        if not rings:
            continue
        rings = [geometry.to_qupath(ring) for ring in rings]
        measurements = {key: by_label[index][key] for key in GEOJSON_MEASUREMENTS}
        object_id = feature_id(stem, index) if stem is not None else None
        features.append(feature_for_object(index, rings, measurements, object_id))
    return features


def geojson_from_labels(
    labels: np.ndarray,
    stem: str = "",
    probability: np.ndarray | None = None,
    geometry: PixelGeometry = PixelGeometry(),
) -> dict[str, Any]:
    """A QuPath-importable FeatureCollection: one detection polygon per labelled nucleus."""
    labels = np.asarray(labels)
    rows = measure_nuclei(labels, None, probability, geometry)
    return {"type": "FeatureCollection", "features": label_features(labels, rows, geometry, stem)}


def encode_geojson(
    labels: np.ndarray,
    stem: str = "",
    probability: np.ndarray | None = None,
    geometry: PixelGeometry = PixelGeometry(),
) -> bytes:
    collection = geojson_from_labels(labels, stem, probability, geometry)
    return json.dumps(collection, separators=(",", ":")).encode()


SHAPE_PROPERTIES = (
    "label",
    "area",
    "centroid",
    "bbox",
    "perimeter",
    "axis_major_length",
    "axis_minor_length",
    "eccentricity",
    "solidity",
)


def measure_nuclei(
    labels: np.ndarray,
    image: np.ndarray | None,
    probability: np.ndarray | None = None,
    geometry: PixelGeometry = PixelGeometry(),
) -> list[dict[str, Any]]:
    """One row per nucleus with the ``NUCLEI_COLUMNS`` and ``QUPATH_COLUMNS`` but the id.

    Shapes are measured on ``labels`` and put in level-0 pixels and microns by ``geometry``
    (bbox max is the far edge, i.e. exclusive). ``probability``: the nucleus probability map of
    the same shape (``mean_probability``; None: blank). The intensities are of ``image`` as given,
    (H x W) or (H x W x 3) of any numeric dtype, in its own units (pass the original, not the
    8-bit rendering): ``mean_red/green/blue`` per channel (all three equal for a grayscale image)
    and ``mean_intensity`` their average; None leaves them blank.
    """
    labels = np.asarray(labels)
    check_same_size(labels, image, probability)
    if not labels.any():
        return []
    table = regionprops_table(labels.astype(np.int32, copy=False), properties=SHAPE_PROPERTIES)
    means = mean_probabilities(labels, probability, table["label"])
    intensities = mean_intensities(labels, image, table["label"])
    rows = []
    for index in range(len(table["label"])):
        row = shape_row(table, index, geometry)
        row["mean_probability"] = means[index]
        row.update(intensities[index])
        rows.append(row)
    return rows


def check_same_size(labels: np.ndarray, image, probability) -> None:
    if image is not None:
        image = np.asarray(image)
        if image.shape[:2] != labels.shape:
            raise ValueError(f"labels {labels.shape} and image {image.shape[:2]} differ in size")
        if image.ndim == 3 and image.shape[2] != 3:
            raise ValueError(f"image must be H x W or H x W x 3, got shape {image.shape}")
    if probability is not None and np.shape(probability) != labels.shape:
        raise ValueError(
            f"labels {labels.shape} and probability {np.shape(probability)} differ in size"
        )


def shape_row(table: dict[str, np.ndarray], index: int, geometry: PixelGeometry) -> dict[str, Any]:
    """The label, position and shape columns of nucleus ``index`` of a regionprops table."""
    scale, mpp = geometry.scale, geometry.mpp

    def length(value: float, power: int = 1) -> float | int:
        return plain_number(float(value) * scale**power)

    def microns(level0: float, power: int = 1) -> float | None:
        return None if mpp is None else round(level0 * mpp**power, LENGTH_DECIMALS + 1)

    shift_x, shift_y = geometry.left, geometry.top  # frame -> level 0: scale, then bounds
    bounds_x, bounds_y = geometry.bounds_x, geometry.bounds_y
    x = (float(table["centroid-1"][index]) + PIXEL_CENTRE + shift_x) * scale + bounds_x
    y = (float(table["centroid-0"][index]) + PIXEL_CENTRE + shift_y) * scale + bounds_y
    box = {
        "min_x_px": plain_number((int(table["bbox-1"][index]) + shift_x) * scale + bounds_x),
        "min_y_px": plain_number((int(table["bbox-0"][index]) + shift_y) * scale + bounds_y),
        "max_x_px": plain_number((int(table["bbox-3"][index]) + shift_x) * scale + bounds_x),
        "max_y_px": plain_number((int(table["bbox-2"][index]) + shift_y) * scale + bounds_y),
    }
    row: dict[str, Any] = {
        "label": int(table["label"][index]),
        "centroid_x_px": round(x, LENGTH_DECIMALS),
        "centroid_y_px": round(y, LENGTH_DECIMALS),
        "centroid_x_um": microns(x),
        "centroid_y_um": microns(y),
        **box,
    }
    row["area_px"] = length(table["area"][index], 2)
    row["area_um2"] = microns(row["area_px"], 2)
    for name, prop in (
        ("perimeter", "perimeter"),
        ("major_axis", "axis_major_length"),
        ("minor_axis", "axis_minor_length"),
    ):
        row[f"{name}_px"] = length(table[prop][index])
        row[f"{name}_um"] = microns(row[f"{name}_px"])
    row["eccentricity"] = round(float(table["eccentricity"][index]), RATIO_DECIMALS)
    row["solidity"] = round(float(table["solidity"][index]), RATIO_DECIMALS)
    qx, qy = x - geometry.bounds_x, y - geometry.bounds_y
    row.update(
        qupath_centroid_x_px=round(qx, LENGTH_DECIMALS),
        qupath_centroid_y_px=round(qy, LENGTH_DECIMALS),
        qupath_centroid_x_um=microns(qx),
        qupath_centroid_y_um=microns(qy),
        qupath_min_x_px=box["min_x_px"] - geometry.bounds_x,
        qupath_min_y_px=box["min_y_px"] - geometry.bounds_y,
        qupath_max_x_px=box["max_x_px"] - geometry.bounds_x,
        qupath_max_y_px=box["max_y_px"] - geometry.bounds_y,
    )
    return row


def plain_number(value: float) -> float | int:
    """An int when ``value`` is whole (pixel counts and edges at scale 1), else rounded."""
    return int(value) if float(value).is_integer() else round(float(value), LENGTH_DECIMALS)


def mean_probabilities(
    labels: np.ndarray, probability: np.ndarray | None, label_ids: np.ndarray
) -> list[float | None]:
    """The mean of ``probability`` over each of ``label_ids`` (None without a map)."""
    if probability is None:
        return [None] * len(label_ids)
    flat = labels.ravel()
    count = int(flat.max()) + 1
    sums = np.bincount(flat, weights=np.asarray(probability, np.float64).ravel(), minlength=count)
    areas = np.bincount(flat, minlength=count)
    return [round(float(sums[label] / areas[label]), RATIO_DECIMALS) for label in label_ids]


def mean_intensities(
    labels: np.ndarray, image: np.ndarray | None, label_ids: np.ndarray
) -> list[dict[str, Any]]:
    """The ``mean_*`` columns and ``intensity_dtype`` of each of ``label_ids``."""
    keys = ("mean_intensity", "mean_red", "mean_green", "mean_blue", "intensity_dtype")
    if image is None:
        return [dict.fromkeys(keys) for _ in label_ids]
    image = np.asarray(image)
    table = regionprops_table(
        labels.astype(np.int32, copy=False), intensity_image=image, properties=("intensity_mean",)
    )
    if image.ndim == 2:
        channel_means = [table["intensity_mean"]] * 3
    else:
        channel_means = [table[f"intensity_mean-{channel}"] for channel in range(3)]
    rows = []
    for index in range(len(label_ids)):
        red, green, blue = (float(means[index]) for means in channel_means)
        rows.append(
            {
                "mean_intensity": round_intensity((red + green + blue) / 3),
                "mean_red": round_intensity(red),
                "mean_green": round_intensity(green),
                "mean_blue": round_intensity(blue),
                "intensity_dtype": image.dtype.name,
            }
        )
    return rows


def nuclei_table(
    labels: np.ndarray,
    image: np.ndarray,
    probability: np.ndarray | None = None,
    geometry: PixelGeometry = PixelGeometry(),
    stem: str = "",
) -> list[dict[str, Any]]:
    """One row per nucleus of a whole image (``NUCLEI_COLUMNS``, ids from ``stem``)."""
    rows = measure_nuclei(labels, image, probability, geometry)
    for row in rows:
        row["id"] = feature_id(stem, row["label"])
    return rows


def column_units(columns: tuple[str, ...]) -> dict[str, str]:
    """{column: its unit and frame} for the columns that have one (Parquet metadata, README)."""
    units = {}
    for column in columns:
        frame = "QuPath's frame" if column.startswith("qupath_") else "the input's level 0"
        if column.endswith("_um2"):
            units[column] = "square microns"
        elif column.startswith("area_px"):
            units[column] = "level-0 pixels squared"
        elif column.endswith("_px"):
            units[column] = f"level-0 pixels, {frame}"
        elif column.endswith("_um"):
            units[column] = f"microns, {frame}"
    return units


def package_version() -> str:
    """unet_ray's version (``unet_ray.__version__`` where defined, else the installed one)."""
    import unet_ray

    version = getattr(unet_ray, "__version__", None)
    if version:
        return str(version)
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("unet_ray")
    except PackageNotFoundError:
        return "unknown"


def round_intensity(value: float) -> float:
    """``value`` to ``INTENSITY_SIGNIFICANT_DIGITS`` significant digits."""
    return float(f"{value:.{INTENSITY_SIGNIFICANT_DIGITS}g}")


def encode_csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> bytes:
    """CSV bytes with a header row (written even when there are no rows); None is blank and
    columns not named are left out."""
    buffer = bytes_io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore"
    )
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def encode_nuclei_csv(
    labels: np.ndarray,
    image: np.ndarray,
    probability: np.ndarray | None = None,
    geometry: PixelGeometry = PixelGeometry(),
    stem: str = "",
) -> bytes:
    """The nuclei table of ``nuclei_table`` as CSV; ``image`` in the input's own units."""
    return encode_csv(nuclei_table(labels, image, probability, geometry, stem), NUCLEI_COLUMNS)


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
    probability: np.ndarray | None = None,
    mpp: float | None = None,
) -> dict[str, bytes]:
    """{file name: bytes} of all five outputs of one image.

    ``image`` is the RGB uint8 rendering (drawn on in the overlay); ``original`` the image in its
    own units (``decode_image_with_original``) for the nuclei table's intensities, by default
    ``image`` itself; ``probability`` the nucleus probability map (``mean_probability``);
    ``mpp`` the image's microns per pixel when known (the ``*_um`` columns and measurements).
    """
    names = output_names(stem)
    intensities = image if original is None else original
    geometry = PixelGeometry(mpp=mpp)
    return {
        names["mask"]: encode_mask_png(mask),
        names["labels"]: encode_labels_tiff(labels),
        names["geojson"]: encode_geojson(labels, stem, probability, geometry),
        names["nuclei"]: encode_nuclei_csv(labels, intensities, probability, geometry, stem),
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
