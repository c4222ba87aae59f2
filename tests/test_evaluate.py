"""`unet-ray evaluate` and per-image scoring, without Ray: splits of a raw layout, per-image rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unet_ray.cli import main
from unet_ray.core.config import Config, InstanceConfig
from unet_ray.core.model import UNetVGG16BN
from unet_ray.inference import score_image, summarise_scores
from unet_ray.io.checkpoint import save_checkpoint
from unet_ray.io.dsb import list_dsb_samples
from unet_ray.pipelines.evaluate import evaluate_checkpoint


@pytest.fixture(scope="module")
def raw_layout(tmp_path_factory):
    from unet_ray.io.synth import write_synthetic_dataset

    root = tmp_path_factory.mktemp("raw") / "stage1_train"
    write_synthetic_dataset(root, count=5, seed=3, min_side=64, max_side=96)
    return str(root)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, raw_layout):
    ids = sorted(ref.sample_id for ref in list_dsb_samples(raw_layout))
    folder = str(tmp_path_factory.mktemp("ckpt") / "best")
    torch.manual_seed(0)
    config = Config.from_dict({"model": {"encoder_weights": "none"}, "segment": {"tile": 128}})
    save_checkpoint(
        folder, UNetVGG16BN(), config.to_dict(), {"epoch": 1}, {"train": ids[:3], "val": ids[3:]}
    )
    return folder, ids


def test_score_image_counts_pixels_and_nuclei():
    truth = np.zeros((32, 32), np.int32)
    truth[2:8, 2:8], truth[20:30, 20:30] = 1, 2
    perfect = (truth > 0).astype(np.float32)
    row = score_image("a", perfect[None], truth, InstanceConfig(min_size=4))
    assert row["pixel_f1"] == 1.0 and row["dsb_score"] == 1.0 and row["f1_50"] == 1.0
    assert (row["nuclei_true"], row["nuclei_pred"]) == (2, 2)
    half = perfect.copy()
    half[20:30, 20:30] = 0  # one nucleus missed
    missed = score_image("b", half[None], truth, InstanceConfig(min_size=4))
    assert missed["dsb_score"] == pytest.approx(0.5) and missed["fn"] == 100
    summary = summarise_scores([row, missed])
    assert summary["n_images"] == 2
    assert summary["dsb_score"] == pytest.approx(0.75)  # mean over images, not pixels
    assert summary["pixel_f1"] == pytest.approx(344 / (344 + 100))  # from summed counts
    with pytest.raises(ValueError, match="no images were scored"):
        summarise_scores([])


def test_raw_layout_val_split_scores_the_checkpoints_validation_images(checkpoint, raw_layout):
    folder, ids = checkpoint
    metrics = evaluate_checkpoint(folder, raw_layout)  # --split val, the default
    assert metrics["split"] == "val" and metrics["n_images"] == 2
    assert [row["image"] for row in metrics["per_image"]] == ids[3:]
    train = evaluate_checkpoint(folder, raw_layout, split="train")
    assert [row["image"] for row in train["per_image"]] == ids[:3]
    everything = evaluate_checkpoint(folder, raw_layout, split="all")
    assert sorted(row["image"] for row in everything["per_image"]) == ids
    # per-image rows are the same whichever split holds them
    by_id = {row["image"]: row for row in everything["per_image"]}
    for row in metrics["per_image"]:
        assert row["dsb_score"] == pytest.approx(by_id[row["image"]]["dsb_score"])


def test_checkpoint_without_recorded_split_asks_for_split_all(tmp_path, raw_layout):
    folder = str(tmp_path / "old")
    config = Config.from_dict({"model": {"encoder_weights": "none"}})
    save_checkpoint(folder, UNetVGG16BN(), config.to_dict(), {"epoch": 1})
    with pytest.raises(ValueError, match="records no 'val' split.*--split all"):
        evaluate_checkpoint(folder, raw_layout)


def test_split_of_another_dataset_is_a_clear_error(checkpoint, tmp_path):
    from unet_ray.io.synth import write_synthetic_dataset

    other = tmp_path / "other" / "stage1_train"
    write_synthetic_dataset(other, count=2, seed=99, min_side=64, max_side=64)
    with pytest.raises(ValueError, match="none of the checkpoint's 2 'val' images"):
        evaluate_checkpoint(checkpoint[0], str(other))


def test_evaluate_command_prints_json_and_refuses_unknown_splits(checkpoint, raw_layout, capsys):
    assert main(["evaluate", checkpoint[0], raw_layout, "--split", "all"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n_images"] == 5 and len(printed["per_image"]) == 5
    for key in ("pixel_f1", "pixel_iou", "dsb_score", "f1_50"):
        assert 0.0 <= printed[key] <= 1.0
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", checkpoint[0], raw_layout, "--split", "test"])
    assert exit_info.value.code == 2
