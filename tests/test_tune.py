"""Ray Tune search: trials, ASHA early stopping, result files, resume after interruption."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unet_ray.cli import build_parser, config_from_args
from unet_ray.config import Config
from unet_ray.data import prepare_dataset
from unet_ray.tune import EXPERIMENT_NAME, max_concurrent_trials, run_tuning

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
TILE = 64


@pytest.fixture(scope="module")
def prepared(ray_local, synth_root, tmp_path_factory) -> str:
    output = str(tmp_path_factory.mktemp("tune_prepared"))
    prepare_dataset(str(synth_root), output, tile_size=TILE, val_fraction=0.25, seed=1)
    return output


def tune_config(prepared: str, output, **tune) -> Config:
    return Config.from_dict(
        {
            "data": {
                "source": prepared,
                "tile_size": TILE,
                "image_size": TILE,
                "elastic_probability": 0.0,
            },
            "train": {"output": str(output), "workers": 1},
            "tune": {
                "num_samples": 6,
                "max_epochs": 3,
                "grace_period": 1,
                "reduction_factor": 2,
                "max_lr_min": 1e-4,
                "max_lr_max": 0.2,
                "batch_sizes": [2, 4],
                "seed": 0,
                **tune,
            },
        }
    )


def test_search_completes_stops_early_and_writes_results(prepared, tmp_path):
    summary = run_tuning(tune_config(prepared, tmp_path))
    rows = list(csv.DictReader((tmp_path / "trials.csv").read_text().splitlines()))
    assert len(rows) == 6
    scores = [float(row["best_val_pixel_f1"]) for row in rows]
    assert scores == sorted(scores, reverse=True)  # sorted by best validation F1
    assert {row["scheduler"] for row in rows} <= {"warm-restart", "cyclic"}
    assert any(int(row["epochs"]) < 3 for row in rows), "ASHA stopped no trial early"
    assert (tmp_path / "trials.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "best" / "model.pt").exists()
    assert summary.table.startswith("| trial_id")
    # best.yaml is a config `unet-ray train --config` accepts, holding the best trial's values
    args = build_parser().parse_args(
        ["train", "--config", str(tmp_path / "best.yaml"), "--epochs", "1"]
    )
    config = config_from_args(args)
    assert config.train.scheduler == rows[0]["scheduler"]
    assert config.train.max_lr == pytest.approx(float(rows[0]["max_lr"]))
    assert config.train.epochs == 1


def test_trials_never_oversubscribe_the_cluster():
    config = Config.from_dict({"train": {"workers": 2}})
    assert max_concurrent_trials(config, {"CPU": 8.0}) == 2  # (2 workers + 1 data CPU) per trial
    gpu = Config.from_dict({"train": {"workers": 2, "use_gpu": True}})
    assert max_concurrent_trials(gpu, {"CPU": 64.0, "GPU": 4.0}) == 2
    with pytest.raises(ValueError, match="lower --workers"):
        max_concurrent_trials(Config.from_dict({"train": {"workers": 4}}), {"CPU": 2.0})


def test_interrupted_search_resumes(prepared, tmp_path, ray_local):
    output = tmp_path / "search"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    command = [
        sys.executable,
        str(REPO / "jobs" / "tune.py"),
        "--data",
        prepared,
        "--output",
        str(output),
        "--image-size",
        str(TILE),
        "--num-samples",
        "3",
        "--max-epochs",
        "2",
        "--workers",
        "1",
        "--max-concurrent",
        "1",
        "--elastic-probability",
        "0",
    ]
    driver = subprocess.Popen(command, env=env, start_new_session=True)
    trials = output / "trials"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(trials.glob("*/metrics.csv")):
            time.sleep(1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    started = {path.name for path in trials.iterdir()}
    assert started and not (output / "trials.csv").exists()  # really interrupted mid-search
    time.sleep(2)
    config = tune_config(prepared, output, num_samples=3, max_epochs=2, max_concurrent=1)
    summary = run_tuning(config)
    assert (output / EXPERIMENT_NAME).is_dir()
    finished = {row["trial_id"] for row in summary.rows}
    assert len(summary.rows) == 3
    assert started <= finished  # the trials of the first run were continued, not replaced
