"""Ray Data pipelines for training: Parquet tile shards (prepare), the split, per-epoch augmentation.

Prepared dataset layout (``unet-ray prepare SRC OUT``)::

    OUT/dataset.json       {"format": "unet_ray.tiles/1", "tile_size", "seed", "val_fraction",
                            "source", "train": {"samples": [ids], "tiles": n}, "val": {...}}
    OUT/train/*.parquet    one row per tile (``TILE_SCHEMA``), zstd-compressed
    OUT/val/*.parquet
    OUT/val_images/*.parquet  one row per whole validation image (``IMAGE_SCHEMA``): validation
                           and `evaluate` score images at native size, as the DSB2018 score is
                           defined, not 256-px tiles

``dataset.json`` is written last, so a folder holding it is completely prepared; a failed or
interrupted ``prepare`` leaves no ``dataset.json`` (an earlier one is removed first).

Standardisation (the reference report: "images bigger than 256x256 were sliced; smaller ones were
symmetrically padded"), per image side independently:

- a side >= tile is covered by ``ceil(side / tile)`` tiles spread evenly from edge to edge
  (``tile_starts``), so the overlap between neighbours is shared out, never a near-duplicate
  tile at the edge. Every pixel lands in some tile and no tile needs padding;
- a side < tile is padded symmetrically (``np.pad`` mode ``"symmetric"``: mirrored, edge pixel
  repeated) to ``tile``: ``(tile - side) // 2`` before and the rest (one more when odd) after.
  The labels are padded the same way, so the mask stays the threshold of the mirrored image;
  then each mirrored copy of a nucleus is given its own instance id (connected pieces of one
  id are relabelled), so instance metrics never see one "nucleus" made of two mirrored blobs.
  A copy that touches its original across the image border stays joined to it, as in the image.

Training pipeline (``build_training_datasets``): shards -> random crop to ``image_size`` ->
albumentations augmentation -> model tensors, all inside one lazy ``map_batches``. The training
split is read once per epoch of the run, one pass after the other, in one dataset: one Ray Data
execution feeds every epoch (starting the pipeline stalled each epoch's first batch), and every
pass draws fresh, unseeded random numbers, so every epoch sees new transformations; nothing
after the augmentation is materialised.
"""

from __future__ import annotations

import json
import logging
import math
import os
from functools import lru_cache

import numpy as np
import pyarrow as pa

from unet_ray import io
from unet_ray.core.config import SIZE_MULTIPLE, DataConfig
from unet_ray.io.images import RGB_CHANNELS
from unet_ray.io.prepared import (
    DATASET_FORMAT,
    DATASET_INFO_FILE,
    IMAGE_SCHEMA,
    SPLITS,
    TILE_SCHEMA,
    TRAIN_SPLIT,
    VAL_IMAGES_DIR,
    VAL_SPLIT,
    count_rows,
    is_prepared,
    normalise_uri,
    read_dataset_info,
    remove_dataset_info,
)

# albumentations asks PyPI for a newer version on import unless told not to; never go online.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

logger = logging.getLogger(__name__)

PADDING_MODE = "symmetric"  # the report's "symmetrically padded"
PARQUET_COMPRESSION = "zstd"
MIN_TILES_PER_SHARD = 64  # rows per Parquet file (~30 MB raw at 256 px): parallel reads
SAMPLES_PER_READ_TASK = 4  # raw samples read and tiled per Ray task while preparing
AUGMENT_BATCH_SIZE = 16  # tiles per map_batches call (uint8 output: ~0.26 MB per 256^2 tile)


