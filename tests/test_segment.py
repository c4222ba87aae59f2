"""The segmentation job: tiled vs whole-image inference, one image in process, and the Ray Data job
over a mixed collection (bad files, a tiled BigTIFF of several tiles, a rerun that skips, a real S3 endpoint)."""

from __future__ import annotations

import csv
import dataclasses
import io as bytes_io
import json
import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from unet_ray import io
from unet_ray.core.config import Config, InstanceConfig, SegmentConfig
from unet_ray.core.model import UNetVGG16BN
from unet_ray.core.tiling import plan_for_scheme, plan_whole_image
from unet_ray.inference import (
    TILED_MASK_AGREEMENT,
    TILED_MAX_PROBABILITY_DIFFERENCE,
    make_batch_predictor,
    predict_probabilities,
)
from unet_ray.io.checkpoint import load_model, save_checkpoint
from unet_ray.io.synth import generate_sample
from unet_ray.io.writers import MANIFEST_COLUMNS, image_stem, output_names, write_manifest
from unet_ray.pipelines.segment import (
    FinishImages,
    SegmentActor,
    drop_own_outputs,
    list_inputs,
    run_segmentation,
    segment_image_file,
    triage_inputs,
)

MODEL_SEED = 0
STYLE_CYCLE = ("fluorescence", "he", "brightfield", "he")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A random-weight checkpoint folder in the agreed format."""
    torch.manual_seed(MODEL_SEED)
    folder = str(tmp_path_factory.mktemp("checkpoint") / "random")
    save_checkpoint(folder, UNetVGG16BN(), Config().to_dict(), {})
    return folder


def synthetic_image(height: int, width: int, style: str = "fluorescence", seed: int = 0):
    return generate_sample(np.random.default_rng(seed), height, width, style)[0]


def write_png(path: Path, array: np.ndarray) -> None:
    path.write_bytes(io.encode_png(array))


def read_manifest(uri: str) -> dict[str, dict[str, str]]:
    rows = list(csv.DictReader(bytes_io.StringIO(io.read_bytes(uri).decode())))
    assert rows and list(rows[0]) == list(MANIFEST_COLUMNS)
    return {Path(row["input"]).name: row for row in rows}


def write_good_images(folder: Path) -> list[str]:
    """Good inputs of several formats, modes and sizes, including a 1x1 image."""
    folder.mkdir(parents=True, exist_ok=True)
    write_png(folder / "rgb.png", synthetic_image(150, 170, "fluorescence", 1))
    Image.fromarray(synthetic_image(120, 90, "he", 2)).save(folder / "photo.jpg", quality=90)
    gray16 = synthetic_image(100, 130, "brightfield", 3)[:, :, 0].astype(np.uint16) * 257
    tifffile.imwrite(folder / "gray16.tif", gray16)
    rgba = np.dstack([synthetic_image(64, 80, "he", 4), np.full((64, 80), 255, np.uint8)])
    write_png(folder / "rgba.png", rgba)
    write_png(folder / "gray.png", synthetic_image(70, 50, "fluorescence", 5)[:, :, 0])
    write_png(folder / "tiny.png", np.array([[[200, 10, 10]]], dtype=np.uint8))
    return ["rgb.png", "photo.jpg", "gray16.tif", "rgba.png", "gray.png", "tiny.png"]


def write_bad_images(folder: Path) -> dict[str, str]:
    """Bad inputs with an image suffix, and a word their error message must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    good_png = io.encode_png(synthetic_image(80, 80))
    (folder / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("these are my notes, not an image\n")
    six_channels = np.zeros((32, 32, 6), dtype=np.uint8)
    tifffile.imwrite(
        folder / "six_channels.tif", six_channels, photometric="minisblack", planarconfig="contig"
    )
    return {
        "truncated.png": "truncated",
        "empty.png": "zero-byte",
        "notes.png": "not an image",
        "six_channels.tif": "unsupported",
    }


# ----------------------------------------------------------------------------- without Ray


def test_image_stem_drops_only_the_last_suffix():
    assert image_stem("s3://bucket/slides/case.01.tif") == "case.01"
    assert image_stem("/data/a b.PNG") == "a b"


def mosaic_960() -> np.ndarray:
    """960 x 960: the default plan's 2 x 2 windows then keep exactly 32 px of context at seams."""
    patches = [synthetic_image(480, 480, style, seed) for seed, style in enumerate(STYLE_CYCLE)]
    return np.concatenate(
        [np.concatenate(patches[:2], axis=1), np.concatenate(patches[2:], axis=1)], axis=0
    )


def test_tiled_default_matches_whole_image_inference(checkpoint):
    """The default scheme against one whole-image pass of the same random-weight model."""
    model, _ = load_model(checkpoint)
    predict_batch = make_batch_predictor(model, "cpu")
    segment = SegmentConfig()
    image = mosaic_960()
    plan = plan_for_scheme(*image.shape[:2], "default", segment.tile, segment.overlap)
    seams = {spec.rows.window_stop - spec.rows.core_stop for spec in plan.tiles[:1]}
    assert len(plan.tiles) == 4 and seams == {segment.overlap}  # the tightest context
    tiled = predict_probabilities(image, plan, predict_batch, segment.batch_size)
    whole = predict_probabilities(image, plan_whole_image(*image.shape[:2]), predict_batch, 1)
    difference = float(np.abs(tiled - whole).max())
    agreement = float(np.mean((tiled > 0.5) == (whole > 0.5)))
    assert difference <= TILED_MAX_PROBABILITY_DIFFERENCE
    assert agreement >= TILED_MASK_AGREEMENT
    assert 0.05 < float(np.mean(whole > 0.5)) < 0.95  # the comparison is not trivial


def test_both_stages_in_process_write_outputs_and_error_rows(checkpoint, tmp_path):
    write_good_images(tmp_path / "in")
    write_bad_images(tmp_path / "in")
    output = str(tmp_path / "out")
    actor = SegmentActor(checkpoint, dataclasses.asdict(SegmentConfig()))
    uris = np.array([str(tmp_path / "in" / "rgb.png"), str(tmp_path / "in" / "notes.png")])
    inferred = actor(batch={"input": uris})
    assert [maps.shape for maps in inferred["probabilities"]] == [(1, 150, 170), (0, 0, 0)]
    assert inferred["probabilities"][0].dtype == np.float16
    assert not os.path.exists(output)  # stage 1 writes nothing
    finish = FinishImages(output, dataclasses.asdict(InstanceConfig()))
    result = finish(batch=inferred)
    assert list(result["status"]) == ["ok", "error"]
    assert "not an image" in result["message"][1] and "notes.png" in result["message"][1]
    written = sorted(os.listdir(output))
    assert written == sorted(output_names("rgb").values())
    labels = tifffile.imread(os.path.join(output, "rgb.labels.tif"))
    assert labels.dtype == np.uint32 and labels.shape == (150, 170)
    assert labels.max() == result["nuclei"][0]
    features = json.loads(Path(output, "rgb.geojson").read_text())["features"]
    assert len(features) == labels.max()


def test_triage_skips_complete_outputs_and_refuses_name_clashes(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    for name in output_names("done").values():
        (output / name).write_bytes(b"x")
    for name in list(output_names("half").values())[:3]:  # as if killed midway
        (output / name).write_bytes(b"x")
    inputs = ["/in/done.png", "/in/half.png", "/in/half.tif", "/in/new.jpg"]
    to_run, rows = triage_inputs(inputs, str(output), overwrite=False)
    assert to_run == ["/in/half.png", "/in/new.jpg"]
    by_input = {row["input"]: row for row in rows}
    assert by_input["/in/done.png"]["status"] == "skipped"
    assert by_input["/in/half.tif"]["status"] == "error"
    assert "/in/half.png" in by_input["/in/half.tif"]["message"]
    to_run, _ = triage_inputs(inputs, str(output), overwrite=True)
    assert to_run == ["/in/done.png", "/in/half.png", "/in/new.jpg"]


def test_outputs_written_into_the_input_folder_are_not_taken_as_inputs(tmp_path):
    inputs = [str(tmp_path / name) for name in ("a.png", "a.mask.png", "a.overlay.png")]
    assert drop_own_outputs(inputs, str(tmp_path), str(tmp_path) + "/") == inputs[:1]
    assert drop_own_outputs(inputs, str(tmp_path), str(tmp_path / "out")) == inputs


def test_manifest_is_sorted_by_input(tmp_path):
    rows = [
        {"input": "b", "status": "ok", "message": "", "nuclei": 3, "seconds": 1.0},
        {"input": "a", "status": "error", "message": "bad", "nuclei": "", "seconds": 0.1},
    ]
    write_manifest(rows, str(tmp_path / "manifest.csv"))
    lines = (tmp_path / "manifest.csv").read_text().splitlines()
    assert lines == ["input,status,message,nuclei,seconds", "a,error,bad,,0.1", "b,ok,,3,1.0"]


def test_list_inputs_takes_a_folder_or_one_file_and_refuses_an_empty_folder(tmp_path):
    write_good_images(tmp_path)
    (tmp_path / "readme.txt").write_text("ignored")
    assert [Path(uri).name for uri in list_inputs(str(tmp_path))] == sorted(
        ["gray.png", "gray16.tif", "photo.jpg", "rgb.png", "rgba.png", "tiny.png"]
    )
    assert list_inputs(str(tmp_path / "rgb.png")) == [str(tmp_path / "rgb.png")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        list_inputs(str(tmp_path / "empty"))


def test_a_dsb2018_layout_gives_its_samples_images_not_their_masks(tmp_path):
    """A test set segments as it was downloaded: ``<id>/images/<id>.png`` under the folder (also
    below a stage folder); the masks beside them are not inputs, nor a stray PNG elsewhere."""
    from unet_ray.io.synth import write_synthetic_dataset

    ids = write_synthetic_dataset(str(tmp_path / "stage1_test"), count=3, max_side=64)
    (tmp_path / "stage1_test" / ids[0] / "notes").mkdir()
    write_good_images(tmp_path / "stage1_test" / ids[0] / "notes")  # not a sample's image
    for root in (tmp_path / "stage1_test", tmp_path):
        found = list_inputs(str(root))
        assert sorted(Path(uri).stem for uri in found) == sorted(ids)
        assert all(Path(uri).parent.name == "images" for uri in found)
    # an image at the top: a plain folder again (not recursive)
    (tmp_path / "stage1_test" / "top.png").write_bytes(Path(found[0]).read_bytes())
    assert [Path(uri).name for uri in list_inputs(str(tmp_path / "stage1_test"))] == ["top.png"]


NUCLEUS_RAW, BACKGROUND_RAW, HOT_PIXEL_RAW = 30000, 1000, 65535
DISC_CENTRES = ((20, 20), (42, 46))
DISC_RADIUS = 8


def nuclei_16_bit() -> np.ndarray:
    """64 x 64 uint16: two discs of raw value 30000 on 1000, and one hot pixel."""
    rows, columns = np.indices((64, 64))
    image = np.full((64, 64), BACKGROUND_RAW, dtype=np.uint16)
    for row, column in DISC_CENTRES:
        image[(rows - row) ** 2 + (columns - column) ** 2 <= DISC_RADIUS**2] = NUCLEUS_RAW
    image[60, 3] = HOT_PIXEL_RAW
    return image


def bright_is_nucleus(windows: np.ndarray) -> np.ndarray:
    """A stand-in predictor (N x 1 x h x w logits): +10 where the 8-bit rendering is bright."""
    return np.where(windows[..., 0] > 127, 10.0, -10.0).astype(np.float32)[:, None]


def write_16_bit_inputs(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / "cells16.tif", nuclei_16_bit())
    (folder / "cells16.png").write_bytes(io.encode_png(nuclei_16_bit()))
    return [folder / "cells16.tif", folder / "cells16.png"]


def test_segment_image_file_reports_16_bit_intensities_in_raw_units(tmp_path):
    """Percentile normalisation lets the hot pixel not dim the nuclei; the table reports them
    in the file's own 16-bit units."""
    for path in write_16_bit_inputs(tmp_path / "in"):
        output = tmp_path / "out" / path.suffix[1:]
        nuclei = segment_image_file(
            str(path), str(output), bright_is_nucleus, SegmentConfig(tile=64, overlap=16),
            InstanceConfig(),
        )  # fmt: skip
        assert nuclei == len(DISC_CENTRES)
        csv_text = (output / "cells16.nuclei.csv").read_text()
        rows = list(csv.DictReader(bytes_io.StringIO(csv_text)))
        assert [float(row["mean_intensity"]) for row in rows] == [NUCLEUS_RAW] * 2
        assert [row["intensity_dtype"] for row in rows] == ["uint16"] * 2
        overlay = np.asarray(Image.open(output / "cells16.overlay.png"))
        assert overlay[0, 0].tolist() == [0, 0, 0]  # background rendered black, not grey
        assert overlay[DISC_CENTRES[0]].tolist() == [255, 255, 255]  # nucleus at full contrast


def test_segment_image_file_reports_8_bit_intensities_as_before(tmp_path):
    gray8 = np.where(nuclei_16_bit() == NUCLEUS_RAW, 180, 20).astype(np.uint8)
    write_png(tmp_path / "cells8.png", gray8)
    segment_image_file(
        str(tmp_path / "cells8.png"), str(tmp_path / "out"), bright_is_nucleus,
        SegmentConfig(tile=64, overlap=16), InstanceConfig(),
    )  # fmt: skip
    rows = list(csv.DictReader((tmp_path / "out" / "cells8.nuclei.csv").open()))
    assert [(float(row["mean_red"]), row["intensity_dtype"]) for row in rows] == [
        (180.0, "uint8")
    ] * 2


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_every_output_gets_the_umask_permissions(tmp_path, umask, mode):
    (path,) = write_16_bit_inputs(tmp_path / "in")[:1]
    output = tmp_path / "out"
    saved = os.umask(umask)
    try:
        segment_image_file(
            str(path), str(output), bright_is_nucleus, SegmentConfig(tile=64, overlap=16),
            InstanceConfig(),
        )  # fmt: skip
        write_manifest([manifest_row_ok(str(path))], str(output / "manifest.csv"))
    finally:
        os.umask(saved)
    expected = [*output_names("cells16").values(), "manifest.csv"]
    assert sorted(os.listdir(output)) == sorted(expected)
    modes = {name: stat.S_IMODE((output / name).stat().st_mode) for name in expected}
    assert modes == dict.fromkeys(expected, mode)


def manifest_row_ok(uri: str) -> dict:
    return {"input": uri, "status": "ok", "message": "", "nuclei": 2, "seconds": 0.1}


def test_unwritable_output_is_refused_before_any_work(checkpoint, tmp_path, capsys):
    """OUTPUT under a regular file cannot be created (even by root): exit 2, location named,
    before Ray starts (this test has no Ray) or any image is read."""
    from unet_ray.cli import main

    write_good_images(tmp_path / "in")
    (tmp_path / "taken").write_text("a file where the output folder should go")
    output = str(tmp_path / "taken" / "segmented")
    assert main(["segment", checkpoint, str(tmp_path / "in"), output]) == 2
    message = capsys.readouterr().err
    assert output in message and "is a file, not a folder" in message
    with pytest.raises(ValueError, match="taken is a file"):
        run_segmentation(
            checkpoint, str(tmp_path / "in"), output, SegmentConfig(), InstanceConfig()
        )


def test_run_segmentation_refuses_bad_geometry_and_bad_checkpoints(tmp_path):
    write_good_images(tmp_path / "in")
    with pytest.raises(ValueError, match="at most"):
        run_segmentation(
            "unused", str(tmp_path / "in"), str(tmp_path / "out"),
            SegmentConfig(tile=256, overlap=200), InstanceConfig(),
        )  # fmt: skip
    with pytest.raises(FileNotFoundError, match="not a unet_ray checkpoint"):
        run_segmentation(
            str(tmp_path / "nothing"), str(tmp_path / "in"), str(tmp_path / "out"),
            SegmentConfig(), InstanceConfig(),
        )  # fmt: skip
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text(json.dumps({"config": Config().to_dict(), "metrics": {}}))
    (corrupt / "model.pt").write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="model.pt is not a readable"):
        run_segmentation(
            str(corrupt), str(tmp_path / "in"), str(tmp_path / "out"),
            SegmentConfig(), InstanceConfig(),
        )  # fmt: skip
    assert not (tmp_path / "out").exists()  # nothing written before the checks


# ----------------------------------------------------------------------------- with Ray


def write_big_slide(path: Path) -> tuple[int, int]:
    """A 1000 x 1500 RGB image (1.5 megapixels: several 512-px inference tiles each way, sides
    that are no multiple of the tile) as a tiled BigTIFF; its shape."""
    patch = synthetic_image(500, 500, "he", 21)
    tifffile.imwrite(path, np.tile(patch, (2, 3, 1)), bigtiff=True, tile=(256, 256))
    return 1000, 1500


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_mixed_collection_then_rerun_skips_finished_images(ray_local, checkpoint, tmp_path):
    """Good images of several formats and sizes (1x1 up to a 1.5-megapixel tiled BigTIFF) beside
    bad files, on 2 actors: outputs for the good, error rows for the bad; a rerun skips the done."""
    inputs, output = tmp_path / "in", tmp_path / "out"
    good = [*write_good_images(inputs), "slide.tif"]
    slide_shape = write_big_slide(inputs / "slide.tif")
    bad = write_bad_images(inputs)
    segment = SegmentConfig(workers=2)
    started = time.perf_counter()
    summary = run_segmentation(checkpoint, str(inputs), str(output), segment, InstanceConfig())
    print(
        f"collection with a 1.5-megapixel BigTIFF segmented in {time.perf_counter() - started:.0f} s"
    )
    assert (summary.ok, summary.error, summary.skipped) == (len(good), len(bad), 0)
    assert summary.exit_code == 1
    manifest = read_manifest(summary.manifest)
    for name, word in bad.items():
        assert manifest[name]["status"] == "error"
        assert word in manifest[name]["message"] and name in manifest[name]["message"]
        assert not any((output / out).exists() for out in output_names(Path(name).stem).values())
    for name in good:
        assert manifest[name]["status"] == "ok"
        assert all((output / out).exists() for out in output_names(Path(name).stem).values())
    labels = tifffile.imread(output / "tiny.labels.tif")
    assert labels.dtype == np.uint32
    assert labels.shape == (1, 1), "a 1x1 RGB image must keep its shape through io.decode_image"
    assert tifffile.imread(output / "gray16.labels.tif").shape == (100, 130)
    slide_labels = tifffile.imread(output / "slide.labels.tif")
    assert slide_labels.shape == slide_shape and slide_labels.dtype == np.uint32
    nuclei = list(csv.DictReader(bytes_io.StringIO((output / "slide.nuclei.csv").read_text())))
    assert (
        len(nuclei)
        == slide_labels.max()
        == int(read_manifest(summary.manifest)["slide.tif"]["nuclei"])
    )

    first_mtime = (output / "rgb.mask.png").stat().st_mtime_ns
    (output / "photo.overlay.png").unlink()  # as if the job was killed before the last output
    rerun = run_segmentation(checkpoint, str(inputs), str(output), segment, InstanceConfig())
    assert (rerun.ok, rerun.error, rerun.skipped) == (1, len(bad), len(good) - 1)
    manifest = read_manifest(rerun.manifest)
    assert manifest["photo.jpg"]["status"] == "ok"
    assert manifest["rgb.png"]["status"] == "skipped"
    assert manifest["rgb.png"]["nuclei"] != ""  # carried over from the first manifest
    assert (output / "photo.overlay.png").exists()
    assert (output / "rgb.mask.png").stat().st_mtime_ns == first_mtime  # not rewritten
    assert not [name for name in os.listdir(output) if name.endswith(".tmp")]


@pytest.mark.ray
def test_input_from_and_output_to_s3(ray_local, checkpoint, s3_bucket, tmp_path):
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    local = tmp_path / "in"
    write_good_images(local)
    write_bad_images(local)
    for name in ("rgb.png", "gray16.tif", "empty.png"):
        client.put_object(Bucket=s3_bucket, Key=f"slides/{name}", Body=(local / name).read_bytes())
    output = f"s3://{s3_bucket}/segmented"
    summary = run_segmentation(
        checkpoint, f"s3://{s3_bucket}/slides", output, SegmentConfig(), InstanceConfig()
    )
    assert (summary.ok, summary.error, summary.exit_code) == (2, 1, 1)
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="segmented/")["Contents"]
    keys = {entry["Key"].split("/", 1)[1] for entry in listed}
    expected = {*output_names("rgb").values(), *output_names("gray16").values(), "manifest.csv"}
    assert keys == expected
    labels_body = client.get_object(Bucket=s3_bucket, Key="segmented/rgb.labels.tif")["Body"]
    assert tifffile.imread(bytes_io.BytesIO(labels_body.read())).shape == (150, 170)
    manifest = read_manifest(summary.manifest)
    assert manifest["empty.png"]["status"] == "error"
    assert manifest["rgb.png"]["input"] == f"s3://{s3_bucket}/slides/rgb.png"

    rerun = run_segmentation(
        checkpoint, f"s3://{s3_bucket}/slides", output, SegmentConfig(), InstanceConfig()
    )
    assert (rerun.ok, rerun.skipped, rerun.error) == (0, 2, 1)


@pytest.mark.ray
def test_cli_segment_exit_codes(ray_local, checkpoint, tmp_path, monkeypatch):
    """Also paths as users type them: INPUT and OUTPUT relative to the working directory (the
    segmentation actors run in Ray's own working directory)."""
    from unet_ray.cli import main

    write_good_images(tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    arguments = ["segment", checkpoint, "in", "out"]
    assert main([*arguments, "--tile", "256", "--overlap", "16", "--batch-size", "2"]) == 0
    assert read_manifest(str(tmp_path / "out" / "manifest.csv"))["rgb.png"]["status"] == "ok"
    assert (tmp_path / "out" / "rgb.labels.tif").is_file()
    assert main([*arguments, "--tile", "500"]) == 2  # bad usage, nothing run


@pytest.mark.ray
def test_job_entry_point_smoke_test(ray_local):
    """`python jobs/segment.py --smoke-test`, run in this process on the session's Ray."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "jobs" / "segment.py"
    spec = importlib.util.spec_from_file_location("jobs_segment", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(["--smoke-test"]) == 0
