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
from unet_ray.tune import (
    EXPERIMENT_NAME,
    max_concurrent_trials,
    run_tuning,
    state_api_problem,
    tune_config_from_args,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
TILE = 64


@pytest.fixture(scope="module")
def prepared(ray_local, training_root, tmp_path_factory) -> str:
    output = str(tmp_path_factory.mktemp("tune_prepared"))
    prepare_dataset(str(training_root), output, tile_size=TILE, val_fraction=0.25, seed=1)
    return output


SEARCH_YAML = """
data:
  elastic_probability: 0.0
tune:
  grace_period: 1
  reduction_factor: 2
  max_lr_min: 0.0001
  max_lr_max: 0.2
  batch_sizes: [2, 4]
  seed: 0
"""
TRIALS, EPOCHS = 4, 2


def reserved_placement_groups() -> list[str]:
    import ray

    table = ray.util.placement_group_table()
    return [group for group, info in table.items() if info["state"] != "REMOVED"]


def wait_until(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"still reserved after {seconds} s: {reserved_placement_groups()}")
        time.sleep(1)


def test_trials_never_oversubscribe_the_cluster():
    config = Config.from_dict({"train": {"workers": 2}})
    assert max_concurrent_trials(config, {"CPU": 8.0}) == 2  # (2 workers + 1 data CPU) per trial
    gpu = Config.from_dict({"train": {"workers": 2, "use_gpu": True}})
    assert max_concurrent_trials(gpu, {"CPU": 64.0, "GPU": 4.0}) == 2
    with pytest.raises(ValueError, match="lower --workers"):
        max_concurrent_trials(Config.from_dict({"train": {"workers": 4}}), {"CPU": 2.0})


def test_state_api_that_frees_stopped_trials_is_reachable(ray_local):
    """The session's Ray runs the dashboard like users' Ray does, so `unet-ray tune` finds the
    state API that Ray Train needs to release a stopped trial's placement group."""
    assert state_api_problem() == ""


def test_interrupted_search_resumes_and_writes_results(prepared, tmp_path, ray_local):
    """A search started as a job is killed mid-way; the same command again resumes it (Tuner
    restore), finishes every trial with ASHA stopping some early, and writes the results."""
    config_file = tmp_path / "search.yaml"
    config_file.write_text(SEARCH_YAML)
    output = tmp_path / "search"
    flags = [
        "--config", str(config_file), "--data", prepared, "--output", str(output),
        "--image-size", str(TILE), "--workers", "1",
        "--num-samples", str(TRIALS), "--max-epochs", str(EPOCHS),
        # one trial at a time: a 4-CPU test cluster then always has CPUs left for Ray Data,
        # even while the killed run's placement groups are still being cleaned up
        "--max-concurrent", "1",
    ]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    driver = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "tune.py"), *flags], env=env, start_new_session=True
    )
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

    args = build_parser().parse_args(["tune", *flags])
    summary = run_tuning(tune_config_from_args(args, config_from_args(args)))

    # trials stopped by ASHA and the killed search gave their CPUs back to the cluster
    wait_until(lambda: not reserved_placement_groups(), seconds=60)
    assert (output / EXPERIMENT_NAME).is_dir()
    assert started <= {row["trial_id"] for row in summary.rows}  # continued, not replaced
    rows = list(csv.DictReader((output / "trials.csv").read_text().splitlines()))
    assert len(rows) == TRIALS
    scores = [float(row["best_val_pixel_f1"]) for row in rows]
    assert scores == sorted(scores, reverse=True)  # sorted by best validation F1
    assert {row["scheduler"] for row in rows} <= {"warm-restart", "cyclic"}
    assert {int(row["batch_size"]) for row in rows} <= {2, 4}
    assert any(int(row["epochs"]) < EPOCHS for row in rows), "ASHA stopped no trial early"
    assert (output / "trials.png").read_bytes()[:4] == b"\x89PNG"
    assert (output / "best" / "model.pt").exists()
    assert summary.table.startswith("| trial_id")
    # best.yaml is a config `unet-ray train --config` accepts, holding the best trial's values
    best = build_parser().parse_args(
        ["train", "--config", str(output / "best.yaml"), "--epochs", "1"]
    )
    config = config_from_args(best)
    assert config.train.scheduler == rows[0]["scheduler"]
    assert config.train.max_lr == pytest.approx(float(rows[0]["max_lr"]))
    assert config.train.epochs == 1
