"""Test-time augmentation and the search of the instance settings (issue 24), without Ray: the
dihedral transforms, TTA through the tiling, planted best settings, and `unet-ray thresholds`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from unet_ray.cli import main
from unet_ray.core.config import Config, InstanceConfig, SegmentConfig
from unet_ray.core.model import UNetVGG16BN
from unet_ray.inference import (
    DIHEDRAL_TRANSFORMS,
    dihedral,
    image_logits,
    make_batch_predictor,
    search_instance_settings,
    undo_dihedral,
)
from unet_ray.io.checkpoint import CONFIG_FILE, MODEL_FILE, save_checkpoint
from unet_ray.io.dsb import list_dsb_samples
from unet_ray.pipelines.evaluate import evaluate_checkpoint
from unet_ray.pipelines.thresholds import (
    FEW_SEARCH_IMAGES,
    SEARCH_RECORD,
    describe_search,
    search_checkpoint,
)


def test_the_eight_transforms_are_distinct_and_undone_exactly():
    rng = np.random.default_rng(0)
    for shape in ((2, 6, 6, 3), (2, 4, 7, 3)):  # square and non-square windows
        windows = rng.random(shape)
        seen = set()
        for transform in range(DIHEDRAL_TRANSFORMS):
            moved = dihedral(windows, transform, (1, 2))
            seen.add(moved.tobytes() + bytes(moved.shape))
            assert np.array_equal(undo_dihedral(moved, transform, (1, 2)), windows)
        assert len(seen) == DIHEDRAL_TRANSFORMS


def _image(seed: int, height: int = 96, width: int = 160) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_tta_of_an_equivariant_model_equals_the_plain_prediction():
    """A per-pixel model commutes with every flip and quarter turn: TTA changes nothing, through
    the real tiling (several tiles, stitched)."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 2, kernel_size=1)
    segment = SegmentConfig(tile=64, overlap=16, batch_size=3)
    image = _image(1)
    plain = image_logits(image, make_batch_predictor(model, "cpu"), segment)
    augmented = image_logits(image, make_batch_predictor(model, "cpu", tta=True), segment)
    np.testing.assert_allclose(augmented, plain, atol=1e-5)


def test_tta_of_a_directional_model_is_the_mean_over_the_eight_views():
    """A 3x3 kernel with a direction is not equivariant: TTA differs from one pass and equals the
    average of the model's logits over the 8 transformed images, mapped back (one tile)."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 1, kernel_size=3, padding=1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.arange(27, dtype=torch.float32).reshape(1, 3, 3, 3) / 27)
    segment = SegmentConfig(tile=128, overlap=16)
    image = _image(2, 64, 96)
    plain = image_logits(image, make_batch_predictor(model, "cpu"), segment)
    augmented = image_logits(image, make_batch_predictor(model, "cpu", tta=True), segment)
    assert np.abs(augmented - plain).max() > 0.05
    views = []
    for transform in range(DIHEDRAL_TRANSFORMS):
        moved = np.ascontiguousarray(dihedral(image[None], transform, (1, 2)))
        batch = torch.from_numpy(moved).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            logits = model(batch).numpy()
        views.append(undo_dihedral(logits, transform, (2, 3))[0])
    np.testing.assert_allclose(augmented, np.mean(views, axis=0), atol=1e-5)


def planted_maps(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei (radius 9, ~250 px) at probability 0.8 inside a 2-px halo at 0.65, and 40-px
    specks at 0.9 that are no nuclei: only threshold 0.7 outlines the nuclei exactly, and only
    a minimum size of 64 px (of the grid 0, 8, 16, 32, 64) drops the specks."""
    rng = np.random.default_rng(seed)
    size = 128
    yy, xx = np.mgrid[:size, :size]
    truth = np.zeros((size, size), np.int32)
    nucleus = np.full((size, size), 0.1, np.float32)
    for label, (y, x) in enumerate([(20, 20), (20, 70), (64, 40), (100, 100), (90, 20)], 1):
        y, x = y + int(rng.integers(-3, 4)), x + int(rng.integers(-3, 4))
        distance = np.hypot(yy - y, xx - x)
        nucleus[distance <= 11] = 0.65
        truth[distance <= 9] = label
    nucleus[truth > 0] = 0.8
    for y, x in ((50, 100), (110, 60)):
        nucleus[y : y + 5, x : x + 8] = 0.9  # a speck of 40 px
    return nucleus[None], truth


