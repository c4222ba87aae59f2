"""Whole-slide images: window reading (local, S3), --mpp, tissue mask, region geometry, and the
Ray job through `run_segmentation` on small synthetic pyramidal slides (region 256): seams against
whole-image segmentation, pyramidal OME-TIFF / GeoJSON / Parquet / overlay outputs, inference and
post-processing in separate processes at once, a corrupt region and a region whose part cannot be
written recorded and then resumed."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely.geometry
import tifffile
import torch
from PIL import Image

from unet_ray import io
from unet_ray.cli import slide_config_from_args
from unet_ray.core.config import (
    DEFAULT_HALO,
    Config,
    InstanceConfig,
    SegmentConfig,
    SlideConfig,
    check_slide_config,
)
from unet_ray.core.model import UNetVGG16BN
from unet_ray.core.regions import Box, plan_regions, tissue_mask
from unet_ray.inference import image_probabilities, labels_from_maps, make_batch_predictor
from unet_ray.io import slide_reader
from unet_ray.io.checkpoint import save_checkpoint
from unet_ray.io.slide_reader import (
    SlideReader,
    best_level,
    is_slide,
    read_frame_window,
    slide_intensity_range,
)
from unet_ray.io.slide_synth import (
    Patch,
    tissue_patches,
    write_leica_scn,
    write_synthetic_slide,
)
from unet_ray.io.slide_writers import part_uri
from unet_ray.io.synth import generate_sample
from unet_ray.io.writers import feature_id
from unet_ray.pipelines import slides
from unet_ray.pipelines.segment import run_segmentation
from unet_ray.pipelines.slide_regions import (
    REGION_ATTEMPTS,
    RESULT_COLUMNS,
    STAMP_KEYS,
    FinishRegions,
    InferRegions,
    SlidePlan,
    empty_region_row,
)

REGION, HALO = 256, 128  # four regions on the 512 x 512 seam slide; the default halo
SLIDE_CONFIG = SlideConfig(region=REGION, halo=HALO)
SEGMENT = SegmentConfig(workers=2, batch_size=4)
TRAIN_STEPS = 8  # SGD steps on synthetic H&E: enough for steep, nucleus-shaped probabilities
MATCH_IOU = 0.95
AREA_AGREEMENT = 0.02  # GeoJSON polygon areas vs the table's area_px


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """The real U-Net, briefly trained on synthetic H&E so that its maps are nucleus-like.

    A random-weight model's probabilities are flat (std 0.03): differences of 0.002 between two
    tilings (its own, measured) already reshape 10 % of its blobs, which tests the model, not the
    seams."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = UNetVGG16BN()
    samples = [generate_sample(rng, 128, 128, "he") for _ in range(8)]
    images = torch.tensor(np.stack([sample[0] for sample in samples])).permute(0, 3, 1, 2)
    images = images.float() / 255
    masks = torch.tensor(np.stack([sample[1] > 0 for sample in samples])).float()[:, None]
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(TRAIN_STEPS):
        batch = torch.arange(4) + 4 * (step % 2)
        logits = model(images[batch])[:, :1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    folder = str(tmp_path_factory.mktemp("slide_checkpoint") / "trained")
    save_checkpoint(folder, model.eval(), Config().to_dict(), {})
    return folder


def seam_patch() -> Patch:
    return tissue_patches([(0, 0, 2 * REGION, 2 * REGION)], seed=2)[0]


@pytest.fixture(scope="module")
def slide_folder(tmp_path_factory) -> Path:
    """A seam slide (all tissue, 512^2) and the same pixels as a 16-bit TIFF. (The failure test
    mixes a slide with an image.)"""
    folder = tmp_path_factory.mktemp("slides")
    write_synthetic_slide(str(folder / "seams.ome.tif"), 512, 512, [seam_patch()], mpp=0.5)
    write_16_bit_slide(folder / "scan16.tif")
    return folder


def write_sparse_slide(path: Path, height: int = 1024, corrupt_tile: int | None = None) -> None:
    """Background with tissue at rows 40-200, columns 60-440 (regions (0, 0) and (0, 1))."""
    patches = tissue_patches([(40, 60, 160, 380)], seed=4)
    write_synthetic_slide(str(path), height, 1536, patches, mpp=0.5)
    if corrupt_tile is not None:
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages[0]
            offset, count = page.dataoffsets[corrupt_tile], page.databytecounts[corrupt_tile]
        with open(path, "r+b") as stream:  # a damaged tile inside the tissue: zlib fails there
            stream.seek(offset)
            stream.write(b"\x00" * count)


@pytest.fixture(scope="module")
def job(ray_local, checkpoint, slide_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp("slides_out")
    summary = run_segmentation(
        checkpoint, str(slide_folder), str(output), SEGMENT, InstanceConfig(), slide=SLIDE_CONFIG
    )
    return summary, output


def read_manifest(folder: Path) -> dict[str, dict[str, str]]:
    with open(folder / "manifest.csv") as stream:
        return {Path(row["input"]).name: row for row in csv.DictReader(stream)}


def summary_of(folder: Path, stem: str) -> dict:
    return json.loads((folder / f"{stem}.slide.json").read_text())


def match_nuclei(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each reference nucleus: the candidate label overlapping it most, and their IoU."""
    pairs = reference.astype(np.int64) * (int(candidate.max()) + 1) + candidate
    overlap = np.bincount(pairs.ravel(), minlength=(reference.max() + 1) * (candidate.max() + 1))
    overlap = overlap.reshape(reference.max() + 1, candidate.max() + 1)[1:, 1:]
    reference_area = np.bincount(reference.ravel())[1:]
    candidate_area = np.bincount(candidate.ravel(), minlength=candidate.max() + 1)[1:]
    best = overlap.argmax(axis=1)
    shared = overlap[np.arange(len(best)), best]
    return best + 1, shared / (reference_area + candidate_area[best] - shared)


def straddling_labels(labels: np.ndarray, seam: int) -> list[int]:
    """Labels on both sides of the row or the column seam at ``seam``."""
    rows = set(np.unique(labels[seam - 1])) & set(np.unique(labels[seam]))
    columns = set(np.unique(labels[:, seam - 1])) & set(np.unique(labels[:, seam]))
    return sorted(int(label) for label in rows | columns if label)


# ----------------------------------------------------------------------------- without Ray


def test_regions_partition_the_frame_and_clip_their_windows():
    regions = plan_regions(600, 1000, 256, 64, 32)
    assert len(regions) == 3 * 4
    covered = np.zeros((600, 1000), dtype=int)
    for region in regions:
        covered[region.core.top : region.core.bottom, region.core.left : region.core.right] += 1
        assert region.window == region.core.grow(64, 600, 1000)
        assert region.spill.top >= region.window.top and region.spill.bottom <= region.window.bottom
    assert (covered == 1).all()
    last = regions[-1]
    assert last.core == Box(512, 600, 768, 1000)
    assert last.window == Box(448, 600, 704, 1000)


def test_segment_command_takes_the_slide_flags():
    from unet_ray.cli import build_parser

    args = build_parser().parse_args(
        ["segment", "ckpt", "in", "out", "--mpp", "0.5", "--region", "2048", "--no-tissue-mask"]
    )
    assert slide_config_from_args(args) == SlideConfig(
        region=2048, halo=DEFAULT_HALO, mpp=0.5, tissue_mask=False
    )
    defaults = slide_config_from_args(build_parser().parse_args(["segment", "c", "i", "o"]))
    assert defaults == SlideConfig()


def test_bad_slide_flags_name_the_fix():
    with pytest.raises(ValueError, match="multiple of 256; try 512"):
        check_slide_config(SlideConfig(region=500), SegmentConfig())
    with pytest.raises(ValueError, match="must exceed the tile overlap"):
        check_slide_config(SlideConfig(halo=32), SegmentConfig(overlap=32))


def test_windows_read_the_slide_pixels_at_each_resolution(tmp_path):
    patch = seam_patch()
    path = str(tmp_path / "slide.ome.tif")
    levels = write_synthetic_slide(path, 512, 512, [patch], mpp=0.25)
    reader = SlideReader(path)
    assert reader.mpp == pytest.approx(0.25) and len(reader.level_dimensions) == levels == 1
    box = Box(100, 260, 300, 512)
    assert np.array_equal(read_frame_window(reader, box, 1.0), patch.pixels[100:260, 300:])
    # --mpp 0.5 on a 0.25-um slide: a frame of half the size, pixels averaged 2 x 2
    half = read_frame_window(reader, Box(0, 256, 0, 256), 2.0)
    expected = patch.pixels.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
    assert half.shape == (256, 256, 3)
    assert np.abs(half.astype(float) - expected).mean() < 1.0


def test_pyramid_level_is_read_when_coarser_mpp_is_asked(tmp_path):
    patches = tissue_patches([(0, 0, 1024, 1024)], seed=5)
    path = str(tmp_path / "pyramid.tif")
    assert write_synthetic_slide(path, 1024, 1024, patches, mpp=0.25) == 2
    reader = SlideReader(path)
    assert best_level(reader.level_downsamples, 2.0) == 1
    assert best_level(reader.level_downsamples, 1.5) == 0
    window = read_frame_window(reader, Box(10, 100, 20, 90), 2.0)
    level_one = reader.read(1, 0, 0, 512, 512)
    assert np.array_equal(window, level_one[10:100, 20:90])


def test_aperio_svs_is_a_slide_with_its_resolution(tmp_path):
    """An SVS (Aperio's TIFF layout: ImageDescription with ``|MPP = ...``) as tifffile writes
    one; read through tiffslide's Aperio support, always the slide path."""
    pixels = seam_patch().pixels
    path = tmp_path / "case.svs"
    description = "Aperio Image Library v12.0.15\n512x512 (256x256) RGB|AppMag = 20|MPP = 0.4990"
    tifffile.imwrite(
        path,
        pixels,
        tile=(256, 256),
        photometric="rgb",
        compression="zlib",
        description=description,
    )
    assert is_slide(str(path), region=4096)  # the suffix decides, whatever the size
    reader = SlideReader(str(path))
    assert reader.mpp == pytest.approx(0.499)
    box = Box(10, 110, 300, 500)
    assert np.array_equal(read_frame_window(reader, box, 1.0), pixels[10:110, 300:500])


def test_mpp_without_a_slide_resolution_is_a_clear_error(tmp_path):
    path = str(tmp_path / "no_mpp.tif")
    write_synthetic_slide(path, 512, 512, [seam_patch()], mpp=None)
    with pytest.raises(slides.SlideError, match=r"no_mpp.tif: --mpp 0.5 asked.*leave --mpp out"):
        slides.plan_slide(path, str(tmp_path / "out"), SlideConfig(mpp=0.5), SEGMENT)


def test_slide_window_from_s3_equals_local(tmp_path, s3_bucket):
    import boto3

    path = tmp_path / "remote.ome.tif"
    patch = seam_patch()
    write_synthetic_slide(str(path), 512, 512, [patch], mpp=0.5)
    boto3.client("s3").upload_file(str(path), s3_bucket, "slides/remote.ome.tif")
    uri = f"s3://{s3_bucket}/slides/remote.ome.tif"
    assert is_slide(uri, 256) and not is_slide(uri, 512)
    reader = SlideReader(uri)
    window = read_frame_window(reader, Box(200, 300, 0, 128), 1.0)
    reader.close()
    assert np.array_equal(window, patch.pixels[200:300, :128])


def test_dispatch_sends_only_large_tiffs_and_slide_formats_to_the_slide_path(tmp_path):
    large = str(tmp_path / "large.tif")
    write_synthetic_slide(large, 300, 700, tissue_patches([(0, 0, 300, 700)]), mpp=None)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((200, 200, 3), np.uint8))
    png = tmp_path / "big.png"
    Image.fromarray(np.zeros((600, 600, 3), np.uint8)).save(png)
    inputs = [large, str(plain), str(png), str(tmp_path / "case.svs"), "x.labels.ome.tif"]
    found, images = slides.partition_inputs(inputs, SlideConfig(region=512), SEGMENT)
    assert found == [large, str(tmp_path / "case.svs")]
    assert images == [str(plain), str(png)]


def write_16_bit_slide(path: Path) -> np.ndarray:
    """The seam slide's pixels as a 16-bit RGB tiled TIFF (512^2, larger than a region) on a
    raised floor, with a few hot pixels; returns the pixels written."""
    pixels = seam_patch().pixels.astype(np.uint16) * 200 + 3000
    pixels[::97, ::89] = 65535  # hot pixels: percentiles, not min-max, set the range
    tifffile.imwrite(path, pixels, tile=(256, 256), photometric="rgb", compression="zlib")
    return pixels


def test_a_16_bit_slide_is_scaled_once_per_slide_like_a_whole_image(tmp_path, monkeypatch):
    """A 16-bit TIFF larger than a region goes the slide path; its windows are scaled to 8 bits
    with one range for the whole slide, the whole-image path's percentiles: pixel for pixel what
    reading the whole file as an image gives."""
    path = tmp_path / "scan16.tif"
    write_16_bit_slide(path)
    assert is_slide(str(path), region=REGION)
    reader = SlideReader(str(path))
    with pytest.raises(io.ImageReadError, match="scan16.tif: uint16 pixels and no intensity"):
        reader.read(0, 0, 0, 8, 8)
    reader.intensity = slide_intensity_range(reader)
    whole = io.read_image(str(path))  # the whole-image path: uint8 by its own percentiles
    box = Box(100, 400, 37, 300)
    window = read_frame_window(reader, box, 1.0)
    assert window.dtype == np.uint8 and np.array_equal(window, whole[100:400, 37:300])
    reader.close()
    plan = slides.plan_slide(str(path), str(tmp_path / "out"), SLIDE_CONFIG, SEGMENT)
    assert plan.intensity == list(reader.intensity)  # travels to every region's actor
    with tifffile.TiffFile(path) as tiff:  # damage the last tile: the other blocks give the range
        offset, count = tiff.pages[0].dataoffsets[-1], tiff.pages[0].databytecounts[-1]
    with open(path, "r+b") as stream:
        stream.seek(offset)
        stream.write(b"\x00" * count)
    monkeypatch.setattr(slide_reader, "INTENSITY_BLOCK", 256)  # four blocks on this small slide
    damaged = SlideReader(str(path))
    low, high = slide_intensity_range(damaged)
    damaged.close()
    assert 3000 <= low < high < 65535 and (low, high) != tuple(plan.intensity)
    eight_bit = tmp_path / "scan8.tif"
    write_synthetic_slide(str(eight_bit), 512, 512, [seam_patch()], mpp=None)
    assert (
        slides.plan_slide(str(eight_bit), str(tmp_path / "o"), SLIDE_CONFIG, SEGMENT).intensity
        is None
    )


@pytest.mark.ray
def test_a_16_bit_slide_is_segmented(job):
    summary, output = job
    row = read_manifest(output)["scan16.tif"]
    assert row["status"] == "ok", row["message"]
    assert int(row["nuclei"]) > 50  # the seam slide's tissue: about 290 nuclei in 8 bits
    with tifffile.TiffFile(output / "scan16.labels.ome.tif") as tiff:
        assert tiff.series[0].levels[0].shape == (512, 512)


def test_tissue_mask_keeps_only_regions_with_tissue(tmp_path):
    path = tmp_path / "sparse.tif"
    write_sparse_slide(path)
    plan = slides.plan_slide(str(path), str(tmp_path / "out"), SLIDE_CONFIG, SEGMENT)
    assert plan.to_segment == ["r0000_c0000", "r0000_c0001"]
    assert len(plan.skipped) == 22
    everything = SlideConfig(region=REGION, halo=HALO, tissue_mask=False)
    plan = slides.plan_slide(str(path), str(tmp_path / "out"), everything, SEGMENT)
    assert len(plan.to_segment) == 24 and not plan.skipped
    gray = np.full((64, 64, 3), 200, np.uint8)
    gray[20:40, 20:40] = 90
    assert tissue_mask(gray) is None  # no colour contrast: nothing is skipped


def test_post_beside_inference_counts_only_the_same_actors_other_regions():
    def row(actor: str, infer: tuple[float, float], post: tuple[float, float]) -> dict:
        stamps = dict(zip(STAMP_KEYS, (*infer, *post), strict=True))
        return {**empty_region_row("s", "r"), **stamps, "actor": actor}

    first = row("a", (0, 10), (10, 14))
    second = row("a", (12, 20), (20, 21))
    third = row("a", (11, 13), (14, 15))
    other = row("b", (0, 30), (30, 31))  # b's inference never counts for a's regions
    rows = [first, second, third, other]
    # first's post 10-14 beside a's inference of third (11-13) and second (12-20): 11-14
    assert slides.post_beside_inference([first], rows) == pytest.approx(3)
    assert slides.post_beside_inference([second, other], rows) == 0  # a and b idle meanwhile
    assert slides.post_beside_inference([third], rows) == pytest.approx(1)  # second's 14-15
    assert slides.union_length([(0, 2), (1, 3), (5, 6)]) == pytest.approx(4)


def test_both_stages_in_process_pass_errors_on_and_retry_writing_on_the_same_maps(
    checkpoint, slide_folder, tmp_path, caplog
):
    """Stage 1 infers and writes nothing; stage 2 passes a stage-1 error row on untouched, and
    retries a part it cannot write on the maps it was given, then records the region failed."""
    plan = slides.plan_slide(
        str(slide_folder / "seams.ome.tif"), str(tmp_path / "out"), SLIDE_CONFIG, SEGMENT
    )
    tasks = [row["task"] for row in slides.region_tasks([plan])][:2]
    missing = json.loads(tasks[0])
    missing["plan"]["uri"] = str(tmp_path / "gone.ome.tif")  # stage 1 cannot open it
    inference = InferRegions(
        checkpoint, dataclasses.asdict(SEGMENT), threads=torch.get_num_threads()
    )
    inferred = inference({"task": np.array([*tasks, json.dumps(missing)])})
    assert list(inferred["status"]) == ["ok", "ok", "error"]
    assert "gone.ome.tif" in inferred["message"][2]
    window = REGION + HALO  # both top regions of the 512^2 slide: core + halo, clipped
    assert [maps.shape for maps in inferred["probabilities"]] == [
        (1, window, window),
        (1, window, window),
        (0, 0, 0),
    ]
    assert inferred["probabilities"][0].dtype == np.float16
    spill = REGION + HALO - SEGMENT.overlap
    assert inferred["spill_image"][0].shape == (spill, spill, 3)
    assert not Path(plan.parts_uri).exists()  # stage 1 writes nothing

    blocked = Path(part_uri(plan, "r0000_c0001"))
    (blocked / "in_the_way").mkdir(parents=True)  # its part cannot replace a folder
    finish = FinishRegions(dataclasses.asdict(InstanceConfig()))
    with caplog.at_level(logging.WARNING, logger="unet_ray.pipelines.slide_regions"):
        result = finish(inferred)
    assert list(result) == list(RESULT_COLUMNS)
    assert list(result["status"]) == ["ok", "error", "error"]
    assert result["nuclei"][0] > 0 and Path(part_uri(plan, "r0000_c0000")).is_file()
    assert result["message"][1].startswith("labelling or writing its part failed: IsADirectory")
    tries = [record.message for record in caplog.records if "r0000_c0001" in record.message]
    assert len(tries) == REGION_ATTEMPTS
    assert all("labelling or writing failed" in message for message in tries)
    assert result["message"][2] == inferred["message"][2]  # passed on untouched
    assert result["post_actor"][2] == "" and result["post_actor"][0] != ""

    shutil.rmtree(blocked)  # the same maps, no model: stage 2 alone writes the part now
    again = finish(inferred)
    assert list(again["status"]) == ["ok", "ok", "error"]
    assert again["nuclei"][1] > 0 and blocked.is_file()


# ----------------------------------------------------------------------------- the Ray job


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)  # sets up the module's job: brief training, Ray, four regions
def test_job_counts_regions_time_and_memory(job):
    summary, output = job
    rows = read_manifest(output)
    assert summary.error == 0 and summary.ok == 2, rows  # the seam slide and its 16-bit twin
    assert rows["seams.ome.tif"]["message"] == "regions: 4 done, 0 skipped (background), 0 failed"
    seams = summary_of(output, "seams")
    assert seams["status"] == "ok" and seams["regions_computed"] == 4
    steps = {"plan_s", "read_s", "infer_s", "post_s", "write_s", "assemble_s"}
    assert set(seams["seconds"]) == steps
    assert seams["seconds"]["infer_s"] > 0
    assert seams["nuclei_cut_by_halo"] == 0
    assert all(peak > 100 for peak in seams["peak_rss_mb_by_actor"].values())
    assert not (output / "seams.parts").exists()  # parts removed once assembled


@pytest.mark.ray
def test_inference_and_post_processing_run_in_separate_processes(job):
    """Each region's maps are labelled and written by a CPU worker, not by the inference actor.
    (How much post-processing runs beside inference depends on timing, so it is measured by
    benchmarks/bench_slides.py, not asserted here; its arithmetic is tested above.)"""
    _, output = job
    seams = summary_of(output, "seams")
    actors, workers = seams["peak_rss_mb_by_actor"], seams["peak_rss_mb_by_post_worker"]
    assert actors and workers
    assert not set(actors) & set(workers)  # node:pid of each: different processes
    assert all(peak > 0 for peak in workers.values())
    seconds = seams["seconds"]
    assert 0 <= seams["post_beside_inference_s"] <= seconds["post_s"] + seconds["write_s"] + 0.01


@pytest.mark.ray
def test_outputs_are_pyramidal_and_label_ids_agree_across_files(job):
    summary, output = job
    rows = read_manifest(output)
    nuclei = int(rows["seams.ome.tif"]["nuclei"])
    assert nuclei > 50
    with tifffile.TiffFile(output / "seams.labels.ome.tif") as tiff:
        assert tiff.is_ome
        levels = tiff.series[0].levels
        assert [level.shape for level in levels] == [(512, 512), (256, 256)]
        assert levels[0].dtype == np.uint32 and tiff.pages[0].is_tiled
        assert 'PhysicalSizeX="0.5"' in tiff.ome_metadata
        labels = levels[0].asarray()
    assert np.array_equal(np.unique(labels), np.arange(nuclei + 1))  # unique slide-wide, dense
    table = pq.read_table(output / "seams.nuclei.parquet").to_pandas()
    assert sorted(table["label"]) == list(range(1, nuclei + 1))
    areas = np.bincount(labels.ravel())[1:]
    assert np.array_equal(table.sort_values("label")["area_px"].to_numpy(), areas)
    geojson = json.loads((output / "seams.geojson").read_text())
    feature_labels = sorted(
        feature["properties"]["measurements"]["label"] for feature in geojson["features"]
    )
    assert feature_labels == list(range(1, nuclei + 1))
    overlay = np.asarray(Image.open(output / "seams.overlay.png"))
    assert overlay.shape == (512, 512, 3)
    assert (overlay == (255, 255, 0)).all(axis=2).sum() > nuclei  # outlines drawn


@pytest.mark.ray
def test_regions_give_the_same_nuclei_as_one_image(job, checkpoint):
    """Nuclei across the seams at 256: found once, whole, as when the slide is one image."""
    from unet_ray.io.checkpoint import load_model

    _, output = job
    regional = tifffile.imread(output / "seams.labels.ome.tif")
    model, _ = load_model(checkpoint)
    image = seam_patch().pixels
    maps = image_probabilities(image, make_batch_predictor(model, "cpu"), SEGMENT)
    whole = labels_from_maps(maps, InstanceConfig())
    crossing = straddling_labels(whole, REGION)
    assert len(crossing) >= 10  # the test means something: nuclei straddle the seams
    assert regional.max() == whole.max()  # none doubled, none lost
    best, iou = match_nuclei(whole, regional)
    assert len(set(best.tolist())) == len(best)  # one-to-one
    assert iou.min() >= MATCH_IOU, np.sort(iou)[:5]
    assert iou[np.array(crossing) - 1].min() >= MATCH_IOU  # in particular those across the seams


@pytest.mark.ray
def test_rerun_skips_complete_slides(job, checkpoint, slide_folder):
    _, output = job
    before = (output / "seams.labels.ome.tif").stat().st_mtime_ns
    summary = run_segmentation(
        checkpoint, str(slide_folder), str(output), SEGMENT, InstanceConfig(), slide=SLIDE_CONFIG
    )
    assert summary.skipped == 2 and summary.ok == 0
    assert (output / "seams.labels.ome.tif").stat().st_mtime_ns == before
    assert read_manifest(output)["seams.ome.tif"]["nuclei"] == str(
        summary_of(output, "seams")["nuclei"]
    )


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)  # two jobs
def test_a_failing_region_marks_its_slide_error_and_a_rerun_resumes(
    ray_local, checkpoint, tmp_path
):
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    # level-0 tile 2 (rows 0-255, columns 512-767) lies in the window of region (0, 1) but not
    # of (0, 0); the 2048-px slide's overview comes from level 1, so only that region fails
    write_sparse_slide(inputs / "damaged.tif", height=2048, corrupt_tile=2)
    small = generate_sample(np.random.default_rng(6), 80, 80, "he")[0]
    (inputs / "fine.png").write_bytes(io.encode_png(small))
    summary = run_segmentation(
        checkpoint, str(inputs), str(output), SEGMENT, InstanceConfig(), slide=SLIDE_CONFIG
    )
    rows = read_manifest(output)
    assert rows["fine.png"]["status"] == "ok"
    assert rows["damaged.tif"]["status"] == "error" and summary.exit_code == 1
    message = rows["damaged.tif"]["message"]
    assert message.startswith(
        "regions: 1 done, 46 skipped (background), 1 failed; region r0000_c0001"
    )
    assert "damaged.tif" in message and "cannot read" in message
    first = summary_of(output, "damaged")
    assert first["status"] == "error" and first["regions_failed"] == 1
    parts = sorted((output / "damaged.parts").glob("*.npz"))
    assert [part.name for part in parts] == ["r0000_c0000.npz"]
    assert not (output / "damaged.labels.ome.tif").exists()

    write_sparse_slide(inputs / "damaged.tif", height=2048)  # the file is repaired
    summary = run_segmentation(
        checkpoint, str(inputs), str(output), SEGMENT, InstanceConfig(), slide=SLIDE_CONFIG
    )
    assert summary.exit_code == 0
    assert (output / "fine.labels.tif").is_file()  # the image beside it: the image path
    second = summary_of(output, "damaged")
    assert second["status"] == "ok"
    assert second["regions_computed"] == 1 and second["regions_resumed"] == 1
    assert second["regions_done"] == 2 and second["nuclei"] > 0
    assert rows["fine.png"]["status"] == "ok"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)  # two jobs