# Augmentation strengths (albumentations 2.x); elastic is slow, so it has its own probability.
FLIP_PROBABILITY = 0.5
ROTATE90_PROBABILITY = 0.5
AFFINE_PROBABILITY = 0.5
AFFINE_SCALE = (0.9, 1.1)
AFFINE_TRANSLATE = (-0.0625, 0.0625)  # fraction of the side
AFFINE_ROTATE_DEGREES = (-30.0, 30.0)
COLOUR_PROBABILITY = 0.5
BRIGHTNESS_LIMIT = 0.2
CONTRAST_LIMIT = 0.2
GAMMA_LIMIT = (80, 120)  # percent
BLUR_NOISE_PROBABILITY = 0.3
BLUR_LIMIT = (3, 5)  # odd kernel sides
BLUR_SIGMA = (0.3, 1.0)
NOISE_STD = (0.02, 0.06)  # fraction of the intensity range
ELASTIC_ALPHA = 300.0  # displacement scale: with sigma 12, ~2 px mean and ~5 px largest shift
ELASTIC_SIGMA = 12.0  # smoothing of the random displacement field (pixels)


# ----------------------------------------------------------------------------- tile geometry


def tile_starts(side: int, tile_size: int) -> list[int]:
    """Tile start offsets along one side >= tile_size: the fewest tiles that cover the side,
    spread evenly from edge to edge, so neighbours overlap by no more than the side needs
    (520 px at 256: starts 0, 132, 264, overlaps 124 px; edge-aligned tiles would overlap 248)."""
    if side < tile_size:
        raise ValueError(f"side {side} is smaller than the tile {tile_size}: pad it first")
    count = math.ceil(side / tile_size)
    if count == 1:
        return [0]
    return [round(index * (side - tile_size) / (count - 1)) for index in range(count)]


def padding_widths(side: int, tile_size: int) -> tuple[int, int]:
    """Symmetric padding (before, after) that brings a side up to tile_size; the odd pixel goes
    after. A side >= tile_size needs none."""
    missing = max(0, tile_size - side)
    return missing // 2, missing - missing // 2


