"""Tests for unet_ray.pipelines.data and unet_ray.io.prepared: tile geometry, the split, augmentation, prepare and the Ray pipeline."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import ndimage
from skimage.measure import label as label_components

from unet_ray import io
from unet_ray.core.config import DataConfig
from unet_ray.io.prepared import (
    DATASET_FORMAT,
    SPLITS,
    TRAIN_SPLIT,
    is_prepared,
    read_dataset_info,
    read_split_images,
)
from unet_ray.pipelines import data

TILE = 64  # small tiles: the 64-160 px synthetic images are both padded and sliced
THRESHOLD = 127  # an 8-bit binary image thresholds here
MIN_MEAN_IOU = 0.97  # mean over the draws of mask vs image-threshold IoU
MIN_IOU = 0.9  # any single draw (small shapes: blur and contrast move edges by ~1 px)
AUGMENTATION_DRAWS = 24
EDGE_TOLERANCE = 2  # pixels: linear (image) and nearest (mask) interpolation differ at edges


# ----------------------------------------------------------------------------- helpers


def random_sample(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    labels = rng.integers(0, 50, size=(height, width), dtype=np.int32)
    return image, labels


def binary_structure_sample(size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sharp white discs and boxes on black: the mask is exactly the image's threshold."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size]
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(6):
        centre_row, centre_col = rng.integers(16, size - 16, size=2)
        radius = rng.integers(12, 22)
        mask |= (rows - centre_row) ** 2 + (cols - centre_col) ** 2 <= radius**2
    mask[20:40, 80:110] = True
    image = np.repeat((mask * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    return image, label_components(mask, connectivity=2).astype(np.int32)


def threshold_iou(image: np.ndarray, labels: np.ndarray) -> float:
    """IoU of labels > 0 with the image's threshold."""
    from_image = image.mean(axis=2) > THRESHOLD
    from_labels = labels > 0
    union = np.logical_or(from_image, from_labels).sum()
    return float(np.logical_and(from_image, from_labels).sum() / max(union, 1))


def mismatch_away_from_edges(image: np.ndarray, labels: np.ndarray) -> int:
    """Pixels where labels > 0 and the image threshold disagree, more than 2 px from an edge."""
    mask = labels > 0
    edges = ndimage.binary_dilation(mask) ^ ndimage.binary_erosion(mask)
    near_edges = ndimage.binary_dilation(edges, iterations=EDGE_TOLERANCE)
    near_edges[:EDGE_TOLERANCE] = near_edges[-EDGE_TOLERANCE:] = True  # the image border too
    near_edges[:, :EDGE_TOLERANCE] = near_edges[:, -EDGE_TOLERANCE:] = True
    disagree = (image.mean(axis=2) > THRESHOLD) != mask
    return int((disagree & ~near_edges).sum())


def shard_rows(prepared: Path, split: str) -> dict[str, dict]:
    """{tile_id: row} of one split, read straight from the Parquet files (no Ray)."""
    table = pq.read_table(prepared / split)
    return {row["tile_id"]: row for row in table.to_pylist()}


def tile_digests(prepared: Path, split: str) -> dict[str, str]:
    return {
        tile_id: hashlib.sha256(row["image"] + row["labels"]).hexdigest()
        for tile_id, row in shard_rows(prepared, split).items()
    }