def test_the_search_finds_the_planted_threshold_and_minimum_size():
    maps = [(f"image{seed}", *planted_maps(seed)) for seed in range(3)]
    result = search_instance_settings(maps, InstanceConfig(), "dsb_score")
    assert result.instances.threshold == pytest.approx(0.7)
    assert result.instances.min_size == 64
    assert result.instances.core_ratio == InstanceConfig().core_ratio  # no gain: kept
    assert result.after["dsb_score"] == pytest.approx(1.0)
    assert result.before["dsb_score"] < 0.7  # the defaults: halo inside, specks counted
    record = result.record()
    assert record["chosen"]["min_size"] == 64 and record["after"]["n_images"] == 3


def test_a_search_on_few_images_says_so_and_how_to_check_it():
    maps = [(f"image{seed}", *planted_maps(seed)) for seed in range(3)]
    record = {
        **search_instance_settings(maps, InstanceConfig(), "dsb_score").record(),
        "tta": False,
    }
    line = describe_search(record)
    assert "searched on 3 annotated image(s)" in line and "min_size=64" in line
    assert f"fewer than {FEW_SEARCH_IMAGES} images" in line and "unet-ray evaluate" in line
    many = {**record, "before": {**record["before"], "n_images": FEW_SEARCH_IMAGES}}
    assert "fewer than" not in describe_search(many)


def test_a_contour_head_searches_its_contour_threshold_not_the_core_ratio():
    nucleus, truth = planted_maps(0)
    contour = np.zeros_like(nucleus)
    grid = {
        "threshold": (0.5,),
        "core_ratio": (0.1,),
        "contour_threshold": (0.3,),
        "min_size": (0,),
    }
    result = search_instance_settings(
        [("a", np.concatenate([nucleus, contour]), truth)], InstanceConfig(), "f1_50", grid
    )
    assert result.instances.core_ratio == InstanceConfig().core_ratio  # never tried
    assert result.evaluated <= 4


@pytest.fixture(scope="module")
def layout_and_checkpoint(tmp_path_factory):
    from unet_ray.io.synth import write_synthetic_dataset

    root = tmp_path_factory.mktemp("raw") / "stage1_train"
    write_synthetic_dataset(root, count=4, seed=5, min_side=64, max_side=96)
    ids = sorted(ref.sample_id for ref in list_dsb_samples(str(root)))
    folder = str(tmp_path_factory.mktemp("ckpt") / "best")
    torch.manual_seed(0)
    config = Config.from_dict({"model": {"encoder_weights": "none"}, "segment": {"tile": 128}})
    save_checkpoint(
        folder, UNetVGG16BN(), config.to_dict(), {"epoch": 1}, {"train": ids[:2], "val": ids[2:]}
    )
    return str(root), folder


