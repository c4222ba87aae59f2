"""The prepared-shard format that ``unet-ray prepare`` writes and training, validation and
``evaluate`` read: ``dataset.json``, training and validation tiles as Parquet, whole validation
images (one row each). No Ray: the Ray Data jobs that write and stream it live in
``unet_ray.pipelines.data``.
"""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import pyarrow as pa

from unet_ray.io.dsb import DatasetError
from unet_ray.io.files import (
    exists,
    is_s3,
    join_uri,
    read_bytes,
    resolve_filesystem,
    write_bytes_atomic,
)
from unet_ray.io.images import RGB_CHANNELS

DATASET_FORMAT = "unet_ray.tiles/2"  # /2: evenly spaced tiles, whole validation images
DATASET_INFO_FILE = "dataset.json"
TRAIN_SPLIT = "train"
VAL_SPLIT = "val"
SPLITS = (TRAIN_SPLIT, VAL_SPLIT)
VAL_IMAGES_DIR = "val_images"  # whole validation images, one row each


TILE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),  # the source image (DSB2018 sample id)
        ("tile_id", pa.string()),  # <sample_id>_r<row>_c<col>
        ("row", pa.int32()),  # tile grid position in its source image
        ("col", pa.int32()),
        ("height", pa.int32()),  # tile side (= tile_size)
        ("width", pa.int32()),
        ("image", pa.binary()),  # height*width*3 uint8, C-order RGB
        ("labels", pa.binary()),  # height*width int32 instance labels; mask = labels > 0
    ]
)


IMAGE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("image", pa.binary()),  # height*width*3 uint8 RGB
        ("labels", pa.binary()),  # height*width int32 instance labels
    ]
)


def read_split_images(prepared_uri: str, sample_ids: list[str] | None = None):
    """(sample_id, RGB uint8 image, int32 labels) of the whole validation images of prepared
    shards, in ``sample_ids`` order (all of them, sorted, when None). Only the row groups of the
    requested images are read."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    uri = join_uri(str(prepared_uri), VAL_IMAGES_DIR)
    filesystem, path = resolve_filesystem(uri)
    if sample_ids is not None and not sample_ids:
        return
    dataset = pads.dataset(path, filesystem=filesystem, format="parquet")
    wanted = None if sample_ids is None else pc.field("sample_id").isin(list(sample_ids))
    table = dataset.to_table(filter=wanted)
    rows = {row["sample_id"]: row for row in table.to_pylist()}
    order = sorted(rows) if sample_ids is None else list(sample_ids)
    missing = [sample_id for sample_id in order if sample_id not in rows]
    if missing:
        raise DatasetError(f"prepared dataset {prepared_uri} lacks validation images {missing}")
    for sample_id in order:
        row = rows.pop(sample_id)
        shape = (row["height"], row["width"])
        image = np.frombuffer(row["image"], dtype=np.uint8).reshape(*shape, RGB_CHANNELS)
        labels = np.frombuffer(row["labels"], dtype=np.int32).reshape(shape)
        yield sample_id, image, labels


def count_rows(split_uri: str) -> int:
    """Rows in the Parquet files under a folder, from their footers (no data read)."""
    import pyarrow.dataset as pads

    filesystem, path = resolve_filesystem(split_uri)
    return pads.dataset(path, filesystem=filesystem, format="parquet").count_rows()


def remove_dataset_info(output: str) -> None:
    """Delete OUTPUT/dataset.json so an interrupted prepare never looks complete."""
    filesystem, path = resolve_filesystem(join_uri(output, DATASET_INFO_FILE))
    with contextlib.suppress(FileNotFoundError):
        filesystem.delete_file(path)


def normalise_uri(uri: str) -> str:
    """s3:// URIs without a trailing slash; local paths absolute (Ray workers may run in
    another working directory)."""
    uri = str(uri)
    if is_s3(uri):
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def is_prepared(uri: str) -> bool:
    """Whether ``uri`` holds prepared shards (its dataset.json exists)."""
    try:
        return exists(join_uri(str(uri), DATASET_INFO_FILE))
    except (OSError, ValueError):
        return False


def read_dataset_info(uri: str) -> dict:
    """The dataset.json of prepared shards; DatasetError when missing or not ours."""
    info_uri = join_uri(str(uri), DATASET_INFO_FILE)
    try:
        info = json.loads(read_bytes(info_uri))
    except FileNotFoundError as error:
        raise DatasetError(
            f"{uri} is not a prepared dataset (no {DATASET_INFO_FILE}); "
            f"run `unet-ray prepare SRC {uri}` first"
        ) from error
    except json.JSONDecodeError as error:
        raise DatasetError(f"{info_uri} is not valid JSON ({error})") from error
    if not isinstance(info, dict) or info.get("format") != DATASET_FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise DatasetError(
            f"{info_uri} has format {found!r}, expected {DATASET_FORMAT!r}; prepare it again"
        )
    return info


MPP_KEY = "mpp"  # dataset.json: microns per pixel of the source images (`prepare --mpp`)


def record_dataset_mpp(uri: str, mpp: float | None) -> None:
    """Write the source images' microns per pixel into prepared shards' dataset.json (None
    removes it), so that training on them records it in its checkpoints."""
    info = read_dataset_info(uri)
    if mpp is None:
        info.pop(MPP_KEY, None)
    else:
        info[MPP_KEY] = float(mpp)
    write_bytes_atomic(join_uri(str(uri), DATASET_INFO_FILE), json.dumps(info, indent=2).encode())


def dataset_mpp(uri: str) -> float | None:
    """The microns per pixel recorded in prepared shards (None: not recorded, or not shards)."""
    if not is_prepared(uri):
        return None
    value = read_dataset_info(uri).get(MPP_KEY)
    return None if value is None else float(value)
