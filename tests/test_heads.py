"""The ``mask+contour`` head end to end through Ray Train, and one set of instance settings,
saved in the checkpoint, used by `evaluate` and `segment` (CLI flags override them)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from unet_ray.cli import main
from unet_ray.core.config import Config
from unet_ray.io.checkpoint import load_model, read_checkpoint_info
from unet_ray.pipelines.train import run_training

pytestmark = pytest.mark.ray
TILE = 64
SAVED_INSTANCES = {"threshold": 0.45, "min_size": 9, "core_ratio": 0.8}


@pytest.fixture(scope="module")
def contour_run(training_prepared, tmp_path_factory):
    """Two epochs of the two-channel head, with non-default instance settings kept as given."""
    prepared = training_prepared
    output = tmp_path_factory.mktemp("contour_run")
    config = Config.from_dict(
        {
            "model": {"encoder_weights": "none", "head": "mask+contour"},
            "data": {"source": prepared, "tile_size": TILE, "image_size": TILE},
            "train": {
                "output": str(output),
                "epochs": 2,
                "batch_size": 4,
                "workers": 1,
                "scheduler": "constant",
                "max_lr": 0.05,
                "warmup_epochs": 0,
                "min_steps_per_epoch": 2,
                "contour_weight": 2.0,
                # the settings under test are the ones given; the search (which would
                # replace them) is tested in test_thresholds and test_train
                "search_instances": False,
            },
            "instances": SAVED_INSTANCES,
        }
    )
    return prepared, output, run_training(config)


def test_contour_head_trains_through_ray_train_and_is_saved(contour_run):
    _, output, result = contour_run
    with open(Path(output) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    assert all(np.isfinite(float(row["train_loss"])) for row in rows)
    assert all(0.0 <= float(row["val_pixel_f1"]) <= 1.0 for row in rows)
    model, info = load_model(result.best_checkpoint)
    assert model.head.out_channels == 2
    assert info["config"]["model"]["head"] == "mask+contour"
    assert info["config"]["train"]["contour_weight"] == 2.0
    for key, value in SAVED_INSTANCES.items():
        assert info["config"]["instances"][key] == value


def test_evaluate_uses_the_checkpoints_instance_settings_unless_overridden(contour_run, capsys):
    prepared, _, result = contour_run

    def evaluate(*flags):
        capsys.readouterr()
        assert main(["evaluate", result.best_checkpoint, prepared, *flags]) == 0
        out = capsys.readouterr().out
        return json.loads(out[out.index("{\n") : out.rindex("\n}") + 2])

    saved = evaluate()
    assert saved["head"] == "mask+contour"
    assert {key: saved["instances"][key] for key in SAVED_INSTANCES} == SAVED_INSTANCES
    overridden = evaluate("--threshold", "0.7", "--min-size", "30")
    assert overridden["instances"]["threshold"] == 0.7
    assert overridden["instances"]["min_size"] == 30
    assert overridden["instances"]["core_ratio"] == SAVED_INSTANCES["core_ratio"]


def test_segment_reads_the_head_and_settings_and_writes_mask_as_union_of_labels(
    contour_run, tmp_path, capsys, synth_root
):
    _, _, result = contour_run
    image = next(Path(synth_root).glob("*/images/*.png"))
    capsys.readouterr()
    code = main(
        ["segment", result.best_checkpoint, str(image), str(tmp_path / "out"), "--tile", "64",
         "--overlap", "16", "--min-size", "12"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "threshold=0.45" in printed and "min_size=12" in printed and "core_ratio=0.8" in printed
    stem = image.stem
    labels = tifffile.imread(tmp_path / "out" / f"{stem}.labels.tif")
    mask = np.asarray(Image.open(tmp_path / "out" / f"{stem}.mask.png"))
    assert labels.dtype == np.uint32
    np.testing.assert_array_equal(mask > 0, labels > 0)
    sizes = np.bincount(labels.ravel())[1:]
    assert (sizes[sizes > 0] >= 12).all()  # the override reached the actors
    assert read_checkpoint_info(result.best_checkpoint)["config"]["instances"]["min_size"] == 9


def test_a_checkpoint_whose_head_does_not_match_its_config_is_refused(contour_run, tmp_path):
    import shutil

    _, _, result = contour_run
    broken = tmp_path / "broken"
    shutil.copytree(result.best_checkpoint, broken)
    info = json.loads((broken / "config.json").read_text())
    info["config"]["model"]["head"] = "mask"
    (broken / "config.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"head of 2 output channel\(s\).*model.head='mask'"):
        load_model(str(broken))
