"""The training driver: data resolved (synthetic when none is given, prepared on the fly), one
``TorchTrainer`` built and run on Ray Train (resuming a rerun of the same OUTPUT), the console's
epoch bar, and the result collected. What runs inside each worker is ``pipelines.train_loop``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unet_ray import io
from unet_ray.core.config import HEAD_MASK_CONTOUR, Config, TrainConfig
from unet_ray.core.schedules import mid_cycle_warning
from unet_ray.io.checkpoint import CONFIG_FILE, record_encoder_weights
from unet_ray.io.dsb import list_dsb_samples
from unet_ray.io.prepared import TRAIN_SPLIT, VAL_SPLIT, read_dataset_info
from unet_ray.io.synth import write_synthetic_dataset
from unet_ray.pipelines.data import build_training_datasets, ensure_prepared, tile_copies
from unet_ray.pipelines.thresholds import describe_search, search_checkpoint_task
from unet_ray.pipelines.train_loop import (
    BEST_DIR,
    FAIL_AT_EPOCH_ENV,
    FAIL_MARKER_ENV,
    RUN_NAME,
    STATE_FILE,
    format_progress,
    per_worker_batch_size,
    read_history,
    score_metric,
    train_loop_per_worker,
    training_passes,
)
from unet_ray.runtime.cluster import (
    check_gpu_count,
    check_local_cuda,
    init_ray,
    is_verbose,
    on_cluster,
)
from unet_ray.runtime.progress import Progress, is_terminal

logger = logging.getLogger(__name__)

DATA_CPUS = 1  # a training run's Ray Data pipeline (read + augment) needs one CPU of its own
EPOCH_POLL_S = 2.0  # on a terminal, the driver's epoch bar looks at OUTPUT/metrics.csv this often


@dataclass
class TrainResult:
    output: str
    best_checkpoint: str  # OUTPUT/best: a plain folder that loads without Ray
    metrics: dict[str, Any]  # the best epoch's metrics
    history: list[dict[str, Any]]  # one row per epoch, as in metrics.csv
    run_starts: list[int]  # epoch each (re)start of the workers began at: [0] for one clean run
    # the latest checkpoint's training state: "digests" (epoch -> weights digest saved) and
    # "resumes" (epoch and digest of the weights each restart restored)
    state: dict[str, Any]
    # the instance-settings search on the validation images, as stored in OUTPUT/best
    # (``pipelines.thresholds``); None with train.search_instances off
    threshold_search: dict[str, Any] | None = None


# ----------------------------------------------------------------------------- worker side


# ----------------------------------------------------------------------------- run outputs


# ----------------------------------------------------------------------------- driver side


def resolve_training_data(config: Config) -> str:
    """The prepared-shards URI for this run: given shards, raw DSB2018 prepared on the fly, or
    (no --data) a synthetic dataset generated into OUTPUT/synthetic and prepared."""
    output, data = config.train.output, config.data
    source = data.source
    if source is None:
        source = io.join_uri(output, "synthetic", "stage1_train")
        if not _has_samples(source):
            logger.info(
                "no --data given: generating %d synthetic images in %s", data.synth_count, source
            )
            write_synthetic_dataset(
                source,
                count=data.synth_count,
                seed=data.seed,
                min_side=max(64, data.tile_size // 2),
                max_side=max(96, data.tile_size * 2),
            )
    return ensure_prepared(
        source, io.join_uri(output, "prepared"), data.tile_size, data.val_fraction, data.seed
    )


def _has_samples(source: str) -> bool:
    try:
        return bool(list_dsb_samples(source))
    except (ValueError, FileNotFoundError, OSError):
        return False


def build_trainer(
    config: Config,
    prepared: str,
    callbacks=None,
    fault_injection=None,
    progress_lines=True,
    gpus_per_worker: float = 1.0,
):
    """A TorchTrainer for this config; Ray Train's run lives in OUTPUT/ray_train.

    ``gpus_per_worker`` with ``--gpu``: Tune's trials may share a GPU (``--gpus-per-trial``).

    An epoch is at least ``train.min_steps_per_epoch`` steps: a small set is drawn ``copies``
    times per epoch (``data.tile_copies``), each draw a new random crop and augmentation.
    ``progress_lines`` False: rank 0 prints no line per epoch (the driver shows a bar instead).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    info = read_dataset_info(prepared)
    if not info[VAL_SPLIT]["samples"]:
        raise ValueError(
            f"prepared dataset {prepared} has no validation images; raise --val-fraction"
        )
    workers = config.train.workers
    train_tiles = info[TRAIN_SPLIT]["tiles"]
    per_worker_batch = per_worker_batch_size(config.train.batch_size, workers)
    copies = tile_copies(train_tiles, workers, per_worker_batch, config.train.min_steps_per_epoch)
    passes = training_passes(config.train.epochs, train_tiles * copies, workers, per_worker_batch)
    datasets = build_training_datasets(
        prepared,
        config.data,
        passes=passes,
        copies=copies,
        labels=config.model.head == HEAD_MASK_CONTOUR,  # only the contour target needs them
    )
    filesystem, storage_path = io.resolve_filesystem(config.train.output)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.to_dict(),
            "prepared": prepared,
            "train_tiles": train_tiles,
            "copies": copies,
            "samples": {split: list(info[split]["samples"]) for split in (TRAIN_SPLIT, VAL_SPLIT)},
            "fault_injection": fault_injection or _fault_injection_from_env(),
            "verbose": is_verbose(),
            "progress_lines": progress_lines,
        },
        scaling_config=ScalingConfig(
            num_workers=config.train.workers,
            use_gpu=config.train.use_gpu,
            resources_per_worker={
                "CPU": config.train.cpus_per_worker,
                **({"GPU": gpus_per_worker} if config.train.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=storage_path,
            storage_filesystem=filesystem if io.is_s3(config.train.output) else None,
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=max(1, config.train.checkpoints_to_keep - 1),
                checkpoint_score_attribute=score_metric(config.train.best_metric),
                checkpoint_score_order="max",
            ),
            callbacks=callbacks,
            # quiet unless verbose: Ray Train's INFO lines (one per report) stay in its log files
            logging_config=LoggingConfig(log_level="INFO" if is_verbose() else "WARNING"),
            # our progress lines are plain prints: no rerouting through Train's logger (which
            # printed each line twice)
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
        datasets=datasets,
        dataset_config=build_data_config(workers),
    )


def prepare_run_config(config: Config) -> Config:
    """The run's config with the encoder weights resolved and recorded (file name and SHA-256
    prefix; ``imagenet`` may download them into the hub cache once), before any worker starts:
    unavailable weights are a usage error now, not a crash in every worker. Warns when the run
    ends in the middle of a learning-rate cycle."""
    train = config.train
    warning = mid_cycle_warning(
        train.scheduler,
        train.epochs,
        train.restart_epochs,
        train.restart_cycles,
        train.cycle_epochs,
    )
    if warning:
        logger.warning(warning)
    return dataclasses.replace(config, model=record_encoder_weights(config.model))


def build_data_config(workers: int):
    """Ray Train's dataset options: the training set is split among the workers (equal rows
    each); validation is not a Ray dataset (``validate_images``). One worker reads the training set itself:
    splitting it for one starts a coordinator actor per run (5-8 s of a short run on 2 cores)
    that only passes the same rows on."""
    import ray.train

    return ray.train.DataConfig(
        datasets_to_split=[TRAIN_SPLIT] if workers > 1 else [],
        execution_options=ingest_options(),
    )


def ingest_options():
    """Ray Data's options for the training set's shards: what Ray Train's defaults
    (``DataConfig.default_ingest_options``) carry over from the data context, less the deprecated
    ``exclude_resources`` (zero unless set), whose copy made every training run print a
    RayDeprecationWarning."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    return ExecutionOptions(
        resource_limits=current.resource_limits,
        preserve_order=current.preserve_order,
        verbose_progress=current.verbose_progress,
    )


def _fault_injection_from_env() -> dict[str, Any]:
    if not os.environ.get(FAIL_AT_EPOCH_ENV):
        return {}
    return {
        "epoch": int(os.environ[FAIL_AT_EPOCH_ENV]),
        "marker": os.environ.get(
            FAIL_MARKER_ENV, os.path.join(tempfile.gettempdir(), "unet_ray_fail")
        ),
    }


def required_cpus(config: Config) -> int:
    """CPUs one training run needs: its workers' plus one for the Ray Data pipeline."""
    return config.train.workers * config.train.cpus_per_worker + DATA_CPUS


def check_gpus(train: TrainConfig, cluster: dict[str, float], on_cluster: bool) -> None:
    """``--gpu`` asks one GPU per worker. Local Ray has what this machine has, so too few is a
    usage error (Ray Train would wait for them forever); a cluster may still add GPU nodes
    (autoscaling), so there it is a warning (``runtime.cluster.check_gpu_count``)."""
    if train.use_gpu:
        check_gpu_count(train.workers, cluster, on_cluster, "one GPU per worker", "lower --workers")


def run_training(config: Config, fault_injection: dict[str, Any] | None = None) -> TrainResult:
    """Train, or resume when OUTPUT already holds a run (same command, same --output)."""
    import ray

    io.check_writable(config.train.output)  # a bad OUTPUT is exit 2 before any work
    config = prepare_run_config(config)
    init_ray(required_cpus(config))
    cluster = ray.cluster_resources()
    check_gpus(config.train, cluster, on_cluster=on_cluster())
    check_local_cuda(config.train.use_gpu)  # GPUs in Ray, but torch sees no CUDA: exit 2
    available = cluster.get("CPU", 0)
    if available < required_cpus(config):
        logger.warning(
            "the Ray cluster has %s CPUs but %d workers x %d CPUs + %d for Ray Data are needed: "
            "training waits until the cluster grows; lower --workers otherwise",
            available,
            config.train.workers,
            config.train.cpus_per_worker,
            DATA_CPUS,
        )
    io.make_dirs(config.train.output)
    io.write_bytes_atomic(
        io.join_uri(config.train.output, "config.json"),
        json.dumps(config.to_dict(), indent=2).encode(),
    )
    prepared = resolve_training_data(config)
    show_bar = is_terminal()  # a bar here; otherwise rank 0 prints one line per epoch
    trainer = build_trainer(
        config, prepared, fault_injection=fault_injection, progress_lines=not show_bar
    )
    bar = EpochBar(config.train.output, config.train.epochs) if show_bar else None
    with bar or contextlib.nullcontext():
        result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    collected = collect_result(config.train.output, result)
    if config.train.search_instances:
        collected.threshold_search = search_checkpoint_task(
            collected.best_checkpoint,
            prepared,
            config.train.use_gpu,
            config.train.cpus_per_worker,
            metric=config.train.best_metric,
        )
        logger.info(describe_search(collected.threshold_search))
    return collected


class EpochBar:
    """On a terminal: a tqdm bar over the run's epochs while training runs (``with``), with each
    epoch's line above it, fed from OUTPUT/metrics.csv (rank 0 rewrites it after every epoch)."""

    def __init__(self, output: str, epochs: int):
        self.output, self.epochs = output, epochs
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._poll, name="unet_ray-epoch-bar", daemon=True)

    def __enter__(self):
        self.done = len(read_history(self.output))  # a resumed run starts the bar there
        self.progress = Progress("train", self.epochs, unit="epoch", initial=self.done, bar=True)
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stopped.set()
        self.thread.join()
        self.progress.close()

    def _poll(self) -> None:
        while True:
            last_look = self.stopped.wait(EPOCH_POLL_S)  # once more after training ended
            history = read_history(self.output)
            for row in history[self.done :]:
                summary = f"val_f1 {row['val_pixel_f1']:.4f} val_dsb {row['val_dsb_score']:.4f}"
                self.progress.update(summary=summary, line=format_progress(row, self.epochs))
            self.done = max(self.done, len(history))
            if last_look:
                return


def collect_result(output: str, result) -> TrainResult:
    """The run's best metrics (OUTPUT/best, written by rank 0 whenever ``train.best_metric``
    improved) and
    its epoch history (from the latest checkpoint)."""
    best_uri = io.join_uri(output, BEST_DIR)
    best_info = json.loads(io.read_bytes(io.join_uri(best_uri, CONFIG_FILE)))
    state = _latest_state(result)
    return TrainResult(
        output=output,
        best_checkpoint=best_uri,
        metrics=best_info["metrics"],
        history=state["history"],
        run_starts=state["run_starts"],
        state=state,
    )


def _latest_state(result) -> dict[str, Any]:
    """The training state (history, restarts, digests), from Ray Train's latest checkpoint."""
    if result.checkpoint is None:
        return {"history": [], "run_starts": [], "digests": {}, "resumes": []}
    with result.checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    state.pop("optimizer", None)
    return state
