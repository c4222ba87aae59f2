"""Whole-slide outputs, written region by region: region parts, then the assembled slide files.

An actor encodes each finished region as one *part* (``<stem>.parts/<key>.npz``): its nuclei as
labels 1..K on its spill box, cut along its core's edges into up to nine pieces (the centre piece
lands in its own core, the others in its neighbours' cores), their GeoJSON features and their
table rows. When all regions are done, ``assemble_slide`` writes, never holding more than one
region-sized block of labels:

- ``<stem>.labels.ome.tif``: uint32 instance labels, unique across the slide (region offsets
  added), as a tiled (256 px, zlib), pyramidal OME-TIFF (BigTIFF; reduced levels in SubIFDs,
  nearest-neighbour halving, physical pixel size when known). OME-TIFF rather than OME-Zarr
  because one file opens directly in QuPath (Bio-Formats) and in napari (tifffile, as a
  multiscale zarr store), is copied and uploaded as one object, and needs no extra reader; the
  levels are built first in a temporary local zarr store, block by block, then streamed tile by
  tile into the TIFF.
- ``<stem>.geojson`` (``.geojson.gz`` above ``GEOJSON_GZIP_NUCLEI`` nuclei): QuPath detections,
  streamed feature by feature, in level-0 pixels of QuPath's frame (a bounded slide's
  ``bounds-x/-y`` subtracted, as QuPath crops such slides to their bounds), each with a
  deterministic id, the Nucleus class and its colour, and its measurements.
- ``<stem>.nuclei.parquet``: one row per nucleus (``SLIDE_COLUMNS``: label, id, position in the
  slide's and in QuPath's frame, areas and shape in level-0 pixels and microns, mean
  probability, mean colour, region), one row group per region; key-value metadata
  (``table_metadata``) names the pixel size, frame scale, bounds, source, checkpoint, version.
- ``<stem>.overlay.png``: nucleus outlines over a low-resolution view of the slide.
- ``<stem>.slide.json``: the run's summary (regions done/skipped/failed, time split, per-actor
  peak memory), written last: its ``ok`` status marks the outputs complete.
"""

from __future__ import annotations

import gzip
import io as bytes_io
import json
import os
import shutil
import tempfile
import time
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from unet_ray.core.config import LABEL_TILE
from unet_ray.core.regions import OVERVIEW_MAX_SIDE, Box
from unet_ray.io.files import (
    fsspec_filesystem,
    is_s3,
    join_uri,
    list_files,
    local_path,
    make_dirs,
    read_bytes,
)
from unet_ray.io.images import encode_png
from unet_ray.io.slide_reader import SlideReader, read_overview
from unet_ray.io.writers import (
    NUCLEI_COLUMNS,
    OUTLINE_COLOUR,
    QUPATH_COLUMNS,
    STATUS_OK,
    PixelGeometry,
    column_units,
    feature_id,
    label_features,
    measure_nuclei,
    package_version,
)

LABELS_SUFFIX = ".labels.ome.tif"
GEOJSON_SUFFIX = ".geojson"
GEOJSON_GZIP_SUFFIX = ".geojson.gz"
TABLE_SUFFIX = ".nuclei.parquet"
OVERLAY_SUFFIX = ".overlay.png"
GEOJSON_GZIP_NUCLEI = 100_000  # more nuclei than this: the GeoJSON is gzipped (about 10x smaller)
TIFF_COMPRESSION = "zlib"
LEVEL_BLOCK = 2048  # output pixels per side built at a time for each reduced level
NEIGHBOURS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
SLIDE_COLUMNS = (*NUCLEI_COLUMNS, *QUPATH_COLUMNS, "region")  # the Parquet table's columns


def output_names(stem: str, gzipped: bool = False) -> dict[str, str]:
    return {
        "labels": stem + LABELS_SUFFIX,
        "geojson": stem + (GEOJSON_GZIP_SUFFIX if gzipped else GEOJSON_SUFFIX),
        "nuclei": stem + TABLE_SUFFIX,
        "overlay": stem + OVERLAY_SUFFIX,
        "summary": stem + SUMMARY_SUFFIX,
    }


