"""Tests for unet_ray.io (files, images, dsb): filesystems (local and a real moto S3 server), decoding, DSB2018 layout."""

from __future__ import annotations

import io as bytes_io
import os
import shutil
import stat
import zipfile
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from unet_ray.io.dsb import (
    DatasetError,
    SampleRef,
    list_dsb_samples,
    read_dsb_sample,
    write_dsb_sample,
)
from unet_ray.io.files import (
    WRITE_PROBE_NAME,
    check_writable,
    exists,
    fsspec_filesystem,
    is_s3,
    join_uri,
    list_files,
    make_dirs,
    read_bytes,
    resolve_filesystem,
    write_bytes_atomic,
)
from unet_ray.io.images import (
    NORMALISE_HIGH_PERCENTILE,
    NORMALISE_LOW_PERCENTILE,
    ImageReadError,
    decode_image,
    decode_image_with_original,
    encode_png,
    read_image,
)
from unet_ray.io.synth import write_synthetic_dataset

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def pillow_png(array: np.ndarray) -> bytes:
    buffer = bytes_io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def tiff_bytes(array: np.ndarray, **options) -> bytes:
    buffer = bytes_io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


def zip_folder(folder: Path, archive: Path, top_folder: str = "") -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder).as_posix()
            handle.write(path, top_folder + relative)
    return archive