def test_a_region_failing_after_inference_is_recorded_and_a_rerun_resumes(
    ray_local, checkpoint, tmp_path
):
    """A part that cannot be written (a folder is in its way): the post-processing stage fails
    on every try, the region is recorded, the slide's other region is written; a rerun with
    the way clear computes only the failed region."""
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    write_sparse_slide(inputs / "blocked.tif")  # tissue in regions (0, 0) and (0, 1)
    plan = slides.plan_slide(str(inputs / "blocked.tif"), str(output), SLIDE_CONFIG, SEGMENT)
    slides.claim_parts(plan, slides.parts_signature(plan, checkpoint, SEGMENT, InstanceConfig()))
    blocked = Path(part_uri(plan, "r0000_c0001"))
    (blocked / "in_the_way").mkdir(parents=True)  # the job's parts folder, as the job claims it
    summary = run_segmentation(
        checkpoint, str(inputs), str(output), SEGMENT, InstanceConfig(), slide=SLIDE_CONFIG
    )
    rows = read_manifest(output)
    assert rows["blocked.tif"]["status"] == "error" and summary.exit_code == 1
    message = rows["blocked.tif"]["message"]
    assert message.startswith(
        "regions: 1 done, 22 skipped (background), 1 failed; region r0000_c0001: "
        "labelling or writing its part failed: IsADirectoryError"
    )
    first = summary_of(output, "blocked")
    assert first["regions_failed"] == 1 and first["regions_computed"] == 1
    parts = [path.name for path in (output / "blocked.parts").glob("*.npz") if path.is_file()]
    assert parts == ["r0000_c0000.npz"]
    assert not (output / "blocked.labels.ome.tif").exists()

    shutil.rmtree(blocked)
    summary = run_segmentation(
        checkpoint, str(inputs), str(output), SEGMENT, InstanceConfig(), slide=SLIDE_CONFIG
    )
    assert summary.exit_code == 0
    second = summary_of(output, "blocked")
    assert second["status"] == "ok" and second["nuclei"] > 0
    assert second["regions_computed"] == 1 and second["regions_resumed"] == 1


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_bounded_slide_at_half_resolution_opens_in_qupaths_frame(
    ray_local, checkpoint, tmp_path, capsys
):
    """The issue's done criterion: a Leica SCN slide (bounds on its glass) segmented by the Ray
    job at --mpp twice its pixel size. Only the bounds are segmented; its GeoJSON lies in
    QuPath's frame (level 0 minus the bounds, where QuPath puts a bounded slide), each polygon's
    area (shapely) agrees with its
    area_px (level-0 pixels, not the segmented frame's) to 2 %, the table keeps both frames and
    microns, and the console shows the regions' progress."""
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    bounds, mpp = (300, 160, 640, 512), 0.5
    patches = tissue_patches([(0, 0, bounds[3], bounds[2])], seed=7)
    write_leica_scn(str(inputs / "bounded.scn"), 900, 1100, bounds, patches, mpp=mpp)
    slide = dataclasses.replace(SLIDE_CONFIG, mpp=2 * mpp)
    summary = run_segmentation(
        checkpoint, str(inputs), str(output), SEGMENT, InstanceConfig(), slide=slide
    )
    assert summary.exit_code == 0, summary.rows
    features = json.loads((output / "bounded.geojson").read_text())["features"]
    table = pq.read_table(output / "bounded.nuclei.parquet").to_pandas().set_index("label")
    assert len(features) == len(table) > 20
    polygons = {
        f["properties"]["measurements"]["label"]: shapely.geometry.shape(f["geometry"])
        for f in features
    }
    areas = table["area_px"]
    polygon_areas = np.array([polygons[label].area for label in table.index])
    relative = np.abs(polygon_areas - areas.to_numpy()) / areas.to_numpy()
    total = abs(polygon_areas.sum() - areas.sum()) / areas.sum()
    print(f"polygon vs area_px: total {total:.4f}, median {np.median(relative):.4f}")
    assert total < AREA_AGREEMENT and np.median(relative) < AREA_AGREEMENT
    assert relative[areas.to_numpy() >= 4 * 100].max() < AREA_AGREEMENT  # >= 100 frame px
    labels = tifffile.imread(output / "bounded.labels.ome.tif")  # the segmented frame
    assert labels.shape == (bounds[3] // 2, bounds[2] // 2)  # the bounds: QuPath's image
    same = areas.to_numpy() == 4 * np.bincount(labels.ravel())[table.index]
    assert same.mean() >= 0.95  # (a nucleus wider than the halo may lose pixels to another)
    assert all(polygon.is_valid for polygon in polygons.values())
    extent = shapely.geometry.box(0, 0, bounds[2], bounds[3])  # QuPath's image
    assert all(extent.contains(polygon) for polygon in polygons.values())
    assert np.allclose(table["qupath_centroid_x_px"], table["centroid_x_px"] - bounds[0])
    assert np.allclose(table["qupath_centroid_y_px"], table["centroid_y_px"] - bounds[1])
    assert np.allclose(table["area_um2"], table["area_px"] * mpp**2)
    assert table["mean_probability"].between(0, 1).all()
    assert table["mean_probability"].median() > 0.5  # the nuclei are what the model is sure of
    shown = capsys.readouterr().out
    assert "[unet_ray] slides 2/2 regions" in shown and "0 failed" in shown  # 256 x 320
    assert "[unet_ray] assemble 1/1 slide  bounded:" in shown


def test_region_progress_counts_nuclei_of_computed_regions_and_failures():
    ok = {**empty_region_row("a", "r0000_c0000"), "nuclei": 12}
    other = {**empty_region_row("b", "r0000_c0001"), "nuclei": 30}
    failed = {**empty_region_row("b", "r0001_c0000"), "status": "error", "nuclei": 0}
    counts = {"nuclei": 0, "failed": 0}
    shown = [slides.regions_progress(counts, row) for row in (ok, failed, other)]
    assert shown == ["12 nuclei, 0 failed", "12 nuclei, 1 failed", "42 nuclei, 1 failed"]


def test_gzipped_geojson_holds_slide_wide_labels(tmp_path):
    """Above GEOJSON_GZIP_NUCLEI nuclei the GeoJSON is gzipped; labels get the region offset."""
    from unet_ray.io import slide_writers

    names = slide_writers.output_names("case", gzipped=True)
    assert names["geojson"] == "case.geojson.gz"
    path = str(tmp_path / "x.geojson.gz")
    plan = SlidePlan(
        uri="x",
        stem="x",
        output_uri=str(tmp_path),
        frame_height=256,
        frame_width=256,
        scale=1.0,
        mpp=None,
        region=256,
        halo=64,
        spill=32,
        to_segment=["r0000_c0000"],
        skipped=[],
        done=[],
    )
    region = plan.regions()[0]
    kept = np.zeros((256, 256), np.uint32)
    kept[10:20, 10:20], kept[100:130, 50:60] = 1, 2
    image = np.zeros((256, 256, 3), np.uint8)
    io.write_bytes_atomic(
        part_uri(plan, region.key),
        slide_writers.encode_region_part(kept, image, None, region, plan),
    )
    parts = slide_writers.PartCache(plan)
    slide_writers.write_geojson(plan, parts, {region.key: 5}, path, gzipped=True)
    with gzip.open(path, "rt") as stream:
        features = json.load(stream)["features"]
    assert [feature["properties"]["measurements"]["label"] for feature in features] == [6, 7]
    assert features[1]["properties"]["measurements"]["area_px"] == 300
    assert [feature["id"] for feature in features] == [feature_id("x", 6), feature_id("x", 7)]
    shutil.rmtree(plan.parts_uri)


def test_parts_of_a_run_with_other_settings_are_not_reused(tmp_path):
    path = tmp_path / "sparse.tif"
    write_sparse_slide(path)
    plan = slides.plan_slide(str(path), str(tmp_path / "out"), SLIDE_CONFIG, SEGMENT)
    signature = slides.parts_signature(plan, "ckpt", SEGMENT, InstanceConfig())
    slides.claim_parts(plan, signature)
    part = Path(part_uri(plan, "r0000_c0000"))
    part.write_bytes(b"a finished region")
    plan.done = ["r0000_c0000"]
    slides.claim_parts(plan, signature)  # same settings: resumed
    assert plan.done == ["r0000_c0000"] and part.exists()
    slides.claim_parts(plan, slides.parts_signature(plan, "ckpt", SEGMENT, InstanceConfig(0.6)))
    assert plan.done == [] and not part.exists()
    assert (Path(plan.parts_uri) / "signature.json").is_file()