# ----------------------------------------------------------------------------- region parts


def piece_name(dy: int, dx: int) -> str:
    return f"labels_{dy + 1}{dx + 1}"


def split_pieces(kept: np.ndarray, region) -> dict[str, np.ndarray]:
    """The spill-box labels cut along the core's edges: piece (dy, dx) lies in the core of the
    neighbour ``dy`` rows and ``dx`` columns away ((0, 0): the region's own core)."""
    spill, core = region.spill, region.core
    row_bands = {
        -1: (spill.top, core.top),
        0: (core.top, core.bottom),
        1: (core.bottom, spill.bottom),
    }
    column_bands = {
        -1: (spill.left, core.left),
        0: (core.left, core.right),
        1: (core.right, spill.right),
    }
    pieces = {}
    for dy, dx in NEIGHBOURS:
        (top, bottom), (left, right) = row_bands[dy], column_bands[dx]
        if bottom <= top or right <= left:
            continue
        piece = kept[top - spill.top : bottom - spill.top, left - spill.left : right - spill.left]
        if dy == dx == 0 or piece.any():
            pieces[piece_name(dy, dx)] = piece
    return pieces


def region_geometry(plan, region) -> PixelGeometry:
    """Where ``region``'s spill box lies: level-0 scale, pixel size, QuPath's offset."""
    bounds = getattr(plan, "bounds", None) or (0, 0)
    return PixelGeometry(
        top=region.spill.top,
        left=region.spill.left,
        scale=plan.scale,
        mpp=plan.mpp / plan.scale if plan.mpp else None,  # plan.mpp: microns per frame pixel
        bounds_x=int(bounds[0]),
        bounds_y=int(bounds[1]),
    )


def encode_region_part(
    kept: np.ndarray, image: np.ndarray, probability: np.ndarray | None, region, plan
) -> bytes:
    """One region's part: label pieces, GeoJSON features and table rows (local labels 1..K;
    ids are given once labels are slide-wide). ``kept``, ``image`` and ``probability`` (the
    nucleus map) cover the region's spill box."""
    geometry = region_geometry(plan, region)
    rows = measure_nuclei(kept, image, probability, geometry)
    features = [
        json.dumps(feature, separators=(",", ":"))
        for feature in label_features(kept, rows, geometry)
    ]
    meta = {"nuclei": int(kept.max()) if kept.size else 0, "key": region.key}
    arrays = {name: piece for name, piece in split_pieces(kept, region).items()}
    arrays["features"] = np.frombuffer("\n".join(features).encode(), dtype=np.uint8)
    arrays["table"] = np.frombuffer(json.dumps(rows).encode(), dtype=np.uint8)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buffer = bytes_io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


class PartCache:
    """Region parts read on demand (one GET each) and dropped once assembly has moved on."""

    def __init__(self, plan):
        self.plan = plan
        self.uri_of = lambda key: part_uri(plan, key)
        self.parts: dict[str, Any] = {}

    def get(self, key: str):
        if key not in self.parts:
            self.parts[key] = np.load(bytes_io.BytesIO(read_bytes(self.uri_of(key))))
        return self.parts[key]

    def drop_rows_before(self, row: int) -> None:
        for key in [key for key in self.parts if int(key[1:5]) < row]:
            del self.parts[key]

    def meta(self, key: str) -> dict[str, Any]:
        return json.loads(bytes(self.get(key)["meta"]))


# ----------------------------------------------------------------------------- assembly


def region_offsets(plan, parts: PartCache) -> dict[str, int]:
    """Label offset of each segmented region (row-major), so labels are unique slide-wide."""
    offsets, total = {}, 0
    for region in plan.regions():
        if region.key in set(plan.to_segment):
            offsets[region.key] = total
            total += int(parts.meta(region.key)["nuclei"])
            parts.parts.pop(region.key, None)
    offsets["__total__"] = total
    return offsets


