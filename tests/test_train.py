"""Ray Train integration: DDP training, outputs, overfitting, fault tolerance, resume, S3."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unet_ray import io
from unet_ray.cli import build_parser, config_from_args, main
from unet_ray.core.config import Config
from unet_ray.io.checkpoint import load_model
from unet_ray.pipelines.train import run_training
from unet_ray.pipelines.train_loop import registered_epochs

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
TILE = 64


@pytest.fixture
def prepared(training_prepared) -> str:
    return training_prepared


def make_config(prepared: str, output, **train) -> Config:
    values = {
        "model": {"encoder_weights": "none"},
        "data": {
            "source": prepared,
            "tile_size": TILE,
            "image_size": TILE,
            "elastic_probability": 0.0,
        },
        "train": {
            "output": str(output),
            "epochs": 2,
            "batch_size": 4,
            "workers": 2,
            "scheduler": "constant",
            "max_lr": 0.05,
            "warmup_epochs": 0,
            "min_steps_per_epoch": 1,
            **train,
        },
    }
    return Config.from_dict(values)


def read_metrics(output) -> list[dict[str, str]]:
    with open(Path(output) / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def check_evaluate_output(checkpoint: str, prepared: str, capsys) -> None:
    """`unet-ray evaluate` prints one JSON object with the documented keys and sane values."""
    capsys.readouterr()
    assert main(["evaluate", checkpoint, prepared]) == 0
    out = capsys.readouterr().out  # Ray may still forward worker log lines: take the JSON block
    metrics = json.loads(out[out.index("{\n") : out.rindex("\n}") + 2])
    for key in ("pixel_f1", "pixel_iou", "dsb_score", "f1_50"):
        assert 0.0 <= metrics[key] <= 1.0
    val_samples = io_val_samples(prepared)
    assert metrics["n_images"] == len(val_samples)  # images, not tiles
    assert sorted(row["image"] for row in metrics["per_image"]) == val_samples
    assert metrics["pixel_iou"] <= metrics["pixel_f1"]  # IoU never exceeds Dice
    return metrics


def io_val_samples(prepared: str) -> list[str]:
    from unet_ray.io.prepared import read_dataset_info

    return sorted(read_dataset_info(prepared)["val"]["samples"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_overfit_reaches_high_validation_dice(ray_local, tmp_path):
    """Fluorescence-style synthetic images, no augmentation: the whole Ray pipeline must learn."""
    import numpy as np

    from unet_ray.io.dsb import write_dsb_sample
    from unet_ray.io.synth import generate_sample

    raw = tmp_path / "raw"
    rng = np.random.default_rng(3)
    for index in range(12):
        image, labels = generate_sample(rng, 128, 128, "fluorescence")
        write_dsb_sample(str(raw), f"fluo{index:02d}", image, labels)
    config = Config.from_dict(
        {
            "model": {"encoder_weights": "none"},
            "data": {
                "source": str(raw),
                "tile_size": TILE,
                "image_size": TILE,
                "val_fraction": 0.25,
                "augment": False,
            },
            "train": {
                "output": str(tmp_path / "run"),
                "epochs": 5,  # above 0.9 from epoch 3 or 4 on in trial runs
                "batch_size": 6,
                "workers": 1,
                "scheduler": "constant",
                "max_lr": 0.02,
                "warmup_epochs": 0,
                "min_steps_per_epoch": 1,
            },
        }
    )
    result = run_training(config)
    assert result.metrics["val_pixel_f1"] > 0.9, result.history


@pytest.mark.timeout(900)
def test_three_workers_survive_a_killed_worker_and_score_every_image_once(
    prepared, tmp_path, capsys
):
    """3 workers x 2 epochs; the last worker dies at the start of epoch 2, once epoch 1's
    checkpoint is registered, and the run restarts from exactly that checkpoint's weights. The
    validation split has fewer images (2) than workers: every image is scored exactly once and
    the run finishes. Then metrics, curves, TensorBoard, per-image scores and best/."""
    marker, output = tmp_path / "killed", tmp_path / "run"
    config = make_config(prepared, output, epochs=2, workers=3, batch_size=6, max_failures=1)
    result = run_training(config, fault_injection={"epoch": 2, "marker": str(marker)})
    assert marker.exists()  # a worker really died early in epoch 2
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert result.run_starts == [0, 1]  # restarted once, from epoch 1's checkpoint, not epoch 0
    state = result.state
    assert [resume["epoch"] for resume in state["resumes"]] == [1]
    # the restored weights are bit for bit the ones saved at the end of epoch 1
    assert state["resumes"][0]["digest"] == state["digests"]["1"]
    assert state["digests"]["2"] != state["digests"]["1"]  # and epoch 2 trained on from them

    rows = read_metrics(output)
    assert [row["epoch"] for row in rows] == ["1", "2"]  # the restart did not repeat epoch 1
    assert (output / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((output / "tensorboard").glob("events.out.tfevents.*"))
    val_samples = io_val_samples(prepared)
    assert len(val_samples) < 3  # fewer validation images than workers
    assert all(int(row["val_images"]) == len(val_samples) for row in rows)
    with open(output / "val_images.csv") as handle:
        scored = [row["image"] for row in csv.DictReader(handle)]
    assert scored == val_samples  # each image by exactly one rank: ids, not only the count
    model, info = load_model(result.best_checkpoint)
    # OUTPUT/best is the epoch of the highest DSB score (the default --best-metric), ties to F1
    best_key = max((float(row["val_dsb_score"]), float(row["val_pixel_f1"])) for row in rows)
    assert (info["metrics"]["val_dsb_score"], info["metrics"]["val_pixel_f1"]) == best_key
    assert info["config"]["model"]["encoder_weights"] == "none"
    assert sorted(info["samples"]["val"]) == val_samples
    # after training, the instance settings were searched on the validation images by the
    # selection metric and stored in OUTPUT/best (the weights are those of the best epoch)
    search = info["threshold_search"]
    assert result.threshold_search == search and search["metric"] == "dsb_score"
    assert search["before"]["n_images"] == len(val_samples)
    assert search["after"]["dsb_score"] >= search["before"]["dsb_score"]
    assert info["config"]["instances"] == search["chosen"]
    assert not model.training
    metrics = check_evaluate_output(result.best_checkpoint, prepared, capsys)
    # `evaluate` scores as validation did: same images, same model (the ranks' batch-norm
    # statistics are averaged before validation), same inference path; not bit for bit, as the
    # worker ran torch on 1 thread and this process on several. Validation used the settings
    # the search started from, evaluate the ones it chose.
    # (instance scores may move by a nucleus where a probability sits at a threshold)
    for key, tolerance in (("pixel_f1", 1e-3), ("dsb_score", 0.05), ("f1_50", 0.05)):
        assert search["before"][key] == pytest.approx(info["metrics"][f"val_{key}"], abs=tolerance)
        assert metrics[key] == pytest.approx(search["after"][key], abs=tolerance)


@pytest.mark.timeout(900)
def test_driver_killed_then_rerun_resumes_from_s3(prepared, s3_bucket, ray_local):
    """Checkpoints and outputs on a real S3 endpoint; the driver is killed after the first
    checkpoint; the same command again resumes from S3 instead of starting at epoch 0."""
    output = f"s3://{s3_bucket}/runs/unet"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    flags = [
        "--data", prepared, "--output", output, "--image-size", str(TILE), "--epochs", "2",
        "--batch-size", "4", "--workers", "1", "--scheduler", "constant", "--max-lr", "0.05",
        "--elastic-probability", "0", "--encoder-weights", "none", "--warmup-epochs", "0",
        "--min-steps-per-epoch", "1",
    ]  # fmt: skip
    driver = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "train.py"), *flags], env=env, start_new_session=True
    )
    try:  # killed as soon as Ray Train has registered epoch 1's checkpoint
        _wait_for(lambda: 1 in registered_epochs(output), 300)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver dies mid-run, like a closed laptop
        driver.wait()
    assert io.exists(f"{output}/best/model.pt") and io.exists(f"{output}/metrics.csv")
    model, info = load_model(f"{output}/best")  # loads straight from S3, without Ray
    assert info["metrics"]["epoch"] == 1
    args = build_parser().parse_args(["train", *flags])
    result = run_training(config_from_args(args))
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert result.run_starts == [0, 1]  # the rerun resumed at epoch 1, not at epoch 0


def _wait_for(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise TimeoutError(f"condition not met in {seconds} s")


def test_gpu_training_without_gpus_is_a_usage_error_on_local_ray(
    prepared, ray_local, tmp_path, capsys
):
    """`--gpu` on a machine without GPUs: exit 2 naming the GPUs asked for and found, before any
    training (Ray Train would wait for them forever); a cluster that may still add GPU nodes
    only warns."""
    from unet_ray.core.config import TrainConfig
    from unet_ray.pipelines.train import check_gpus

    assert ray_local.cluster_resources().get("GPU", 0) == 0  # this machine has none
    output = tmp_path / "run"
    flags = ["--data", prepared, "--output", str(output), "--image-size", str(TILE)]
    flags += ["--tile-size", str(TILE), "--encoder-weights", "none", "--workers", "1"]
    assert main(["train", *flags, "--gpu"]) == 2
    error = capsys.readouterr().err
    assert "--gpu needs one GPU per worker, 1 in all, but the Ray cluster has 0" in error
    assert not (output / "metrics.csv").exists()

    two = TrainConfig(use_gpu=True, workers=2)
    check_gpus(two, {"GPU": 2.0}, on_cluster=False)  # enough: nothing to say
    check_gpus(TrainConfig(), {}, on_cluster=False)  # CPU training needs none
    with pytest.raises(ValueError, match="one GPU per worker, 2 in all, but the Ray cluster has 1"):
        check_gpus(two, {"GPU": 1.0}, on_cluster=False)
    check_gpus(two, {"GPU": 1.0}, on_cluster=True)  # a cluster may grow: a warning only


def test_transient_ray_warnings_stay_off_the_console_of_a_quiet_run(monkeypatch):
    """Ray Train's "failed to send resource request ... safe to ignore" traceback (an overloaded
    CPU) reaches Ray Train's log files but not the console of a quiet run: every worker process
    of our Ray starts with ``quiet_worker_logging`` (``worker_process_setup_hook``; not with
    --verbose), whose filter survives Ray Train configuring its loggers with ``dictConfig``."""
    import logging.config

    from unet_ray.runtime.cluster import (
        API_SERVER_ENV,
        QUIET_WORKER_HOOK,
        TRANSIENT_RAY_LOGGERS,
        VERBOSE_ENV,
        quiet_worker_logging,
        worker_runtime_env,
    )

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    assert worker_runtime_env(None) == {"worker_process_setup_hook": QUIET_WORKER_HOOK}
    monkeypatch.setenv(VERBOSE_ENV, "1")
    assert worker_runtime_env("http://127.0.0.1:1") == {
        "env_vars": {API_SERVER_ENV: "http://127.0.0.1:1"}
    }
    assert f"{quiet_worker_logging.__module__}.{quiet_worker_logging.__name__}" == QUIET_WORKER_HOOK

    train_logger = logging.getLogger("ray.train")
    saved = (train_logger.level, train_logger.handlers[:], train_logger.propagate)
    seen: list[int] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.levelno)

    try:
        quiet_worker_logging()  # as the hook runs it in a new worker
        # then Ray Train's controller: `ray.train` at DEBUG to its handlers, whose console drops
        # ray.train records below INFO (dictConfig resets the levels of loggers below it)
        logging.config.dictConfig(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "loggers": {"ray.train": {"level": "DEBUG", "propagate": False}},
            }
        )
        train_logger.addHandler(Keep())
        for name in TRANSIENT_RAY_LOGGERS:
            logging.getLogger(name).warning("Failed to send resource request (probe)")
            logging.getLogger(name).error("a real error (probe)")
    finally:
        train_logger.setLevel(saved[0])
        train_logger.handlers[:] = saved[1]
        train_logger.propagate = saved[2]
    # the warning reaches the handlers (log files) as DEBUG; an error stays an error
    assert seen == [logging.DEBUG, logging.ERROR] * len(TRANSIENT_RAY_LOGGERS)


def test_training_shards_take_the_data_context_options_without_the_deprecated_one():
    """Issue 23 (quiet console): Ray Train's default ingest options copy the deprecated
    ``exclude_resources`` and every training run printed a RayDeprecationWarning; ours carry the
    context's other options and warn about nothing."""
    import warnings

    from ray.data import DataContext

    from unet_ray.pipelines.train import TRAIN_SPLIT, build_data_config

    context = DataContext.get_current()
    saved = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            options = build_data_config(2)._resolve_execution_options(TRAIN_SPLIT)
    finally:
        context.execution_options.preserve_order = saved
    assert options.preserve_order is True
    assert options.resource_limits == context.execution_options.resource_limits