def upload_folder(folder: Path, bucket: str, prefix: str, endpoint: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def read_all(source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {ref.sample_id: read_dsb_sample(ref) for ref in list_dsb_samples(source)}


def assert_same_samples(expected: dict, actual: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for sample_id, (image, labels) in expected.items():
        np.testing.assert_array_equal(actual[sample_id][0], image)
        np.testing.assert_array_equal(actual[sample_id][1], labels)


def make_sample(
    root: Path, sample_id: str = "abc", shape=(20, 24)
) -> tuple[np.ndarray, np.ndarray]:
    """A hand-made DSB sample with two overlapping square nuclei; returns (image, labels)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    (root / sample_id / "images").mkdir(parents=True)
    (root / sample_id / "masks").mkdir()
    rgba = np.concatenate([image, np.full(shape + (1,), 255, np.uint8)], axis=2)
    (root / sample_id / "images" / f"{sample_id}.png").write_bytes(pillow_png(rgba))
    first = np.zeros(shape, np.uint8)
    first[2:10, 2:10] = 255
    second = np.zeros(shape, np.uint8)
    second[8:14, 8:16] = 255  # overlaps the first: the later mask (b.png) wins
    (root / sample_id / "masks" / "a.png").write_bytes(pillow_png(first))
    (root / sample_id / "masks" / "b.png").write_bytes(pillow_png(second))
    labels = np.zeros(shape, np.int32)
    labels[first > 0] = 1
    labels[second > 0] = 2
    return image, labels


# --------------------------------------------------------------------------------------------
# URIs and filesystems
# --------------------------------------------------------------------------------------------


def test_is_s3_and_join_uri():
    assert is_s3("s3://bucket/key") and not is_s3("/data/s3://x") and not is_s3("data")
    assert join_uri("s3://bucket/prefix/", "a", "/b/", "c.png") == "s3://bucket/prefix/a/b/c.png"
    assert join_uri("/data", "a", "b.png") == os.path.join("/data", "a", "b.png")


def test_resolve_filesystem_local_gives_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    filesystem, path = resolve_filesystem("relative/file.png")
    assert filesystem.type_name == "local"
    assert path == str(tmp_path / "relative" / "file.png")


def test_resolve_filesystem_s3_uses_endpoint_from_environment(s3_endpoint, s3_bucket):
    filesystem, path = resolve_filesystem(f"s3://{s3_bucket}/some/key.png/")
    assert filesystem.type_name == "s3"
    assert path == f"{s3_bucket}/some/key.png"
    write_bytes_atomic(f"s3://{s3_bucket}/hello.txt", b"hi")  # reaches the moto server
    import boto3

    body = boto3.client("s3", endpoint_url=s3_endpoint).get_object(
        Bucket=s3_bucket, Key="hello.txt"
    )
    assert body["Body"].read() == b"hi"


def test_fsspec_filesystem_reads_what_pyarrow_wrote(s3_bucket):
    uri = f"s3://{s3_bucket}/folder/data.bin"
    write_bytes_atomic(uri, b"\x00\x01payload")
    filesystem, path = fsspec_filesystem(uri)
    with filesystem.open(path, "rb") as handle:
        assert handle.read() == b"\x00\x01payload"


def test_write_bytes_atomic_local_leaves_no_temp_file(tmp_path):
    target = tmp_path / "new" / "folder" / "file.bin"
    write_bytes_atomic(str(target), b"first")
    write_bytes_atomic(str(target), b"second version")
    assert target.read_bytes() == b"second version"
    assert sorted(os.listdir(target.parent)) == ["file.bin"]


@contextmanager
def umask(mask: int):
    """Run the block under another umask (process-wide), restoring the old one."""
    saved = os.umask(mask)
    try:
        yield
    finally:
        os.umask(saved)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_write_bytes_atomic_gives_files_the_umask_permissions(tmp_path, mask, mode):
    target = tmp_path / "out" / "file.bin"
    with umask(mask):
        write_bytes_atomic(str(target), b"first")
        assert stat.S_IMODE(target.stat().st_mode) == mode
        write_bytes_atomic(str(target), b"replaced")  # the rename keeps the new file's mode
    assert stat.S_IMODE(target.stat().st_mode) == mode
    assert sorted(os.listdir(target.parent)) == ["file.bin"]


def test_check_writable_local_folders_and_leaves_nothing_behind(tmp_path):
    check_writable(str(tmp_path))
    check_writable(str(tmp_path / "not" / "yet" / "there"))  # creatable: fine
    assert os.listdir(tmp_path) == []  # no probe, no folder created


def test_check_writable_refuses_a_file_and_a_path_under_a_file(tmp_path):
    (tmp_path / "results.csv").write_text("a file")
    with pytest.raises(ValueError, match="results.csv: cannot write output there: it is a file"):
        check_writable(str(tmp_path / "results.csv"))
    under_file = str(tmp_path / "results.csv" / "out")
    with pytest.raises(ValueError, match="results.csv is a file, not a folder") as raised:
        check_writable(under_file)  # fails for root too
    assert str(raised.value).startswith(under_file)


def test_check_writable_refuses_a_read_only_folder(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root (or with CAP_DAC_OVERRIDE): chmod does not stop writes")
        with pytest.raises(ValueError, match="read_only: cannot write output there.*ermission"):
            check_writable(str(folder))
        with pytest.raises(ValueError, match="creating it needs writing in .*read_only"):
            check_writable(str(folder / "new"))
    finally:
        folder.chmod(0o755)


def test_check_writable_on_s3(s3_bucket):
    import boto3

    check_writable(f"s3://{s3_bucket}/results/run1")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    assert client.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0  # probe deleted
    missing = "s3://no-such-bucket-for-unet-ray/out"
    with pytest.raises(ValueError, match="no-such-bucket-for-unet-ray") as raised:
        check_writable(missing)
    assert str(raised.value).startswith(f"{missing}: cannot write output there")
    assert "exists" in str(raised.value)


def test_write_probe_is_hidden_from_listings(tmp_path):
    (tmp_path / f"{WRITE_PROBE_NAME}.left").write_bytes(b"")  # as if a probe survived a crash
    assert list_files(str(tmp_path)) == []


def test_read_list_exists_on_local_and_s3(tmp_path, s3_bucket):
    for root in (str(tmp_path / "root"), f"s3://{s3_bucket}/root"):
        make_dirs(root)
        write_bytes_atomic(join_uri(root, "b.PNG"), b"1")
        write_bytes_atomic(join_uri(root, "a.tif"), b"2")
        write_bytes_atomic(join_uri(root, "notes.txt"), b"3")
        write_bytes_atomic(join_uri(root, "sub", "c.png"), b"4")
        assert list_files(root, suffixes=(".png", ".tif")) == [
            join_uri(root, "a.tif"),
            join_uri(root, "b.PNG"),
        ]
        assert join_uri(root, "sub", "c.png") in list_files(root, recursive=True)
        assert len(list_files(root, recursive=True)) == 4
        assert read_bytes(join_uri(root, "sub", "c.png")) == b"4"
        assert exists(join_uri(root, "a.tif")) and not exists(join_uri(root, "missing.png"))
        assert list_files(join_uri(root, "no-such-folder")) == []
        with pytest.raises(FileNotFoundError, match="missing.png"):
            read_bytes(join_uri(root, "missing.png"))


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


GRADIENT_16 = (np.arange(12, dtype=np.uint16) * 1000 + 500).reshape(3, 4)  # 500..11500


def percentile_normalised(values: np.ndarray) -> np.ndarray:
    """The expected 8-bit rendering, computed independently in float64."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = np.percentile(finite, (NORMALISE_LOW_PERCENTILE, NORMALISE_HIGH_PERCENTILE))
    return np.clip(np.rint((values - low) / (high - low) * 255), 0, 255).astype(np.uint8)


def assert_close_uint8(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to one grey level (float32 versus float64 rounding at .5)."""
    assert actual.dtype == np.uint8 and actual.shape == expected.shape
    assert np.abs(actual.astype(int) - expected.astype(int)).max() <= 1


def nuclei_with_hot_pixel(dtype, background, nucleus, hot) -> np.ndarray:
    """64 x 64: a background, a 16 x 16 nucleus (6 % of the pixels) and one hot pixel."""
    image = np.full((64, 64), background, dtype=dtype)
    image[20:36, 20:36] = nucleus
    image[3, 5] = hot
    return image


def test_decode_grayscale_png_repeats_into_three_channels():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    rgb = decode_image(pillow_png(gray), "gray.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[:, :, channel], gray)  # 8-bit: never rescaled


def test_decode_rgba_png_drops_alpha():
    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 0
    rgb = decode_image(pillow_png(rgba), "rgba.png")
    assert rgb.shape == (5, 6, 3)
    assert (rgb == [10, 20, 30]).all()


def test_decode_palette_png_gives_its_colours():
    image = Image.new("P", (4, 3))
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    image.putpixel((1, 1), 1)
    buffer = bytes_io.BytesIO()
    image.save(buffer, format="PNG")
    rgb = decode_image(buffer.getvalue(), "palette.png")
    assert rgb[1, 1].tolist() == [200, 100, 50] and rgb[0, 0].tolist() == [0, 0, 0]


def test_decode_16_bit_gray_png_is_percentile_normalised():
    rgb = decode_image(pillow_png(GRADIENT_16), "gray16.png")
    assert_close_uint8(rgb[:, :, 1], percentile_normalised(GRADIENT_16))
    assert rgb.min() == 0 and rgb.max() == 255


def test_16_bit_image_with_one_hot_pixel_keeps_its_contrast():
    """Min-max would put the nucleus (raw 30000) at 116 and the background at 4; percentiles
    ignore the hot pixel, so background is black and the nucleus white."""
    for encode in (pillow_png, tiff_bytes):
        gray16 = nuclei_with_hot_pixel(np.uint16, 1000, 30000, 65535)
        rgb = decode_image(encode(gray16), "hot.tif")
        assert rgb[0, 0].tolist() == [0, 0, 0]  # background
        assert rgb[28, 28].tolist() == [255, 255, 255]  # nucleus: full contrast
        assert rgb[3, 5].tolist() == [255, 255, 255]  # the hot pixel is clipped


def test_float_image_with_one_hot_pixel_nan_and_inf_keeps_its_contrast():
    floats = nuclei_with_hot_pixel(np.float32, 0.1, 0.6, 1e6)
    floats[0, 1], floats[0, 2] = np.nan, np.inf
    rgb = decode_image(tiff_bytes(floats), "hot_float.tif")
    assert rgb[10, 10, 0] == 0 and rgb[28, 28, 0] == 255
    assert (rgb[0, 1, 0], rgb[0, 2, 0]) == (0, 255)  # NaN black, +inf saturated
    gradient = np.linspace(-1.0, 3.0, 48, dtype=np.float32).reshape(6, 8)
    assert_close_uint8(
        decode_image(tiff_bytes(gradient), "g.tif")[:, :, 0], percentile_normalised(gradient)
    )


def test_percentiles_are_joint_over_channels_keeping_colour_balance():
    """A pinkish 16-bit RGB: red stays brighter than blue (a stretch per channel would make
    every channel span 0..255 and the nucleus grey)."""
    rgb16 = np.zeros((32, 32, 3), np.uint16)
    rgb16[...] = (20000, 12000, 16000)
    rgb16[8:24, 8:24] = (40000, 10000, 30000)
    rgb = decode_image(tiff_bytes(rgb16, photometric="rgb"), "pink.tif")
    assert_close_uint8(rgb, percentile_normalised(rgb16))
    red, green, blue = (int(value) for value in rgb[16, 16])
    assert red == 255 and green == 0 and 0 < blue < red


def test_constant_and_sparse_16_bit_images():
    constant = decode_image(tiff_bytes(np.full((10, 12), 4321, np.uint16)), "constant.tif")
    assert constant.shape == (10, 12, 3) and (constant == 0).all()  # no division by zero
    sparse = np.zeros((100, 100), np.uint16)  # 99.96 % background: both percentiles are 0
    sparse[50, 50:54] = 20000
    rendered = decode_image(tiff_bytes(sparse), "sparse.tif")
    assert rendered[50, 51, 0] == 255 and rendered[0, 0, 0] == 0  # min-max then


def test_decode_image_with_original_keeps_the_input_units():
    gray16 = nuclei_with_hot_pixel(np.uint16, 1000, 30000, 65535)
    rgb, original = decode_image_with_original(tiff_bytes(gray16), "gray16.tif")
    assert original.dtype == np.uint16 and original.shape == (64, 64)
    np.testing.assert_array_equal(original, gray16)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    rgba = np.random.default_rng(3).integers(0, 256, (5, 6, 4), dtype=np.uint8)
    rgb, original = decode_image_with_original(pillow_png(rgba), "rgba.png")
    np.testing.assert_array_equal(original, rgba[:, :, :3])  # 8-bit: the same values
    np.testing.assert_array_equal(rgb, rgba[:, :, :3])


def test_decode_16_bit_colour_png_keeps_all_bits():
    rgb16 = np.stack([GRADIENT_16, GRADIENT_16 // 2 + 500, np.full_like(GRADIENT_16, 500)], axis=2)
    ok, encoded = cv2.imencode(".png", rgb16[:, :, ::-1])  # OpenCV writes BGR
    assert ok
    rgb = decode_image(encoded.tobytes(), "rgb16.png")
    assert_close_uint8(rgb, percentile_normalised(rgb16))
    _, original = decode_image_with_original(encoded.tobytes(), "rgb16.png")
    np.testing.assert_array_equal(original, rgb16)


def test_decode_16_bit_tiff_and_bigtiff():
    for options in ({}, {"bigtiff": True}):
        data = tiff_bytes(GRADIENT_16, **options)
        assert data[:4] == (b"II+\x00" if options else b"II*\x00")
        rgb = decode_image(data, "gray16.tif")
        assert_close_uint8(rgb[:, :, 0], percentile_normalised(GRADIENT_16))
        np.testing.assert_array_equal(rgb[:, :, 2], rgb[:, :, 0])


def test_decode_tiff_planar_rgb_multipage_and_float():
    rgb = np.random.default_rng(1).integers(0, 256, (3, 5, 7), dtype=np.uint8)  # C, H, W
    planar = tiff_bytes(rgb, photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(decode_image(planar, "planar.tif"), np.moveaxis(rgb, 0, -1))
    pages = np.stack([np.full((4, 4), 7, np.uint8), np.full((4, 4), 99, np.uint8)])
    first_page = decode_image(tiff_bytes(pages, photometric="minisblack"), "pages.tif")
    assert first_page.shape == (4, 4, 3) and (first_page == 7).all()
    floats = np.array([[0.0, 0.5], [0.25, 1.0]], np.float32)
    decoded = decode_image(tiff_bytes(floats), "float.tif")
    assert_close_uint8(decoded[:, :, 0], percentile_normalised(floats))
    assert decoded[0, 0, 0] == 0 and decoded[1, 1, 0] == 255


def test_decode_jpeg():
    buffer = bytes_io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), (120, 60, 200), np.uint8)).save(buffer, format="JPEG")
    rgb = decode_image(buffer.getvalue(), "photo.jpg")
    assert rgb.shape == (16, 16, 3)
    assert np.abs(rgb.astype(int) - [120, 60, 200]).max() <= 3


def test_encode_png_round_trips(tmp_path):
    image = np.random.default_rng(2).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    write_bytes_atomic(str(tmp_path / "x.png"), encode_png(image))
    np.testing.assert_array_equal(read_image(str(tmp_path / "x.png")), image)
    with pytest.raises(ValueError, match="float"):
        encode_png(np.zeros((4, 4), np.float64))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "zero-byte file"),
        (pillow_png(np.zeros((32, 32), np.uint8))[:60], "truncated or corrupt PNG"),
        (pillow_png(np.zeros((32, 32), np.uint8))[:-12], "truncated or corrupt PNG"),
        (b"this is a text file, not a picture\n", r"not an image \(unrecognised format"),
        (b"II*\x00garbage-after-the-header", "truncated or corrupt TIFF"),
    ],
    ids=["zero-byte", "truncated-png", "png-without-end", "text-file", "broken-tiff"],
)
def test_bad_images_raise_clear_errors_naming_the_file(data, message):
    with pytest.raises(ImageReadError, match=message) as raised:
        decode_image(data, "folder/bad_file.png")
    assert str(raised.value).startswith("folder/bad_file.png: ")


def test_bad_image_errors_are_distinct():
    messages = set()
    for data in (b"", pillow_png(np.zeros((32, 32), np.uint8))[:60], b"plain text"):
        with pytest.raises(ImageReadError) as raised:
            decode_image(data, "x.png")
        messages.add(str(raised.value).split("(")[0])
    assert len(messages) == 3


def test_unsupported_shape_is_reported():
    seven_samples = tiff_bytes(
        np.zeros((6, 5, 7), np.uint8), photometric="minisblack", planarconfig="contig"
    )
    with pytest.raises(ImageReadError, match=r"seven\.tif: unsupported image shape \(6, 5, 7\)"):
        decode_image(seven_samples, "seven.tif")
    rgba_pages = tiff_bytes(np.zeros((2, 6, 5, 4), np.uint8), photometric="rgb")
    assert decode_image(rgba_pages, "rgba.tif").shape == (6, 5, 3)


# --------------------------------------------------------------------------------------------
# DSB2018 layout: folder, zip and S3 give identical arrays
# --------------------------------------------------------------------------------------------


def test_read_hand_made_sample_labels_in_sorted_mask_order_later_wins(tmp_path):
    image, labels = make_sample(tmp_path)
    refs = list_dsb_samples(str(tmp_path))
    assert refs == [SampleRef(str(tmp_path), "abc")]
    read_image_array, read_labels = read_dsb_sample(refs[0])
    np.testing.assert_array_equal(read_image_array, image)
    assert read_labels.dtype == np.int32
    np.testing.assert_array_equal(read_labels, labels)
    assert read_labels[9, 9] == 2  # the overlap belongs to the later mask


def test_folder_with_stage1_train_subfolder(synth_root):
    parent = str(Path(synth_root).parent)
    refs = list_dsb_samples(parent)
    assert refs == list_dsb_samples(str(synth_root))
    assert all(ref.source == str(synth_root) for ref in refs)
    assert len(refs) == 12


def test_folder_zip_and_s3_give_identical_arrays(tmp_path, s3_endpoint, s3_bucket):
    synth_root = tmp_path / "data" / "stage1_train"
    write_synthetic_dataset(synth_root, count=3, seed=11, min_side=64, max_side=128)
    from_folder = read_all(str(synth_root))
    assert len(from_folder) == 3
    for image, labels in from_folder.values():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert labels.dtype == np.int32 and labels.shape == image.shape[:2] and labels.max() >= 1

    archives = tmp_path / "archives"
    archives.mkdir()
    kaggle_zip = zip_folder(synth_root, archives / "stage1_train.zip")
    assert_same_samples(from_folder, read_all(str(kaggle_zip)))
    nested_zip = zip_folder(synth_root, archives / "nested.zip", top_folder="stage1_train/")
    assert_same_samples(from_folder, read_all(str(nested_zip)))

    upload_folder(synth_root, s3_bucket, "data/stage1_train", s3_endpoint)
    assert_same_samples(from_folder, read_all(f"s3://{s3_bucket}/data/stage1_train"))
    assert_same_samples(from_folder, read_all(f"s3://{s3_bucket}/data"))  # finds stage1_train/
    upload_folder(archives, s3_bucket, "archives", s3_endpoint)
    assert_same_samples(from_folder, read_all(f"s3://{s3_bucket}/archives/stage1_train.zip"))


def test_write_dsb_sample_round_trips_locally_and_on_s3(tmp_path, s3_bucket):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    labels = np.zeros((30, 40), np.int32)
    labels[1:8, 1:9], labels[10:20, 5:15], labels[25:29, 30:39] = 3, 7, 9
    for root in (str(tmp_path), f"s3://{s3_bucket}/written"):
        mask_ids = write_dsb_sample(root, "sample1", image, labels)
        assert len(mask_ids) == 3
        assert len(list_files(join_uri(root, "sample1", "masks"))) == 3
        stored = read_image(join_uri(root, "sample1", "images", "sample1.png"))
        np.testing.assert_array_equal(stored, image)
        read_back_image, read_back_labels = read_dsb_sample(SampleRef(root, "sample1"))
        np.testing.assert_array_equal(read_back_image, image)
        expected = np.select([labels == 3, labels == 7, labels == 9], [1, 2, 3], 0)
        np.testing.assert_array_equal(read_back_labels, expected)


# --------------------------------------------------------------------------------------------
# DSB2018 layout: bad input names the sample and the problem
# --------------------------------------------------------------------------------------------


def test_sample_without_images_folder(tmp_path):
    make_sample(tmp_path, "good")
    (tmp_path / "broken" / "masks").mkdir(parents=True)
    shutil.copy(tmp_path / "good" / "masks" / "a.png", tmp_path / "broken" / "masks" / "a.png")
    assert [ref.sample_id for ref in list_dsb_samples(str(tmp_path))] == ["good"]
    with pytest.raises(DatasetError, match=r"sample broken in .*: no images/ folder"):
        read_dsb_sample(SampleRef(str(tmp_path), "broken"))


def test_truncated_image_png_names_the_file(tmp_path):
    make_sample(tmp_path, "s1")
    image_path = tmp_path / "s1" / "images" / "s1.png"
    image_path.write_bytes(image_path.read_bytes()[:50])
    with pytest.raises(ImageReadError, match=r"s1/images/s1\.png: truncated or corrupt PNG"):
        read_dsb_sample(list_dsb_samples(str(tmp_path))[0])


def test_truncated_mask_names_sample_and_file(tmp_path):
    make_sample(tmp_path, "s2")
    mask_path = tmp_path / "s2" / "masks" / "b.png"
    mask_path.write_bytes(mask_path.read_bytes()[:40])
    with pytest.raises(DatasetError, match=r"sample s2: .*masks/b\.png: truncated or corrupt PNG"):
        read_dsb_sample(SampleRef(str(tmp_path), "s2"))


def test_zero_byte_and_text_masks(tmp_path):
    make_sample(tmp_path, "s3")
    (tmp_path / "s3" / "masks" / "a.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"sample s3: .*a\.png: zero-byte file"):
        read_dsb_sample(SampleRef(str(tmp_path), "s3"))
    (tmp_path / "s3" / "masks" / "a.png").write_text("not a mask")
    with pytest.raises(DatasetError, match=r"sample s3: .*a\.png: not an image"):
        read_dsb_sample(SampleRef(str(tmp_path), "s3"))


def test_mask_of_another_size_gives_both_sizes(tmp_path):
    make_sample(tmp_path, "s4", shape=(20, 24))
    (tmp_path / "s4" / "masks" / "c.png").write_bytes(pillow_png(np.zeros((21, 24), np.uint8)))
    with pytest.raises(DatasetError, match=r"sample s4: mask .*c\.png is 21x24 .* image is 20x24"):
        read_dsb_sample(SampleRef(str(tmp_path), "s4"))


def test_missing_masks_is_an_error_unless_allowed(tmp_path):
    make_sample(tmp_path, "s5")
    shutil.rmtree(tmp_path / "s5" / "masks")
    with pytest.raises(DatasetError, match=r"sample s5 in .*: no masks/ folder"):
        read_dsb_sample(SampleRef(str(tmp_path), "s5"))
    image, labels = read_dsb_sample(SampleRef(str(tmp_path), "s5"), allow_missing_masks=True)
    assert image.shape == (20, 24, 3) and labels.shape == (20, 24) and not labels.any()


def test_empty_dataset_and_missing_source(tmp_path):
    (tmp_path / "empty" / "x" / "masks").mkdir(parents=True)
    with pytest.raises(
        DatasetError, match=r"no DSB2018 samples under .*empty: expected <id>/images/<id>\.png"
    ):
        list_dsb_samples(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="no such folder"):
        list_dsb_samples(str(tmp_path / "does-not-exist"))
    empty_zip = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty_zip, "w") as handle:
        handle.writestr("readme.txt", "nothing here")
    with pytest.raises(DatasetError, match=r"no DSB2018 samples under .*empty\.zip"):
        list_dsb_samples(str(empty_zip))
    (tmp_path / "broken.zip").write_bytes(b"PK not really a zip")
    with pytest.raises(DatasetError, match=r"broken\.zip: not a valid \.zip archive"):
        list_dsb_samples(str(tmp_path / "broken.zip"))


def test_empty_s3_prefix(s3_bucket):
    with pytest.raises(DatasetError, match=f"no DSB2018 samples under s3://{s3_bucket}/nothing"):
        list_dsb_samples(f"s3://{s3_bucket}/nothing")


def test_corrupt_zip_entry_names_the_entry(tmp_path):
    make_sample(tmp_path / "data", "z1")
    archive = zip_folder(tmp_path / "data", tmp_path / "corrupt.zip")
    with zipfile.ZipFile(archive) as handle:
        mask = handle.getinfo("z1/masks/b.png")
    data = bytearray(archive.read_bytes())
    data[mask.header_offset + 30 + len(mask.filename) + mask.compress_size // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"corrupt\.zip:z1/masks/b\.png: corrupt zip entry"):
        read_dsb_sample(list_dsb_samples(str(archive))[0])