def compose_core(plan, region, by_position, parts: PartCache, offsets) -> np.ndarray | None:
    """The labels of one core: its own nuclei first, then what its neighbours' nuclei spill
    into it where it has none; None when no segmented region touches it."""
    block = None
    for dy, dx in [(0, 0)] + [pair for pair in NEIGHBOURS if pair != (0, 0)]:
        neighbour = by_position.get((region.row - dy, region.column - dx))
        if neighbour is None or neighbour.key not in offsets:
            continue
        part = parts.get(neighbour.key)
        name = piece_name(dy, dx)
        if name not in part.files:
            continue
        piece = part[name]
        if block is None:
            block = np.zeros((region.core.height, region.core.width), dtype=np.uint32)
        piece_box = piece_placement(neighbour, dy, dx)
        target = block[piece_box.within(region.core)]
        empty = (target == 0) & (piece > 0)
        target[empty] = piece[empty] + offsets[neighbour.key]
    return block


def piece_placement(region, dy: int, dx: int):
    """Where piece (dy, dx) of ``region`` lies in the frame."""
    spill, core = region.spill, region.core
    rows = {-1: (spill.top, core.top), 0: (core.top, core.bottom), 1: (core.bottom, spill.bottom)}
    columns = {
        -1: (spill.left, core.left),
        0: (core.left, core.right),
        1: (core.right, spill.right),
    }
    return Box(*rows[dy], *columns[dx])


def build_levels(plan, parts: PartCache, offsets, folder: str) -> list:
    """Level 0 and its nearest-neighbour halvings as local zarr arrays (chunks of one tile)."""
    import zarr

    shape = (plan.frame_height, plan.frame_width)
    level0 = zarr.open_array(
        os.path.join(folder, "0"),
        mode="w",
        shape=shape,
        chunks=(LABEL_TILE, LABEL_TILE),
        dtype="uint32",
        fill_value=0,
    )
    regions = plan.regions()
    by_position = {(region.row, region.column): region for region in regions}
    for region in regions:
        parts.drop_rows_before(region.row - 1)
        block = compose_core(plan, region, by_position, parts, offsets)
        if block is not None:
            level0[region.core.top : region.core.bottom, region.core.left : region.core.right] = (
                block
            )
    levels = [level0]
    while max(levels[-1].shape) > LABEL_TILE:
        levels.append(halve_level(levels[-1], os.path.join(folder, str(len(levels)))))
    return levels