def test_thresholds_command_writes_a_new_checkpoint_that_evaluate_scores_as_searched(
    layout_and_checkpoint, tmp_path, capsys
):
    data, checkpoint = layout_and_checkpoint
    output = str(tmp_path / "searched")
    assert main(["thresholds", checkpoint, data, "--output", output, "--metric", "f1_50"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["checkpoint"] == output and printed["metric"] == "f1_50"
    assert printed["split"] == "all" and printed["before"]["n_images"] == 4
    assert printed["after"]["f1_50"] >= printed["before"]["f1_50"]
    # the weights are copied byte for byte; the instance settings are the chosen ones
    assert (Path(output) / MODEL_FILE).read_bytes() == (Path(checkpoint) / MODEL_FILE).read_bytes()
    info = json.loads((Path(output) / CONFIG_FILE).read_text())
    assert info["config"]["instances"] == printed["chosen"] == info[SEARCH_RECORD]["chosen"]
    assert info["samples"]["val"]  # the rest of the checkpoint is kept
    # evaluate on the same images with the new checkpoint measures what the search measured
    metrics = evaluate_checkpoint(output, data, split="all")
    assert metrics["f1_50"] == pytest.approx(printed["after"]["f1_50"])
    assert metrics["instances"] == printed["chosen"]
    # the command never rewrites the checkpoint it reads
    assert main(["thresholds", checkpoint, data, "--output", checkpoint]) == 2


def test_search_in_place_with_tta_is_recorded_and_not_repeated(layout_and_checkpoint, tmp_path):
    import shutil

    data, original = layout_and_checkpoint
    checkpoint = str(tmp_path / "best")
    shutil.copytree(original, checkpoint)
    record = search_checkpoint(checkpoint, data, split="val", tta=True)
    assert record["tta"] is True and record["before"]["n_images"] == 2
    info = json.loads((Path(checkpoint) / CONFIG_FILE).read_text())
    assert info["config"]["segment"]["tta"] is True  # evaluate and segment then use TTA
    assert evaluate_checkpoint(checkpoint, data)["tta"] is True
    assert evaluate_checkpoint(checkpoint, data, tta=False)["tta"] is False  # --no-tta
    modified = (Path(checkpoint) / CONFIG_FILE).stat().st_mtime_ns
    assert search_checkpoint(checkpoint, data, split="val", tta=True) == record
    assert (Path(checkpoint) / CONFIG_FILE).stat().st_mtime_ns == modified  # not searched again
    again = search_checkpoint(checkpoint, data, split="val", tta=False)  # asked differently
    assert again["tta"] is False


def test_segment_takes_tta_from_the_checkpoint_unless_a_flag_says(layout_and_checkpoint):
    from unet_ray.cli import build_parser, configs_from_args

    saved = Config.from_dict({"segment": {"tta": True}})
    for flags, expected in (([], True), (["--no-tta"], False), (["--tta"], True)):
        args = build_parser().parse_args(["segment", "ckpt", "in", "out", *flags])
        segment, instances = configs_from_args(args, saved)
        assert segment.tta is expected and instances == saved.instances
    plain = dataclasses.replace(saved, segment=SegmentConfig())
    args = build_parser().parse_args(["segment", "ckpt", "in", "out"])
    assert configs_from_args(args, plain)[0].tta is False


def test_the_segment_actors_predict_with_tta_when_the_config_says(layout_and_checkpoint, tmp_path):
    """The image and slide-region actors build their predictor from ``segment.tta`` (run here in
    this process, as Ray Data would construct them): with TTA their maps are evaluate's TTA maps."""
    from PIL import Image

    from unet_ray.io.checkpoint import load_model
    from unet_ray.pipelines.segment import SegmentActor
    from unet_ray.pipelines.slide_regions import InferRegions

    data, checkpoint = layout_and_checkpoint
    image = _image(4, 64, 96)
    path = tmp_path / "one.png"
    Image.fromarray(image).save(path)
    model, _ = load_model(checkpoint)
    segment = SegmentConfig(tile=128)
    expected = {
        tta: image_logits(image, make_batch_predictor(model, "cpu", tta=tta), segment)
        for tta in (False, True)
    }
    assert np.abs(expected[True] - expected[False]).max() > 1e-3  # TTA changes a random model
    for tta in (False, True):
        config = dataclasses.asdict(dataclasses.replace(segment, tta=tta))
        probabilities = 1 / (1 + np.exp(-expected[tta]))
        for actor in (SegmentActor(checkpoint, config), InferRegions(checkpoint, config)):
            # the actors' predictor gives float16 probabilities (issue 22: sigmoid on the device)
            maps = actor.predict_maps(image[None])
            np.testing.assert_allclose(maps[0], probabilities, atol=2e-3)
        row = SegmentActor(checkpoint, config).infer_one(str(path))
        np.testing.assert_allclose(row["probabilities"], probabilities, atol=2e-3)  # float16