def expected_tiles(source: Path, tile_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tile_id: (image, labels)} computed directly from the raw samples."""
    expected = {}
    for ref in io.list_dsb_samples(str(source)):
        image, labels = io.read_dsb_sample(ref)
        for row, col, image_tile, labels_tile in data.standardise_tiles(image, labels, tile_size):
            expected[f"{ref.sample_id}_r{row}_c{col}"] = (image_tile, labels_tile)
    return expected


def upload_folder(folder: Path, bucket: str, prefix: str, endpoint: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            client.upload_file(str(path), bucket, key)


def zip_folder(folder: Path, archive: Path) -> Path:
    """A Kaggle-style archive: <id>/images/<id>.png and <id>/masks/*.png at the top level."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                handle.write(path, path.relative_to(folder).as_posix())
    return archive


# ----------------------------------------------------------------------------- geometry


def test_large_image_is_sliced_into_30_tiles_that_cover_it_exactly():
    image, labels = random_sample(1040, 1388)
    tiles = data.standardise_tiles(image, labels, 256)

    assert len(tiles) == 30
    assert {(row, col) for row, col, _, _ in tiles} == {(r, c) for r in range(5) for c in range(6)}
    row_starts, col_starts = data.tile_starts(1040, 256), data.tile_starts(1388, 256)
    assert row_starts == [0, 196, 392, 588, 784]  # spread evenly from edge to edge
    assert col_starts == [0, 226, 453, 679, 906, 1132]
    covered = np.zeros(labels.shape, dtype=bool)
    for row, col, image_tile, labels_tile in tiles:
        window = np.s_[
            row_starts[row] : row_starts[row] + 256, col_starts[col] : col_starts[col] + 256
        ]
        assert image_tile.shape == (256, 256, 3) and image_tile.dtype == np.uint8
        assert labels_tile.shape == (256, 256) and labels_tile.dtype == np.int32
        np.testing.assert_array_equal(image_tile, image[window])
        np.testing.assert_array_equal(labels_tile, labels[window])  # unpadded: ids unchanged
        covered[window] = True
    assert covered.all()


def test_small_image_is_padded_symmetrically_28_before_28_after():
    image, _ = random_sample(200, 300, seed=1)
    labels = np.zeros((200, 300), dtype=np.int32)
    labels[5:15, 40:60] = 7  # near the top edge: mirrored into the top padding
    labels[100:120, 100:130] = 9  # far from every edge: never mirrored into a kept tile

    tiles = data.standardise_tiles(image, labels, 256)

    assert [(row, col) for row, col, _, _ in tiles] == [(0, 0), (0, 1)]
    assert data.padding_widths(200, 256) == (28, 28)
    padded = np.pad(image, ((28, 28), (0, 0), (0, 0)), mode="symmetric")
    first, second = tiles[0][2], tiles[1][2]
    np.testing.assert_array_equal(first, padded[:, 0:256])
    np.testing.assert_array_equal(second, padded[:, 44:300])
    np.testing.assert_array_equal(first[28:228], image[:, :256])
    np.testing.assert_array_equal(first[27::-1], image[:28, :256])  # mirrored, edge repeated
    np.testing.assert_array_equal(first[228:], image[::-1][:28, :256])
    labels_tile = tiles[0][3]
    np.testing.assert_array_equal(
        labels_tile > 0, np.pad(labels > 0, ((28, 28), (0, 0)), "symmetric")[:, :256]
    )
    original_id = labels_tile[28 + 10, 50]
    mirrored_id = labels_tile[28 - 1 - 10, 50]
    assert original_id > 0 and mirrored_id > 0 and original_id != mirrored_id
    assert len(np.unique(labels_tile[labels_tile > 0])) == 3  # two originals + one mirror


def test_odd_padding_puts_the_extra_pixel_after_and_tiny_images_still_fill_a_tile():
    assert data.padding_widths(201, 256) == (27, 28)
    image, labels = random_sample(40, 50, seed=2)  # padding wider than the image itself
    ((row, col, image_tile, labels_tile),) = data.standardise_tiles(image, labels, 256)
    assert (row, col) == (0, 0)
    assert image_tile.shape == (256, 256, 3) and labels_tile.shape == (256, 256)
    before_rows, before_cols = data.padding_widths(40, 256)[0], data.padding_widths(50, 256)[0]
    np.testing.assert_array_equal(
        image_tile[before_rows : before_rows + 40, before_cols : before_cols + 50], image
    )


def test_side_equal_to_the_tile_is_one_tile_without_padding():
    image, labels = random_sample(256, 512, seed=3)
    tiles = data.standardise_tiles(image, labels, 256)
    assert [(row, col) for row, col, _, _ in tiles] == [(0, 0), (0, 1)]
    np.testing.assert_array_equal(tiles[1][2], image[:, 256:])


@pytest.mark.parametrize(
    ("image_shape", "labels_shape", "tile_size", "message"),
    [
        ((64, 64, 3), (64, 64), 0, "tile size 0"),
        ((64, 64), (64, 64), 32, "must be \\(H, W, 3\\)"),
        ((64, 64, 3), (64, 63), 32, "do not match"),
    ],
)
def test_bad_geometry_input_names_the_problem(image_shape, labels_shape, tile_size, message):
    with pytest.raises(ValueError, match=message):
        data.standardise_tiles(
            np.zeros(image_shape, np.uint8), np.zeros(labels_shape, np.int32), tile_size
        )


# ----------------------------------------------------------------------------- split


def test_split_is_by_image_deterministic_and_sized_by_the_fraction():
    ids = [f"sample{index:02d}" for index in range(20)]
    split = data.split_samples(ids, 0.15, seed=3)

    assert len(split["val"]) == 3 and len(split["train"]) == 17
    assert not set(split["train"]) & set(split["val"])
    assert sorted(split["train"] + split["val"]) == ids
    assert split == data.split_samples(list(reversed(ids)), 0.15, seed=3)  # input order irrelevant
    assert split != data.split_samples(ids, 0.15, seed=4)


def test_split_keeps_at_least_one_image_on_each_side():
    assert len(data.split_samples(["a", "b"], 0.01, seed=0)["val"]) == 1
    assert data.split_samples(["a"], 0.5, seed=0) == {"train": ["a"], "val": []}
    assert data.split_samples(["a", "b", "c"], 0.0, seed=0)["val"] == []
    assert len(data.split_samples(["a", "b", "c"], 0.99, seed=0)["train"]) == 1
    with pytest.raises(ValueError, match="validation fraction 1.0"):
        data.split_samples(["a", "b"], 1.0, seed=0)


# ----------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("photometric", [False, True])
def test_augmentation_keeps_the_mask_the_threshold_of_the_image(photometric):
    image, labels = binary_structure_sample(seed=4)
    transform = data.build_augmentation(1.0, photometric=photometric, seed=11)
    ious, changed = [], 0
    for _ in range(AUGMENTATION_DRAWS):
        out_image, out_labels = data.augment_sample(image, labels, transform)
        assert out_image.shape == image.shape and out_image.dtype == np.uint8
        assert out_labels.shape == labels.shape and out_labels.dtype == np.int32
        assert set(np.unique(out_labels)) <= set(np.unique(labels))  # nearest: no blended ids
        assert mismatch_away_from_edges(out_image, out_labels) == 0
        ious.append(threshold_iou(out_image, out_labels))
        changed += not np.array_equal(out_labels, labels)
    assert min(ious) > MIN_IOU and np.mean(ious) > MIN_MEAN_IOU
    assert changed == AUGMENTATION_DRAWS  # elastic at p=1 always moves something


def test_misaligned_pair_is_caught_by_the_alignment_check():
    image, labels = binary_structure_sample(seed=4)
    assert mismatch_away_from_edges(image[::-1], labels) > 0
    assert threshold_iou(image[::-1], labels) < MIN_IOU


def test_unseeded_augmentations_differ_between_draws():
    image, labels = binary_structure_sample(seed=6)
    transform = data.build_augmentation(elastic_probability=0.0)
    draws = {data.augment_sample(image, labels, transform)[0].tobytes() for _ in range(8)}
    assert len(draws) > 1


def test_elastic_probability_out_of_range_is_refused():
    with pytest.raises(ValueError, match="elastic probability 1.5"):
        data.build_augmentation(1.5)


def test_training_batch_has_the_model_format_and_is_random():
    image, labels = binary_structure_sample(size=96, seed=7)
    batch = {
        "image": np.array([image.tobytes()] * 2, dtype=object),
        "labels": np.array([labels.tobytes()] * 2, dtype=object),
        "height": np.array([96, 96], dtype=np.int32),
        "width": np.array([96, 96], dtype=np.int32),
    }
    first = data.augment_batch(batch, image_size=64, augment=True, elastic_probability=0.5)
    # uint8 to the device (issue 22): the training loop normalises there
    assert first["image"].shape == (2, 3, 64, 64) and first["image"].dtype == np.uint8
    assert first["mask"].shape == (2, 1, 64, 64) and first["mask"].dtype == np.uint8
    assert first["labels"].shape == (2, 64, 64) and first["labels"].dtype == np.int32
    np.testing.assert_array_equal(first["mask"][:, 0], (first["labels"] > 0).astype(np.uint8))
    second = data.augment_batch(batch, image_size=64, augment=True, elastic_probability=0.5)
    assert not np.array_equal(first["image"], second["image"])


# ----------------------------------------------------------------------------- bad sources


def test_empty_or_missing_source_is_an_error_naming_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(io.DatasetError, match="no DSB2018 samples"):
        data.prepare_dataset(str(empty), str(tmp_path / "out"))
    with pytest.raises(io.DatasetError, match="missing: no such folder"):
        data.prepare_dataset(str(tmp_path / "missing"), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_bad_prepare_arguments_are_refused(tmp_path, synth_root):
    with pytest.raises(ValueError, match="tile size -1"):
        data.prepare_dataset(str(synth_root), str(tmp_path / "out"), tile_size=-1)
    with pytest.raises(ValueError, match="validation fraction 1.5"):
        data.prepare_dataset(str(synth_root), str(tmp_path / "out"), val_fraction=1.5)
    with pytest.raises(ValueError, match="must differ"):
        data.prepare_dataset(str(synth_root), str(synth_root))


@pytest.mark.parametrize("side", [256, 257, 300, 511, 520, 600, 1040, 1388, 2000])
def test_tile_starts_overlap_no_more_than_the_side_needs(side):
    starts = data.tile_starts(side, 256)
    count = len(starts)
    assert count == -(-side // 256)  # the fewest tiles that cover the side
    assert starts[0] == 0 and starts[-1] == side - 256  # edge to edge, nothing left out
    overlaps = [256 - (after - before) for before, after in zip(starts, starts[1:], strict=False)]
    total_overlap = count * 256 - side
    # the overlap is shared out: no neighbour pair overlaps more than its share, rounded up
    assert all(0 <= overlap <= -(-total_overlap // max(1, count - 1)) for overlap in overlaps)


def test_unprepared_folder_is_not_taken_for_shards(tmp_path, synth_root):
    assert not is_prepared(str(synth_root))
    with pytest.raises(io.DatasetError, match="not a prepared dataset"):
        read_dataset_info(str(synth_root))
    (tmp_path / "dataset.json").write_text(json.dumps({"format": "something/else"}))
    with pytest.raises(io.DatasetError, match="format 'something/else'"):
        read_dataset_info(str(tmp_path))
    with pytest.raises(io.DatasetError, match="already holds prepared shards"):
        data.prepare_dataset(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="split 'test'"):
        data.load_split(str(tmp_path), "test")


# ----------------------------------------------------------------------------- Ray: prepare


@pytest.fixture(scope="module")
def prepared_local(ray_local, synth_root, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("prepared") / "shards"
    data.prepare_dataset(str(synth_root), str(output), tile_size=TILE, val_fraction=0.25, seed=1)
    return output


@pytest.mark.ray
def test_prepare_from_disk_writes_every_tile_once_and_splits_by_image(prepared_local, synth_root):
    info = read_dataset_info(str(prepared_local))
    all_ids = [ref.sample_id for ref in io.list_dsb_samples(str(synth_root))]

    assert info["format"] == DATASET_FORMAT and info["tile_size"] == TILE
    assert info["source"] == str(synth_root)
    assert len(info["val"]["samples"]) == 3  # round(0.25 * 12)
    assert not set(info["train"]["samples"]) & set(info["val"]["samples"])
    assert sorted(info["train"]["samples"] + info["val"]["samples"]) == sorted(all_ids)
    expected = expected_tiles(synth_root, TILE)
    seen = {}
    for split in SPLITS:
        rows = shard_rows(prepared_local, split)
        assert info[split]["tiles"] == len(rows)
        assert {row["sample_id"] for row in rows.values()} == set(info[split]["samples"])
        seen.update(rows)
    assert set(seen) == set(expected)  # every tile once, none in both splits
    for tile_id, row in seen.items():
        image, labels = expected[tile_id]
        assert (row["height"], row["width"]) == (TILE, TILE)
        assert row["image"] == image.tobytes() and row["labels"] == labels.tobytes()
    # whole validation images, one row each, pixel-identical to the source
    whole = {
        name: (image, labels) for name, image, labels in read_split_images(str(prepared_local))
    }
    assert sorted(whole) == sorted(info["val"]["samples"])
    for sample_id, (image, labels) in whole.items():
        ref = next(
            ref for ref in io.list_dsb_samples(str(synth_root)) if ref.sample_id == sample_id
        )
        source_image, source_labels = io.read_dsb_sample(ref)
        np.testing.assert_array_equal(image, source_image)
        np.testing.assert_array_equal(labels, source_labels)
    some = sorted(info["val"]["samples"])[1:]
    assert [name for name, _, _ in read_split_images(str(prepared_local), some[::-1])] == some[::-1]
    with pytest.raises(io.DatasetError, match="lacks validation images.*nope"):
        list(read_split_images(str(prepared_local), ["nope"]))
    schema = pq.read_schema(next((prepared_local / "train").glob("*.parquet")))
    assert schema.field("row").type == "int32" and schema.field("image").type == "binary"
    metadata = pq.read_metadata(next((prepared_local / "train").glob("*.parquet")))
    assert metadata.row_group(0).column(0).compression == "ZSTD"


@pytest.mark.ray
def test_prepare_is_deterministic_for_a_seed_and_from_a_zip(prepared_local, synth_root, tmp_path):
    archive = zip_folder(synth_root, tmp_path / "stage1_train.zip")
    again = tmp_path / "again"
    data.prepare_dataset(str(archive), str(again), tile_size=TILE, val_fraction=0.25, seed=1)

    for split in SPLITS:
        assert tile_digests(again, split) == tile_digests(prepared_local, split)


@pytest.mark.ray
def test_bad_sample_is_named_and_leaves_no_dataset_json(ray_local, synth_root, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(synth_root, broken)
    bad_id = sorted(path.name for path in broken.iterdir())[5]
    (broken / bad_id / "images" / f"{bad_id}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    output = tmp_path / "out"
    output.mkdir()
    (output / "dataset.json").write_text("{}")  # a stale one from an earlier run

    with pytest.raises(io.DatasetError, match=f"sample {bad_id}.*corrupt PNG"):
        data.prepare_dataset(str(broken), str(output), tile_size=TILE, val_fraction=0.25)
    assert not is_prepared(str(output))


@pytest.mark.ray
def test_prepare_reads_and_writes_s3(ray_local, synth_root, s3_bucket, s3_endpoint):
    upload_folder(synth_root, s3_bucket, "raw/stage1_train", s3_endpoint)
    output = f"s3://{s3_bucket}/prepared"

    info = data.prepare_dataset(
        f"s3://{s3_bucket}/raw/stage1_train", output, tile_size=TILE, val_fraction=0.25, seed=1
    )

    assert is_prepared(output) and read_dataset_info(output) == info
    expected = expected_tiles(synth_root, TILE)
    train_rows = data.load_split(output, "train").take_all()
    assert len(train_rows) == info["train"]["tiles"]
    for row in train_rows:
        image, labels = expected[row["tile_id"]]
        assert row["image"] == image.tobytes() and row["labels"] == labels.tobytes()
    assert data.load_split(output, "val").count() == info["val"]["tiles"]


@pytest.mark.ray
def test_local_shards_copied_to_s3_are_read_back(prepared_local, s3_bucket, s3_endpoint):
    upload_folder(prepared_local, s3_bucket, "shards", s3_endpoint)
    uri = f"s3://{s3_bucket}/shards"
    datasets = data.build_training_datasets(uri, DataConfig(image_size=32, elastic_probability=0.5))
    assert set(datasets) == {"train"}  # validation reads whole images, not a Ray dataset
    batch = next(iter(datasets["train"].iter_batches(batch_size=4, batch_format="numpy")))
    assert batch["image"].shape == (4, 3, 32, 32)  # random 32-px crops of the 64-px tiles
    local = {name: image for name, image, _ in read_split_images(str(prepared_local))}
    remote = {name: image for name, image, _ in read_split_images(uri)}
    assert sorted(local) == sorted(remote)
    assert all(np.array_equal(local[name], remote[name]) for name in local)
    train_tiles = read_dataset_info(uri)["train"]["tiles"]
    assert data.load_split(uri, TRAIN_SPLIT, passes=2).count() == 2 * train_tiles


@pytest.mark.ray
def test_ensure_prepared_reuses_matching_shards_and_passes_shards_through(
    ray_local, synth_root, prepared_local, tmp_path
):
    assert data.ensure_prepared(str(prepared_local), "unused", TILE, 0.25, 1) == str(prepared_local)
    cache = tmp_path / "cache"
    assert data.ensure_prepared(str(synth_root), str(cache), TILE, 0.25, 1) == str(cache)
    first_mtime = (cache / "dataset.json").stat().st_mtime_ns
    data.ensure_prepared(str(synth_root), str(cache), TILE, 0.25, 1)
    assert (cache / "dataset.json").stat().st_mtime_ns == first_mtime  # reused, not redone
    data.ensure_prepared(str(synth_root), str(cache), TILE, 0.25, 2)
    reseeded = read_dataset_info(str(cache))
    assert reseeded["seed"] == 2  # different seed: prepared again, with another split
    assert reseeded["val"]["samples"] != read_dataset_info(str(prepared_local))["val"]["samples"]
    assert set(tile_digests(cache, "train")) | set(tile_digests(cache, "val")) == set(
        tile_digests(prepared_local, "train")
    ) | set(tile_digests(prepared_local, "val"))


# ----------------------------------------------------------------------------- Ray: training data


@pytest.mark.ray
def test_training_datasets_have_the_batch_format_and_new_augmentations_each_pass(
    prepared_local,
):
    config = DataConfig(image_size=32, augment=True, elastic_probability=0.5)
    datasets = data.build_training_datasets(str(prepared_local), config, passes=2)
    info = read_dataset_info(str(prepared_local))

    batches = list(datasets["train"].iter_torch_batches(batch_size=8))
    assert sum(len(batch["image"]) for batch in batches) == 2 * info["train"]["tiles"]
    batch = batches[0]
    assert tuple(batch["image"].shape[1:]) == (3, 32, 32)
    assert str(batch["image"].dtype) == "torch.uint8"  # normalised on the device (issue 22)
    assert tuple(batch["mask"].shape[1:]) == (1, 32, 32)
    assert str(batch["labels"].dtype) == "torch.int32"
    assert bool(((batch["labels"] > 0).float() == batch["mask"][:, 0]).all())
    # every crop and transformation drawn anew each pass; a crop of blank background is the
    # same whatever is drawn (two all-black crops failed this once in 12 runs), so not those
    images = [image for b in batches for image in b["image"]]
    crops = [image.numpy().tobytes() for image in images if image.max() > image.min()]
    assert len(crops) >= len(images) // 2
    assert len(set(crops)) == len(crops)


@pytest.mark.ray
def test_copies_draw_each_tile_several_times_and_passes_read_files_in_a_fresh_order(
    prepared_local,
):
    config = DataConfig(image_size=TILE, augment=False)
    one_pass = dataset_images(data.build_training_datasets(str(prepared_local), config)["train"])
    three_copies = data.build_training_datasets(str(prepared_local), config, copies=3)["train"]
    assert dataset_images(three_copies) == sorted(one_pass * 3)  # every tile exactly 3 times
    with pytest.raises(ValueError, match="copies must be at least 1"):
        data.build_training_datasets(str(prepared_local), config, copies=0)


def test_every_pass_reads_the_files_in_a_fresh_random_order():
    files = [f"part-{index}.parquet" for index in range(5)]
    order = data.shuffled_passes(files, 20, np.random.default_rng(0))
    passes = [order[index : index + 5] for index in range(0, 100, 5)]
    assert all(sorted(one) == files for one in passes)  # each pass: every file once
    assert len({tuple(one) for one in passes}) > 10  # and in orders that change
    assert data.shuffled_passes(files, 1, None) == files  # no generator: as listed


@pytest.mark.parametrize(
    ("tiles", "workers", "batch", "min_steps", "copies"),
    [
        (8, 1, 16, 100, 200),
        (3000, 1, 16, 100, 1),
        (12, 2, 2, 5, 2),
        (10, 3, 4, 1, 1),
        (8, 1, 16, 1, 1),
    ],
)
def test_tile_copies_give_every_epoch_at_least_the_minimum_steps(
    tiles, workers, batch, min_steps, copies
):
    from unet_ray.pipelines.train_loop import steps_per_worker_epoch

    assert data.tile_copies(tiles, workers, batch, min_steps) == copies
    assert steps_per_worker_epoch(tiles * copies, workers, batch) >= min_steps
    if copies > 1:  # the fewest copies whose tiles fill the minimum steps' batches
        assert tiles * (copies - 1) < min_steps * batch * workers


def dataset_images(dataset) -> list[bytes]:
    return sorted(
        image.tobytes()
        for batch in dataset.iter_batches(batch_format="numpy")
        for image in batch["image"]
    )


@pytest.mark.ray
def test_without_augmentation_every_pass_holds_each_full_tile_once(prepared_local):
    config = DataConfig(image_size=TILE, augment=False)
    one_pass = dataset_images(data.build_training_datasets(str(prepared_local), config)["train"])
    three_passes = data.build_training_datasets(str(prepared_local), config, passes=3)["train"]
    assert (
        len(set(one_pass))
        == len(one_pass)
        == read_dataset_info(str(prepared_local))["train"]["tiles"]
    )
    assert dataset_images(three_passes) == sorted(one_pass * 3)
    with pytest.raises(ValueError, match="passes must be at least 1, got 0"):
        data.load_split(str(prepared_local), TRAIN_SPLIT, passes=0)


class CountingShard:
    """A real Ray dataset that counts how often it was iterated (executions started)."""

    def __init__(self, dataset):
        self.dataset, self.iterations = dataset, 0

    def iter_torch_batches(self, **options):
        self.iterations += 1
        return self.dataset.iter_torch_batches(**options)


@pytest.mark.ray
def test_stream_batches_feeds_the_epochs_from_one_execution_then_starts_another(prepared_local):
    import torch

    from unet_ray.pipelines.train_loop import steps_per_worker_epoch, stream_batches

    config = DataConfig(image_size=TILE, augment=False)
    tiles = read_dataset_info(str(prepared_local))["train"]["tiles"]
    passes, batch_size = 2, 1
    shard = CountingShard(
        data.build_training_datasets(str(prepared_local), config, passes)["train"]
    )
    steps = steps_per_worker_epoch(tiles, world_size=1, batch_size=batch_size)
    stream = stream_batches(shard, batch_size, torch.device("cpu"))

    seen = [next(stream)["image"][0].numpy().tobytes() for _ in range(passes * steps)]
    assert shard.iterations == 1  # both epochs from one execution
    one_pass = dataset_images(data.build_training_datasets(str(prepared_local), config)["train"])
    assert sorted(seen) == sorted(one_pass * passes)
    next(stream)  # the passes ran out: a new execution starts
    assert shard.iterations == 2

    import ray

    empty = ray.data.range(2).filter(lambda row: row["id"] < 0)
    with pytest.raises(RuntimeError, match="training shard is empty"):
        next(stream_batches(empty, batch_size, torch.device("cpu")))


@pytest.mark.parametrize(
    "epochs, tiles, world_size, batch_size",
    [(2, 24, 1, 4), (40, 1000, 2, 8), (3, 10, 2, 2), (5, 7, 3, 4), (40, 4, 1, 16), (1, 1, 1, 1)],
)
def test_training_passes_are_the_fewest_that_last_every_epoch(
    epochs, tiles, world_size, batch_size
):
    from unet_ray.pipelines.train_loop import steps_per_worker_epoch, training_passes

    needed = epochs * steps_per_worker_epoch(tiles, world_size, batch_size) * batch_size
    passes = training_passes(epochs, tiles, world_size, batch_size)
    assert passes * tiles // world_size >= needed  # each worker's equal share of all passes
    assert passes == 1 or (passes - 1) * tiles // world_size < needed  # and no more


def test_steps_per_worker_epoch_covers_each_workers_equal_share():
    from unet_ray.pipelines.train_loop import steps_per_worker_epoch

    assert steps_per_worker_epoch(10, world_size=2, batch_size=2) == 3  # 5 tiles each
    assert steps_per_worker_epoch(11, world_size=2, batch_size=2) == 3  # Ray drops 1 tile
    assert steps_per_worker_epoch(24, world_size=1, batch_size=4) == 6
    assert steps_per_worker_epoch(1, world_size=4, batch_size=8) == 1  # never zero


@pytest.mark.ray
def test_image_size_larger_than_the_tiles_is_refused(prepared_local):
    with pytest.raises(ValueError, match=f"larger than the prepared tiles \\({TILE}\\)"):
        data.build_training_datasets(str(prepared_local), DataConfig(image_size=TILE * 2))
