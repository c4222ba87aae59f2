"""Pixel size (issue 23): the TIFF resolution read, whole images inferred at the model's pixel size
and mapped back, the checkpoint recording what the slide job's mismatch warning reads."""

from __future__ import annotations

import dataclasses
import io as bytes_io
import logging

import cv2
import numpy as np
import pytest
import tifffile
import torch

from unet_ray import __version__
from unet_ray.core.config import Config, SegmentConfig
from unet_ray.core.model import UNetVGG16BN
from unet_ray.core.resample import model_scale, probabilities_at_scale, resize_maps
from unet_ray.inference import image_maps, make_batch_predictor
from unet_ray.io.checkpoint import INPUT_CONTRACT, load_model, read_checkpoint_info, save_checkpoint
from unet_ray.io.images import decode_pixel_size, encode_png
from unet_ray.io.synth import generate_sample
from unet_ray.pipelines.segment import SegmentActor
from unet_ray.pipelines.slides import training_mpp, warn_mpp_mismatch


def tiff_bytes(image: np.ndarray, **options) -> bytes:
    buffer = bytes_io.BytesIO()
    tifffile.imwrite(buffer, image, **options)
    return buffer.getvalue()


IMAGE = np.zeros((40, 50, 3), np.uint8)


@pytest.mark.parametrize(
    "data, mpp",
    [
        (tiff_bytes(IMAGE, resolution=(2e4, 2e4), resolutionunit="CENTIMETER"), 0.5),
        (tiff_bytes(IMAGE, resolution=(25400 / 0.25, 25400 / 0.25), resolutionunit="INCH"), 0.25),
        (tiff_bytes(IMAGE, imagej=True, resolution=(4.0, 4.0), metadata={"unit": "um"}), 0.25),
        (tiff_bytes(IMAGE, ome=True, metadata={"PhysicalSizeX": 0.325}), 0.325),
        (tiff_bytes(IMAGE, resolution=(72, 72), resolutionunit="INCH"), None),  # a writer's default
        (tiff_bytes(IMAGE), None),
        (encode_png(IMAGE), None),
    ],
    ids=["centimetre", "inch", "imagej", "ome", "72-dpi", "no-tags", "png"],
)
def test_pixel_size_is_read_from_tiff_resolution_tags(data, mpp):
    assert decode_pixel_size(data) == pytest.approx(mpp) if mpp else decode_pixel_size(data) is None


def test_model_scale():
    assert model_scale(0.25, 0.5) == 0.5  # a finer image is shrunk to the model's pixel size
    assert model_scale(1.0, 0.5) == 2.0
    assert model_scale(0.505, 0.5) == 1.0  # within 2 %: left alone
    assert model_scale(None, 0.5) == model_scale(0.25, None) == 1.0


def test_maps_come_back_at_the_image_size_from_a_network_run_at_the_model_size():
    """An "network" that returns its input's red channel: at scale 0.5 it sees a half-size image,
    and its map, resized back, is the image again (a smooth ramp survives both resizes)."""
    ramp = np.linspace(0, 255, 160, dtype=np.float32)
    image = np.repeat(np.tile(ramp, (120, 1))[:, :, None], 3, axis=2).astype(np.uint8)
    seen = []

    def red_channel(pixels):
        seen.append(pixels.shape)
        return pixels[None, :, :, 0].astype(np.float32)

    maps = probabilities_at_scale(image, 0.5, red_channel)
    assert seen == [(60, 80, 3)]
    assert maps.shape == (1, 120, 160)
    assert np.abs(maps[0, :, 2:-2] - image[:, 2:-2, 0]).max() <= 2.0  # edges aside
    assert probabilities_at_scale(image, 1.0, red_channel).shape == (1, 120, 160)
    assert seen[-1] == (120, 160, 3)  # scale 1: the image as it is


@pytest.fixture(scope="module")
def checkpoint_at_half_micron(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("mpp") / "checkpoint"
    save_checkpoint(
        str(folder), UNetVGG16BN(), Config.from_dict({"data": {"mpp": 0.5}}).to_dict(), {}
    )
    return str(folder)


def test_the_checkpoint_records_what_the_slide_warning_reads(checkpoint_at_half_micron, caplog):
    info = read_checkpoint_info(checkpoint_at_half_micron)
    assert training_mpp(info) == 0.5  # pipelines.slides reads config.data.mpp
    assert info["input"] == {**INPUT_CONTRACT, "mpp": 0.5}
    assert info["input"]["channels"] == "RGB" and info["input"]["dtype"] == "uint8"
    assert info["input"]["scaling_above_8_bit"]["high_percentile"] == 99.8
    assert info["unet_ray_version"] == __version__
    with caplog.at_level(logging.WARNING):
        warn_mpp_mismatch("slide.svs", 0.25, training_mpp(info))
    assert "--mpp 0.5" in caplog.text  # the warning names the pixel size to segment at


def test_segment_actor_infers_whole_images_at_the_model_pixel_size(
    checkpoint_at_half_micron, tmp_path
):
    """The inference actor (run here without Ray) reads a TIFF's 0.25 um/px, shrinks it to the
    checkpoint's 0.5 and resizes the maps back; the same pixels as PNG (no pixel size) are
    inferred as they are, unless --mpp (segment.image_mpp) states it."""
    image, _ = generate_sample(np.random.default_rng(3), 128, 160, "he")
    tiff = tmp_path / "quarter.tif"
    tiff.write_bytes(tiff_bytes(image, resolution=(4e4, 4e4), resolutionunit="CENTIMETER"))
    png = tmp_path / "plain.png"
    png.write_bytes(encode_png(image))
    segment = SegmentConfig(tile=64, overlap=16, batch_size=4)
    model, _ = load_model(checkpoint_at_half_micron)
    predict = make_batch_predictor(model, "cpu", probabilities=True)
    native = image_maps(image, predict, segment)
    half = image_maps(cv2.resize(image, (80, 64), interpolation=cv2.INTER_AREA), predict, segment)
    rescaled = resize_maps(half, (128, 160))

    actor = SegmentActor(checkpoint_at_half_micron, dataclasses.asdict(segment))
    from_tiff = actor.infer_one(str(tiff))
    assert from_tiff["status"] == "ok" and from_tiff["mpp"] == pytest.approx(0.25)
    found = from_tiff["probabilities"].astype(np.float32)
    assert found.shape == native.shape == (1, 128, 160)
    assert np.abs(found - rescaled).max() < 2e-3  # float16 maps
    assert np.abs(found - native).max() > 0.01  # really inferred at another size
    from_png = actor.infer_one(str(png))["probabilities"].astype(np.float32)
    assert np.abs(from_png - native).max() < 2e-3
    stated = SegmentActor(
        checkpoint_at_half_micron, {**dataclasses.asdict(segment), "image_mpp": 0.25}
    )
    from_flag = stated.infer_one(str(png))["probabilities"].astype(np.float32)
    assert np.abs(from_flag - rescaled).max() < 2e-3