def pad_to_tile(
    image: np.ndarray, labels: np.ndarray, tile_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pad sides shorter than tile_size symmetrically (image and labels alike); mirrored copies
    of a nucleus get their own instance ids (see the module docstring)."""
    rows = padding_widths(image.shape[0], tile_size)
    cols = padding_widths(image.shape[1], tile_size)
    if rows == (0, 0) and cols == (0, 0):
        return image, labels
    padded_image = np.pad(image, (rows, cols, (0, 0)), mode=PADDING_MODE)
    padded_labels = np.pad(labels, (rows, cols), mode=PADDING_MODE)
    return padded_image, relabel_connected(padded_labels)


def relabel_connected(labels: np.ndarray) -> np.ndarray:
    """Give every 8-connected piece of one label value its own id (1..N, int32)."""
    from skimage.measure import label as label_components

    return label_components(labels, background=0, connectivity=2).astype(np.int32)


def standardise_tiles(
    image: np.ndarray, labels: np.ndarray, tile_size: int
) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """Cut one image (H, W, 3) and its labels (H, W) into tile_size x tile_size tiles.

    Returns ``(row, col, image_tile, labels_tile)`` in row-major order. Short sides are padded
    symmetrically, long sides sliced with the last tile aligned to the edge; e.g. at 256 a
    1040 x 1388 image gives 5 x 6 = 30 tiles and a 200 x 300 one is padded to 256 x 300
    (28 rows before, 28 after) and gives 1 x 2 tiles.
    """
    check_tile_size(tile_size)
    if image.ndim != 3 or image.shape[2] != RGB_CHANNELS:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} do not match image {image.shape[:2]}")
    image, labels = pad_to_tile(image, labels, tile_size)
    tiles = []
    for row, top in enumerate(tile_starts(image.shape[0], tile_size)):
        for col, left in enumerate(tile_starts(image.shape[1], tile_size)):
            window = (slice(top, top + tile_size), slice(left, left + tile_size))
            tiles.append(
                (
                    row,
                    col,
                    np.ascontiguousarray(image[window], dtype=np.uint8),
                    np.ascontiguousarray(labels[window], dtype=np.int32),
                )
            )
    return tiles


def check_tile_size(tile_size: int) -> None:
    if not isinstance(tile_size, (int, np.integer)) or tile_size <= 0:
        raise ValueError(f"tile size {tile_size!r} must be a positive integer, e.g. 256")


# ----------------------------------------------------------------------------- split


def split_samples(sample_ids: list[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """Split source images (never tiles) into train/val, deterministic for a seed.

    The sorted ids are shuffled with ``np.random.default_rng(seed)``; the first
    ``round(val_fraction * n)`` go to validation, at least one when ``val_fraction > 0`` and
    there are two or more images, and never all of them. Both lists come back sorted.
    """
    check_val_fraction(val_fraction)
    ordered = sorted(sample_ids)
    if len(set(ordered)) != len(ordered):
        raise ValueError("sample ids must be unique")
    count = len(ordered)
    val_count = round(val_fraction * count)
    if val_fraction > 0 and count >= 2:
        val_count = max(1, val_count)
    val_count = min(val_count, max(0, count - 1))
    order = np.random.default_rng(seed).permutation(count)
    val = sorted(ordered[index] for index in order[:val_count])
    train = sorted(ordered[index] for index in order[val_count:])
    return {TRAIN_SPLIT: train, VAL_SPLIT: val}


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"validation fraction {val_fraction} must be in [0, 1), e.g. 0.15")


# ----------------------------------------------------------------------------- prepare


def read_sample_tiles(batch: dict[str, np.ndarray], tile_size: int) -> pa.Table:
    """Ray Data UDF: read and standardise the raw samples of one batch into tile rows.

    Any failure becomes an ``io.DatasetError`` naming the sample (a bad training image is the
    user's to fix, never skipped silently).
    """
    columns: dict[str, list] = {name: [] for name in TILE_SCHEMA.names}
    for source, sample_id in zip(batch["source"], batch["sample_id"], strict=True):
        ref = io.SampleRef(source=str(source), sample_id=str(sample_id))
        try:
            image, labels = io.read_dsb_sample(ref)
            tiles = standardise_tiles(image, labels, tile_size)
        except Exception as error:
            raise sample_error(ref, error) from error
        for row, col, image_tile, labels_tile in tiles:
            columns["sample_id"].append(ref.sample_id)
            columns["tile_id"].append(f"{ref.sample_id}_r{row}_c{col}")
            columns["row"].append(row)
            columns["col"].append(col)
            columns["height"].append(tile_size)
            columns["width"].append(tile_size)
            columns["image"].append(image_tile.tobytes())
            columns["labels"].append(labels_tile.tobytes())
    return pa.table(columns, schema=TILE_SCHEMA)


def read_whole_samples(batch: dict[str, np.ndarray]) -> pa.Table:
    """Ray Data UDF: whole images and labels of one batch of raw samples (``IMAGE_SCHEMA``)."""
    columns: dict[str, list] = {name: [] for name in IMAGE_SCHEMA.names}
    for source, sample_id in zip(batch["source"], batch["sample_id"], strict=True):
        ref = io.SampleRef(source=str(source), sample_id=str(sample_id))
        try:
            image, labels = io.read_dsb_sample(ref)
        except Exception as error:
            raise sample_error(ref, error) from error
        columns["sample_id"].append(ref.sample_id)
        columns["height"].append(image.shape[0])
        columns["width"].append(image.shape[1])
        columns["image"].append(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
        columns["labels"].append(np.ascontiguousarray(labels, dtype=np.int32).tobytes())
    return pa.table(columns, schema=IMAGE_SCHEMA)


def sample_error(ref: io.SampleRef, error: Exception) -> io.DatasetError:
    """A DatasetError whose first line names the sample (once) and the problem."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    if f"sample {ref.sample_id}" not in message:
        message = f"sample {ref.sample_id} in {ref.source}: {message}"
    return io.DatasetError(message)


def prepare_dataset(
    source: str,
    output: str,
    tile_size: int = 256,
    val_fraction: float = 0.15,
    seed: int = 0,
) -> dict:
    """Standardise a DSB2018-layout dataset (folder, .zip or s3://) into Parquet tile shards.

    A Ray Data job reads and tiles the samples in parallel tasks and writes ``OUTPUT/train`` and
    ``OUTPUT/val`` (replacing earlier shards there), then ``OUTPUT/dataset.json``; returns that
    info. The split is by source image and deterministic for a seed. A sample that cannot be
    read raises ``io.DatasetError`` naming it, and no ``dataset.json`` is written.
    """
    import ray

    check_tile_size(tile_size)
    check_val_fraction(val_fraction)
    source, output = normalise_uri(source), normalise_uri(output)
    if source == output:
        raise ValueError(f"output {output} must differ from the source folder")
    if is_prepared(source):
        raise io.DatasetError(f"{source} already holds prepared shards: pass it as --data as is")
    refs = io.list_dsb_samples(source)
    splits = split_samples([ref.sample_id for ref in refs], val_fraction, seed)
    remove_dataset_info(output)
    io.make_dirs(output)
    info = {
        "format": DATASET_FORMAT,
        "tile_size": int(tile_size),
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "source": source,
    }
    for split in SPLITS:
        members = set(splits[split])
        split_refs = [ref for ref in refs if ref.sample_id in members]
        tiles = write_split_shards(split_refs, io.join_uri(output, split), tile_size, ray)
        info[split] = {"samples": splits[split], "tiles": tiles}
        if split == VAL_SPLIT:
            write_split_images(split_refs, io.join_uri(output, VAL_IMAGES_DIR), ray)
        logger.info("prepared %s: %d images, %d tiles", split, len(split_refs), tiles)
    io.write_bytes_atomic(
        io.join_uri(output, DATASET_INFO_FILE), json.dumps(info, indent=2).encode()
    )
    return info


def write_split_shards(refs: list[io.SampleRef], split_uri: str, tile_size: int, ray) -> int:
    """Run the read -> standardise -> write_parquet job for one split; returns its tile count."""
    return _write_parquet_job(
        refs,
        split_uri,
        ray,
        read_sample_tiles,
        {"tile_size": tile_size},
        TILE_SCHEMA,
        SAMPLES_PER_READ_TASK,
        MIN_TILES_PER_SHARD,
    )


def write_split_images(refs: list[io.SampleRef], images_uri: str, ray) -> int:
    """Write the whole images of one split (one row, one row group each, so that a validation
    worker reads only the images it scores); returns their count."""
    return _write_parquet_job(refs, images_uri, ray, read_whole_samples, {}, IMAGE_SCHEMA, 1, None)


def _write_parquet_job(
    refs, uri: str, ray, function, fn_kwargs, schema, samples_per_task, min_rows_per_file
) -> int:
    filesystem, path = io.resolve_filesystem(uri)
    if not refs:
        filesystem.delete_dir_contents(path, missing_dir_ok=True)
        return 0
    items = [{"source": ref.source, "sample_id": ref.sample_id} for ref in refs]
    samples = ray.data.from_items(
        items, override_num_blocks=math.ceil(len(items) / samples_per_task)
    )
    samples.context.raise_original_map_exception = True  # keep DatasetError, not a wrapper
    rows = samples.map_batches(
        function, fn_kwargs=fn_kwargs, batch_size=samples_per_task, batch_format="numpy"
    )
    try:
        rows.write_parquet(
            path,
            filesystem=filesystem,
            min_rows_per_file=min_rows_per_file,
            mode=ray.data.SaveMode.OVERWRITE,
            schema=schema,
            compression=PARQUET_COMPRESSION,
        )
    except io.DatasetError as error:  # Ray re-raises it as RayTaskError(DatasetError)
        cause = getattr(error, "cause", error)
        raise io.DatasetError(str(cause).splitlines()[0]) from None
    return count_rows(uri)


# ----------------------------------------------------------------------------- prepared datasets


def ensure_prepared(
    source: str, cache_uri: str, tile_size: int, val_fraction: float, seed: int
) -> str:
    """Prepared shards for ``source``: itself when already prepared; otherwise the raw DSB2018
    dataset is prepared into ``cache_uri`` unless that already holds shards made from the same
    source, samples, tile size, validation fraction and seed. Returns the shards' URI, local
    paths absolute (Ray Tune runs each trial in a folder of its own)."""
    if is_prepared(source):
        return normalise_uri(source)
    wanted = {
        "source": normalise_uri(source),
        "tile_size": int(tile_size),
        "val_fraction": float(val_fraction),
        "seed": int(seed),
    }
    if is_prepared(cache_uri):
        try:
            info = read_dataset_info(cache_uri)
        except io.DatasetError as error:  # an older format: prepare again
            logger.info("preparing %s again: %s", cache_uri, error)
            info = {}
        same_settings = all(info.get(key) == value for key, value in wanted.items())
        cached_ids = sorted(
            info.get(TRAIN_SPLIT, {}).get("samples", [])
            + info.get(VAL_SPLIT, {}).get("samples", [])
        )
        if same_settings and cached_ids == [ref.sample_id for ref in io.list_dsb_samples(source)]:
            logger.info("using prepared shards in %s", cache_uri)
            return normalise_uri(cache_uri)
    logger.info("preparing %s into %s (tile %d)", source, cache_uri, tile_size)
    prepare_dataset(source, cache_uri, tile_size, val_fraction, seed)
    return normalise_uri(cache_uri)


def load_split(prepared_uri: str, split: str, passes: int = 1, shuffle_files: bool = False):
    """The Parquet tiles of one split as a lazy ray.data.Dataset (TILE_SCHEMA rows), read
    ``passes`` times over, one pass after the other, in one dataset. ``shuffle_files`` reads the
    files of every pass in a fresh random order (the tiles of one file are mixed by the
    consumer's shuffle buffer)."""
    import ray

    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    if passes < 1:
        raise ValueError(f"passes must be at least 1, got {passes}")
    info = read_dataset_info(prepared_uri)
    if not info[split]["tiles"]:
        raise io.DatasetError(f"prepared dataset {prepared_uri} has no {split} tiles")
    split_uri = io.join_uri(str(prepared_uri), split)
    filesystem, path = io.resolve_filesystem(split_uri)
    if passes == 1 and not shuffle_files:
        return read_parquet_v1(ray, path, filesystem)
    shards = [  # io.list_files skips hidden files; Ray also skips "_" files in a folder
        io.resolve_filesystem(uri)[1]
        for uri in io.list_files(split_uri, suffixes=(".parquet",))
        if not os.path.basename(uri).startswith("_")
    ]
    if not shards:
        raise io.DatasetError(f"prepared dataset {prepared_uri} has no {split} Parquet files")
    rng = np.random.default_rng() if shuffle_files else None  # unseeded: every run its own
    return read_parquet_v1(ray, shuffled_passes(shards, passes, rng), filesystem)


def shuffled_passes(files: list[str], passes: int, rng: np.random.Generator | None) -> list[str]:
    """``passes`` passes over ``files`` one after the other, each in a new random order drawn
    from ``rng`` (as listed without one)."""
    if rng is None:
        return list(files) * passes
    return [files[index] for _ in range(passes) for index in rng.permutation(len(files))]


def read_parquet_v1(ray, path: str | list[str], filesystem):
    """``ray.data.read_parquet`` through the V1 datasource.

    Ray 2.60's default V2 datasource starts a ListFiles task on every execution that took 8-20 s
    per epoch on a 2-core machine (V1: 0.25 s for the same shards), and a training dataset is
    executed once per epoch. The switch is read only when the dataset is created.
    """
    context = ray.data.DataContext.get_current()
    saved = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(path, filesystem=filesystem)
    finally:
        context.use_datasource_v2 = saved


# ----------------------------------------------------------------------------- augmentation


def build_augmentation(elastic_probability: float, photometric: bool = True, seed=None):
    """The albumentations Compose applied to every training crop.

    Five random transformations, as in the reference report: flips (horizontal, vertical),
    90-degree rotations, shift-scale-rotate (``A.Affine``, reflected border), brightness /
    contrast / gamma, and blur or Gaussian noise; then elastic deformation with probability
    ``elastic_probability``. ``photometric=False`` leaves out the intensity transformations
    (colour, blur, noise). Masks use nearest-neighbour interpolation, so integer instance labels
    survive every geometric transformation. ``seed=None`` draws fresh OS entropy.
    """
    import albumentations as A
    import cv2

    if not 0.0 <= elastic_probability <= 1.0:
        raise ValueError(f"elastic probability {elastic_probability} must be in [0, 1]")
    transforms = [
        A.HorizontalFlip(p=FLIP_PROBABILITY),
        A.VerticalFlip(p=FLIP_PROBABILITY),
        A.RandomRotate90(p=ROTATE90_PROBABILITY),
        A.Affine(
            scale=AFFINE_SCALE,
            translate_percent=AFFINE_TRANSLATE,
            rotate=AFFINE_ROTATE_DEGREES,
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            border_mode=cv2.BORDER_REFLECT_101,
            p=AFFINE_PROBABILITY,
        ),
    ]
    if photometric:
        transforms += [
            A.OneOf(
                [
                    A.RandomBrightnessContrast(
                        brightness_limit=BRIGHTNESS_LIMIT, contrast_limit=CONTRAST_LIMIT
                    ),
                    A.RandomGamma(gamma_limit=GAMMA_LIMIT),
                ],
                p=COLOUR_PROBABILITY,
            ),
            A.OneOf(
                [
                    A.GaussianBlur(blur_limit=BLUR_LIMIT, sigma_limit=BLUR_SIGMA),
                    A.GaussNoise(std_range=NOISE_STD),
                ],
                p=BLUR_NOISE_PROBABILITY,
            ),
        ]
    transforms.append(
        A.ElasticTransform(
            alpha=ELASTIC_ALPHA,
            sigma=ELASTIC_SIGMA,
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            border_mode=cv2.BORDER_REFLECT_101,
            p=elastic_probability,
        )
    )
    return A.Compose(transforms, seed=seed)


def augment_sample(
    image: np.ndarray, labels: np.ndarray, transform
) -> tuple[np.ndarray, np.ndarray]:
    """Apply one random draw of ``transform`` to an image (H, W, 3) uint8 and its int32 labels
    together; returns the transformed pair (same shapes and dtypes)."""
    result = transform(image=image, mask=labels)
    return result["image"].astype(np.uint8, copy=False), result["mask"].astype(np.int32, copy=False)


@lru_cache(maxsize=4)
def cached_augmentation(elastic_probability: float):
    """One Compose per worker process (its generator then runs on across epochs)."""
    return build_augmentation(elastic_probability)


# ----------------------------------------------------------------------------- training datasets


def decode_tiles(batch: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Images (H, W, 3) uint8 and labels (H, W) int32 from a numpy batch of TILE_SCHEMA rows."""
    images, labels = [], []
    for image_bytes, labels_bytes, height, width in zip(
        batch["image"], batch["labels"], batch["height"], batch["width"], strict=True
    ):
        shape = (int(height), int(width))
        images.append(np.frombuffer(image_bytes, dtype=np.uint8).reshape(*shape, RGB_CHANNELS))
        labels.append(np.frombuffer(labels_bytes, dtype=np.int32).reshape(shape))
    return images, labels


def crop_window(
    height: int, width: int, size: int, rng: np.random.Generator
) -> tuple[slice, slice]:
    """A uniformly random size x size window inside a height x width tile."""
    top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    return slice(top, top + size), slice(left, left + size)


def to_model_batch(
    images: list[np.ndarray], labels: list[np.ndarray], with_labels: bool = True
) -> dict[str, np.ndarray]:
    """{"image": uint8 N x 3 x S x S, "mask": uint8 N x 1 x S x S (0/1), and with
    ``with_labels`` "labels": int32 N x S x S}: the batch format of ``iter_torch_batches``.

    uint8, not float32: 0.26 instead of 1.31 MB per 256^2 sample through Ray's object store,
    the pinned copy and the host-to-device transfer; the training loop normalises on the device
    (``inference.normalise_images``: float32 / 255, what this function computed here before).
    The instance labels travel only for the heads that use them (the contour target of
    ``mask+contour``)."""
    image_array = np.stack(images).astype(np.uint8, copy=False).transpose(0, 3, 1, 2)
    labels_array = np.stack(labels).astype(np.int32, copy=False)
    batch = {
        "image": np.ascontiguousarray(image_array),
        "mask": (labels_array > 0).astype(np.uint8)[:, None],
    }
    if with_labels:
        batch["labels"] = labels_array
    return batch


def augment_batch(
    batch: dict[str, np.ndarray],
    image_size: int,
    augment: bool,
    elastic_probability: float,
    copies: int = 1,
    with_labels: bool = True,
) -> dict[str, np.ndarray]:
    """Ray Data UDF for training tiles: random crop, augmentation, model tensors
    (``to_model_batch``; instance labels only ``with_labels``); ``copies`` independent draws per
    tile (small sets: an epoch holds at least ``min_steps_per_epoch`` steps of augmented tiles
    drawn again and again from the same few).

    Unseeded on purpose: every epoch re-runs this with new random crops and transformations.
    """
    import cv2

    cv2.setNumThreads(1)  # one Ray task per CPU: no nested OpenCV thread pools
    rng = np.random.default_rng()
    transform = cached_augmentation(elastic_probability) if augment else None
    images, labels = [], []
    for tile_image, tile_label in zip(*decode_tiles(batch), strict=True):
        for _ in range(copies):
            window = crop_window(tile_image.shape[0], tile_image.shape[1], image_size, rng)
            image, label = tile_image[window], tile_label[window]
            if transform is not None:
                image, label = augment_sample(np.ascontiguousarray(image), label, transform)
            images.append(image)
            labels.append(label)
    return to_model_batch(images, labels, with_labels)


def tile_copies(train_tiles: int, world_size: int, batch_size: int, min_steps: int) -> int:
    """Augmented draws per training tile and epoch: 1 when one pass over the tiles already makes
    ``min_steps`` steps of ``batch_size`` on each of ``world_size`` workers; otherwise the fewest
    whose tiles fill ``min_steps`` full batches on every worker (small sets)."""
    if train_tiles < 1:
        raise ValueError("no training tiles")
    if math.ceil((train_tiles // world_size) / batch_size) >= min_steps:
        return 1
    return math.ceil(min_steps * batch_size * world_size / train_tiles)


def build_training_datasets(
    prepared_uri: str, data: DataConfig, passes: int = 1, copies: int = 1, labels: bool = True
) -> dict:
    """The lazy Ray dataset {"train": ...} of augmented model batches (see ``to_model_batch``).

    ``passes`` passes over the training tiles, each reading the Parquet files in a fresh random
    order -> ``copies`` random ``data.image_size`` crops per tile (tiles larger than the
    network input give a new crop every time) -> augmentation (when ``data.augment``), new random
    draws for every tile of every pass. One iteration of it serves all epochs
    (``unet_ray.pipelines.train_loop.stream_batches``), so Ray Data starts its pipeline once. Tiles are mixed by
    the consumer's shuffle buffer (``iter_torch_batches(local_shuffle_buffer_size=...)``).
    Validation reads whole images (``read_split_images``), not tiles, and is not a Ray dataset.
    ``labels``: the batches carry the instance labels (the ``mask+contour`` head's contour
    target needs them; the ``mask`` head does not).
    """
    info = read_dataset_info(prepared_uri)
    tile_size = int(info["tile_size"])
    image_size = int(data.image_size)
    if image_size <= 0 or image_size % SIZE_MULTIPLE:
        raise ValueError(f"image size {image_size} must be a positive multiple of {SIZE_MULTIPLE}")
    if image_size > tile_size:
        raise ValueError(
            f"image size {image_size} is larger than the prepared tiles ({tile_size}) of "
            f"{prepared_uri}; lower --image-size or prepare again with --tile {image_size}"
        )
    if copies < 1:
        raise ValueError(f"copies must be at least 1, got {copies}")
    return {
        TRAIN_SPLIT: load_split(prepared_uri, TRAIN_SPLIT, passes, shuffle_files=True).map_batches(
            augment_batch,
            fn_kwargs={
                "image_size": image_size,
                "augment": bool(data.augment),
                "elastic_probability": float(data.elastic_probability),
                "copies": int(copies),
                "with_labels": bool(labels),
            },
            batch_size=max(1, AUGMENT_BATCH_SIZE // copies),
            batch_format="numpy",
        )
    }