def halve_level(source, path: str):
    """Every other row and column of ``source`` (nearest neighbour keeps labels exact)."""
    import zarr

    height, width = (-(-side // 2) for side in source.shape)
    target = zarr.open_array(
        path, mode="w", shape=(height, width), chunks=source.chunks, dtype="uint32", fill_value=0
    )
    for top in range(0, height, LEVEL_BLOCK):
        for left in range(0, width, LEVEL_BLOCK):
            block = source[2 * top : 2 * (top + LEVEL_BLOCK), 2 * left : 2 * (left + LEVEL_BLOCK)]
            target[top : top + LEVEL_BLOCK, left : left + LEVEL_BLOCK] = block[::2, ::2]
    return target


def level_tiles(level, tile: int):
    """The tiles of a zarr level in TIFF order, edge tiles zero-padded to full size."""
    height, width = level.shape
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            block = np.asarray(level[top : top + tile, left : left + tile])
            if block.shape != (tile, tile):
                block = np.pad(block, ((0, tile - block.shape[0]), (0, tile - block.shape[1])))
            yield block


def write_labels_tiff(levels: list, path: str, mpp: float | None) -> None:
    """The levels as one tiled pyramidal OME-TIFF (level 0 + SubIFDs)."""
    import tifffile

    metadata: dict[str, Any] = {"axes": "YX", "Name": "nucleus labels"}
    options: dict[str, Any] = {}
    if mpp:
        metadata.update(
            PhysicalSizeX=mpp, PhysicalSizeY=mpp, PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm"
        )
        options = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    tile = (LABEL_TILE, LABEL_TILE)
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tiff:
        for index, level in enumerate(levels):
            common = {
                "shape": level.shape,
                "dtype": np.uint32,
                "tile": tile,
                "compression": TIFF_COMPRESSION,
                "photometric": "minisblack",
            }
            if index == 0:
                tiff.write(
                    level_tiles(level, LABEL_TILE),
                    subifds=len(levels) - 1,
                    metadata=metadata,
                    **common,
                    **options,
                )
            else:
                level_options = {}
                if mpp:
                    level_mpp = mpp * (2**index)
                    level_options = {
                        "resolution": (1e4 / level_mpp, 1e4 / level_mpp),
                        "resolutionunit": "CENTIMETER",
                    }
                tiff.write(level_tiles(level, LABEL_TILE), subfiletype=1, **common, **level_options)


def write_geojson(plan, parts: PartCache, offsets, path: str, gzipped: bool) -> None:
    """A FeatureCollection streamed region by region, labels made slide-wide."""
    opener = gzip.open if gzipped else open
    with opener(path, "wt", encoding="utf-8") as stream:
        stream.write('{"type":"FeatureCollection","features":[')
        first = True
        for key in ordered_segmented(plan):
            text = bytes(parts.get(key)["features"]).decode()
            parts.parts.pop(key, None)
            for line in text.splitlines():
                feature = json.loads(line)
                label = feature["properties"]["measurements"]["label"] + offsets[key]
                feature["properties"]["measurements"]["label"] = label
                feature = {"type": "Feature", "id": feature_id(plan.stem, label), **feature}
                stream.write(("" if first else ",") + json.dumps(feature, separators=(",", ":")))
                first = False
        stream.write("]}\n")


def table_schema(metadata: dict[str, str] | None = None):
    import pyarrow as pa

    types = {
        "label": pa.uint32(),
        "id": pa.string(),
        "intensity_dtype": pa.string(),
        "region": pa.string(),
    }
    fields = [pa.field(name, types.get(name, pa.float64())) for name in SLIDE_COLUMNS]
    return pa.schema(fields, metadata=metadata)


def table_metadata(plan, summary: dict[str, Any]) -> dict[str, str]:
    """The Parquet file's key-value metadata: what its numbers mean and where they come from."""
    bounds = getattr(plan, "bounds", None)
    values = {
        "source": plan.uri,
        "checkpoint": summary.get("checkpoint"),
        "version": package_version(),
        "pixel_size_um": plan.mpp / plan.scale if plan.mpp else None,  # per level-0 pixel
        "segmented_pixel_size_um": plan.mpp,
        "frame_scale": plan.scale,  # level-0 pixels per segmented pixel
        "bounds_px": list(bounds) if bounds else None,  # x, y, width, height on level 0
        "qupath_offset_px": [bounds[0], bounds[1]] if bounds else [0, 0],
        "units": column_units(SLIDE_COLUMNS),
    }
    return {f"unet_ray.{key}": json.dumps(value) for key, value in values.items()}


def write_table(plan, parts: PartCache, offsets, path: str, metadata: dict[str, str]) -> None:
    """The nuclei table as Parquet, one row group per region, labels and ids slide-wide."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = table_schema(metadata)
    with pq.ParquetWriter(path, schema) as writer:
        for key in ordered_segmented(plan):
            rows = json.loads(bytes(parts.get(key)["table"]))
            parts.parts.pop(key, None)
            if not rows:
                continue
            for row in rows:
                row["label"] += offsets[key]
                row["id"] = feature_id(plan.stem, row["label"])
                row["region"] = key
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
        if writer.is_open and not plan.to_segment:
            writer.write_table(schema.empty_table())


def write_overlay(plan, levels: list, path: str) -> None:
    """Outlines (from the finest label level that fits the overview) over the slide's overview."""
    from skimage.segmentation import find_boundaries

    level = next(level for level in levels if max(level.shape) <= OVERVIEW_MAX_SIDE)
    labels = np.asarray(level[:])
    reader = SlideReader(plan.uri, plan.intensity)
    try:
        overlay = read_overview(reader, *labels.shape)
    finally:
        reader.close()
    overlay[find_boundaries(labels, mode="inner")] = OUTLINE_COLOUR
    with open(path, "wb") as stream:
        stream.write(encode_png(overlay))


def ordered_segmented(plan) -> list[str]:
    segmented = set(plan.to_segment)
    return [region.key for region in plan.regions() if region.key in segmented]


def work_folder(output_uri: str) -> str:
    """A temporary folder: hidden inside a local output folder (so files move by rename), else
    in the system's temporary space."""
    if is_s3(output_uri):
        return tempfile.mkdtemp(prefix="unet_ray_slide_")
    make_dirs(output_uri)
    return tempfile.mkdtemp(prefix=".unet_ray_slide_", dir=local_path(output_uri))


def publish(local_file: str, uri: str) -> None:
    """Move a finished local file to its output URI (rename locally; one upload to S3)."""
    if is_s3(uri):
        filesystem, path = fsspec_filesystem(uri)
        filesystem.put_file(local_file, path)
        return
    os.replace(local_file, local_path(uri))


def remove_parts(plan) -> None:
    filesystem, path = fsspec_filesystem(plan.parts_uri)
    if filesystem.exists(path):
        filesystem.rm(path, recursive=True)


def assemble_slide(plan, summary: dict[str, Any]) -> int:
    """Write all outputs of one slide from its parts; returns the slide's nuclei count."""
    started = time.perf_counter()
    parts = PartCache(plan)
    offsets = region_offsets(plan, parts)
    nuclei = offsets.pop("__total__")
    gzipped = nuclei > GEOJSON_GZIP_NUCLEI
    names = output_names(plan.stem, gzipped)
    folder = work_folder(plan.output_uri)
    try:
        levels = build_levels(plan, parts, offsets, os.path.join(folder, "levels.zarr"))
        local = {kind: os.path.join(folder, name) for kind, name in names.items()}
        write_labels_tiff(levels, local["labels"], plan.mpp)
        write_overlay(plan, levels, local["overlay"])
        write_geojson(plan, parts, offsets, local["geojson"], gzipped)
        write_table(plan, parts, offsets, local["nuclei"], table_metadata(plan, summary))
        summary = {**summary, "seconds": dict(summary["seconds"])}
        summary["seconds"]["assemble_s"] = round(time.perf_counter() - started, 3)
        document = {
            "input": plan.uri,
            "status": STATUS_OK,
            "nuclei": nuclei,
            "outputs": {kind: name for kind, name in names.items() if kind != "summary"},
            "frame": {"height": plan.frame_height, "width": plan.frame_width},
            "mpp": plan.mpp,
            "level0_pixels_per_frame_pixel": plan.scale,
            "bounds": getattr(plan, "bounds", None),  # x, y, width, height: QuPath's crop
            "region": plan.region,
            "halo": plan.halo,
            "label_levels": len(levels),
            **summary,
        }
        with open(local["summary"], "w") as stream:
            json.dump(document, stream, indent=2)
        for kind in ("labels", "overlay", "geojson", "nuclei", "summary"):  # summary last
            publish(local[kind], join_uri(plan.output_uri, names[kind]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    remove_parts(plan)
    return nuclei


PARTS_SUFFIX = ".parts"  # <stem>.parts/: one file per finished region


SUMMARY_SUFFIX = ".slide.json"


def part_uri(plan, key: str) -> str:
    return join_uri(plan.parts_uri, f"{key}.npz")


def output_file_names(stem: str) -> list[str]:
    return list(output_names(stem).values())


def is_own_output(uri: str) -> bool:
    """Our slide outputs (labels OME-TIFF) are never inputs of a later run."""
    return PurePosixPath(str(uri)).name.endswith(LABELS_SUFFIX)


def existing_parts(plan_parts_uri: str) -> set[str]:
    return {
        PurePosixPath(uri).name[: -len(".npz")] for uri in list_files(plan_parts_uri, (".npz",))
    }
