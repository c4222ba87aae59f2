"""Tests for unet_ray.io.synth: exact DSB2018 layout, determinism, variety and touching nuclei."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from unet_ray.io.dsb import SampleRef, list_dsb_samples, read_dsb_sample, write_dsb_sample
from unet_ray.io.files import read_bytes
from unet_ray.io.synth import STYLES, generate_sample, write_synthetic_dataset

HEX_DIGITS = set("0123456789abcdef")


def file_contents(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file()
    }


def assert_same_partition(first: np.ndarray, second: np.ndarray) -> None:
    """The two label maps hold the same objects, possibly numbered differently."""
    np.testing.assert_array_equal(first > 0, second > 0)
    pairs = {(int(a), int(b)) for a, b in zip(first[first > 0], second[second > 0], strict=True)}
    assert len({a for a, _ in pairs}) == len(pairs) == len({b for _, b in pairs})


def masks_touch(first: np.ndarray, second: np.ndarray) -> bool:
    return bool((ndimage.binary_dilation(first) & ndimage.binary_dilation(second)).any())


def test_layout_is_exactly_dsb2018(synth_root):
    sample_folders = sorted(path for path in Path(synth_root).iterdir())
    assert len(sample_folders) == 12
    for folder in sample_folders:
        sample_id = folder.name
        assert set(sample_id) <= HEX_DIGITS and len(sample_id) == 64
        assert sorted(child.name for child in folder.iterdir()) == ["images", "masks"]
        assert [path.name for path in (folder / "images").iterdir()] == [f"{sample_id}.png"]
        with Image.open(folder / "images" / f"{sample_id}.png") as image:
            assert image.mode == "RGBA"  # like Kaggle's stage1_train PNGs
            size = image.size
            assert (np.asarray(image)[:, :, 3] == 255).all()
        mask_paths = sorted((folder / "masks").iterdir())
        assert len(mask_paths) >= 1
        union = np.zeros(size[::-1], np.int32)
        for mask_path in mask_paths:
            assert mask_path.suffix == ".png" and set(mask_path.stem) <= HEX_DIGITS
            with Image.open(mask_path) as mask_image:
                assert mask_image.mode == "L" and mask_image.size == size
                mask = np.asarray(mask_image)
            assert set(np.unique(mask)) == {0, 255}  # binary, non-empty
            assert ndimage.label(mask > 0)[1] == 1  # one nucleus per mask
            union += mask > 0
        assert union.max() == 1  # masks are disjoint, like DSB2018's


def test_masks_reconstruct_the_generated_labels(tmp_path):
    rng = np.random.default_rng(5)
    image, labels = generate_sample(rng, 96, 130, "he")
    mask_ids = write_dsb_sample(str(tmp_path), "cafe01", image, labels, mask_ids=None)
    assert len(mask_ids) == labels.max() == len(np.unique(labels)) - 1
    read_image, read_labels = read_dsb_sample(SampleRef(str(tmp_path), "cafe01"))
    np.testing.assert_array_equal(read_image, image)
    np.testing.assert_array_equal(read_labels, labels)  # default mask ids sort in label order
    # with random hex mask ids (as the dataset writer uses) the objects are the same, renumbered
    write_dsb_sample(
        str(tmp_path / "hex"),
        "cafe01",
        image,
        labels,
        mask_ids=[f"{n:x}f" * 3 for n in range(labels.max(), 0, -1)],
    )
    assert_same_partition(read_dsb_sample(SampleRef(str(tmp_path / "hex"), "cafe01"))[1], labels)


def test_same_seed_gives_identical_bytes_other_seed_differs(tmp_path):
    options = {"count": 4, "min_side": 64, "max_side": 128}
    first_ids = write_synthetic_dataset(tmp_path / "a", seed=3, **options)
    second_ids = write_synthetic_dataset(str(tmp_path / "b"), seed=3, **options)
    other_ids = write_synthetic_dataset(tmp_path / "c", seed=4, **options)
    assert first_ids == second_ids and len(set(first_ids)) == 4
    first, second, other = (file_contents(tmp_path / name) for name in "abc")
    assert first == second
    assert not set(other_ids) & set(first_ids)
    first_images = sorted(data for name, data in first.items() if "/images/" in name)
    other_images = sorted(data for name, data in other.items() if "/images/" in name)
    assert not set(first_images) & set(other_images)


def test_sizes_vary_around_the_training_tile_and_are_not_square(tmp_path):
    write_synthetic_dataset(tmp_path, count=6, seed=0, min_side=64, max_side=320)
    shapes = [read_dsb_sample(ref)[0].shape[:2] for ref in list_dsb_samples(str(tmp_path))]
    assert all(64 <= side <= 320 for shape in shapes for side in shape)
    assert any(max(shape) < 256 for shape in shapes)
    assert any(max(shape) > 256 for shape in shapes)
    assert all(height != width for height, width in shapes)
    assert len(set(shapes)) == len(shapes)


def test_styles_look_like_their_modality():
    means = {}
    for style in STYLES:
        image, labels = generate_sample(np.random.default_rng(11), 128, 144, style)
        assert image.dtype == np.uint8 and image.shape == (128, 144, 3)
        assert labels.dtype == np.int32 and labels.max() >= 5
        nuclei = image[labels > 0].astype(float).mean(axis=0)
        background = image[labels == 0].astype(float).mean(axis=0)
        means[style] = (nuclei, background)
    nuclei, background = means["fluorescence"]
    assert background.mean() < 60 and nuclei.mean() > background.mean() + 40  # bright on dark
    nuclei, background = means["brightfield"]
    assert background.mean() > 150 and nuclei.mean() < background.mean() - 40  # dark on light
    nuclei, background = means["he"]
    red, green, blue = background
    assert red > green + 30 and blue > green  # pink eosin background
    assert nuclei[2] > nuclei[0] and nuclei.mean() < background.mean() - 40  # purple nuclei


def test_images_have_noise_and_uneven_background():
    image, labels = generate_sample(np.random.default_rng(2), 160, 160, "brightfield")
    background = np.where(labels[:, :, None] == 0, image.astype(float), np.nan)[:, :, 0]
    quarters = [
        np.nanmean(part)
        for row in np.array_split(background, 2)
        for part in np.array_split(row, 2, axis=1)
    ]
    assert max(quarters) - min(quarters) > 2  # illumination gradient
    smooth = ndimage.uniform_filter(image[:, :, 0].astype(float), 5)
    assert np.abs(image[:, :, 0] - smooth)[labels == 0].std() > 0.5  # noise


def test_some_nuclei_touch(synth_root):
    touching_samples = 0
    for ref in list_dsb_samples(str(synth_root)):
        _, labels = read_dsb_sample(ref)
        masks = [labels == label for label in range(1, labels.max() + 1)]
        boxes = ndimage.find_objects(labels)
        if any(
            masks_touch(masks[first], masks[second])
            for first in range(len(masks))
            for second in range(first + 1, len(masks))
            if boxes_near(boxes[first], boxes[second])
        ):
            touching_samples += 1
    assert touching_samples >= 1


def boxes_near(first: tuple[slice, slice], second: tuple[slice, slice]) -> bool:
    return all(
        a.start <= b.stop + 1 and b.start <= a.stop + 1 for a, b in zip(first, second, strict=True)
    )


def test_generate_sample_is_deterministic_and_rejects_unknown_style():
    first = generate_sample(np.random.default_rng(9), 70, 90, "fluorescence")
    second = generate_sample(np.random.default_rng(9), 70, 90, "fluorescence")
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    with pytest.raises(ValueError, match="style 'phase' is not one of"):
        generate_sample(np.random.default_rng(0), 64, 64, "phase")


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="count=0"):
        write_synthetic_dataset(tmp_path, count=0)
    with pytest.raises(ValueError, match="min_side=200, max_side=100"):
        write_synthetic_dataset(tmp_path, min_side=200, max_side=100)


def test_default_dataset_has_24_samples(tmp_path):
    sample_ids = write_synthetic_dataset(tmp_path)  # 24 images up to 320 px
    assert len(sample_ids) == len(set(sample_ids)) == 24
    assert [ref.sample_id for ref in list_dsb_samples(str(tmp_path))] == sorted(sample_ids)


def test_writes_to_s3_with_the_same_bytes(tmp_path, s3_bucket):
    local_ids = write_synthetic_dataset(tmp_path, count=2, seed=1, min_side=64, max_side=96)
    root = f"s3://{s3_bucket}/synth"
    assert write_synthetic_dataset(root, count=2, seed=1, min_side=64, max_side=96) == local_ids
    for sample_id in local_ids:
        name = f"{sample_id}/images/{sample_id}.png"
        assert read_bytes(f"{root}/{name}") == (tmp_path / name).read_bytes()
    assert [ref.sample_id for ref in list_dsb_samples(root)] == sorted(local_ids)
