"""Distributed training on Ray Train: the per-worker loop, checkpoints, resume and run outputs."""

from __future__ import annotations

import csv
import io as _bytes_io
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unet_ray import io
from unet_ray.checkpoint import CONFIG_FILE, MODEL_FILE, save_checkpoint
from unet_ray.config import Config
from unet_ray.losses import build_loss
from unet_ray.metrics import dsb_image_score, f1_from_counts, instance_counts, iou_from_counts
from unet_ray.schedules import learning_rate

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"  # optimizer state, epoch, history: only for resuming
RUN_NAME = "ray_train"  # Ray Train's run folder under OUTPUT; same name + storage -> resume
BEST_DIR = "best"
METRICS_CSV = "metrics.csv"
CURVES_PNG = "curves.png"
TENSORBOARD_DIR = "tensorboard"
SCORE_METRIC = "val_pixel_f1"
DATA_CPUS = 1  # a training run's Ray Data pipeline (read + augment) needs one CPU of its own
SHUFFLE_BATCHES = 4  # training tiles are shuffled within a buffer of this many batches
# Fault injection for tests and drills: the last rank dies (os._exit) early in this epoch
# (1-based), once: the marker file records that it already happened.
FAIL_AT_EPOCH_ENV = "UNET_RAY_FAIL_AT_EPOCH"
FAIL_MARKER_ENV = "UNET_RAY_FAIL_MARKER"
# The injected crash comes this long into the epoch, like a real one: a worker that dies within
# Ray Train's health-check interval (2 s) of its last report can take that report with it.
FAULT_DELAY_S = 6.0
EPOCH_COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "val_loss",
    "val_pixel_f1",
    "val_pixel_iou",
    "val_dsb_score",
    "val_f1_50",
    "val_images",
    "seconds",
)


@dataclass
class TrainResult:
    output: str
    best_checkpoint: str  # OUTPUT/best: a plain folder that loads without Ray
    metrics: dict[str, Any]  # the best epoch's metrics
    history: list[dict[str, Any]]  # one row per epoch, as in metrics.csv
    run_starts: list[int]  # epoch each (re)start of the workers began at: [0] for one clean run


# ----------------------------------------------------------------------------- worker side


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build model and optimiser, resume if a checkpoint exists, run epochs."""
    import ray.train
    import ray.train.torch

    config = Config.from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    is_rank_zero = rank == 0
    device = ray.train.torch.get_device()

    model, optimizer, state = _build_or_resume(config, device)
    state["run_starts"].append(state["epoch"])
    model = ray.train.torch.prepare_model(model)
    loss_function = build_loss(config.train.loss)
    per_worker_batch = per_worker_batch_size(config.train.batch_size, world_size)
    steps_per_epoch = steps_per_worker_epoch(
        loop_config["train_tiles"], world_size, per_worker_batch
    )
    train_batches = stream_batches(ray.train.get_dataset_shard("train"), per_worker_batch, device)
    writer = _open_tensorboard(config.train.output, state["epoch"]) if is_rank_zero else None

    for epoch in range(state["epoch"], config.train.epochs):
        _maybe_inject_failure(loop_config.get("fault_injection", {}), epoch, rank, world_size)
        started = time.perf_counter()
        train_loss, last_lr = train_one_epoch(
            model,
            optimizer,
            loss_function,
            train_batches,
            config,
            epoch,
            steps_per_epoch,
            device,
        )
        val = evaluate_shard(
            model,
            loss_function,
            ray.train.get_dataset_shard("val"),
            config,
            per_worker_batch,
            device,
            rank,
            world_size,
        )
        metrics = {
            "epoch": epoch + 1,
            "lr": last_lr,
            "train_loss": _all_reduce_mean(train_loss, world_size, device),
            **{f"val_{name}": value for name, value in val.items()},
            "seconds": round(time.perf_counter() - started, 2),
        }
        state["epoch"] = epoch + 1
        state["history"].append(metrics)
        is_best = metrics[SCORE_METRIC] > state["best_f1"]
        state["best_f1"] = max(state["best_f1"], metrics[SCORE_METRIC])
        _report_epoch(model, optimizer, state, config, metrics, is_rank_zero, writer, is_best)
    train_batches.close()  # ends the Ray Data execution still streaming unused passes
    if writer is not None:
        writer.close()


def _build_or_resume(config: Config, device: torch.device):
    """Model and optimiser, restored from Ray Train's latest checkpoint when there is one."""
    import ray.train

    from unet_ray.model import build_model

    model = build_model(config.model).to(device)
    optimizer = torch.optim.SGD(
        [parameter for parameter in model.parameters() if parameter.requires_grad],
        lr=config.train.max_lr,
        momentum=config.train.momentum,
        weight_decay=config.train.weight_decay,
    )
    state = {"epoch": 0, "history": [], "best_f1": -1.0, "run_starts": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            model.load_state_dict(
                torch.load(Path(directory) / MODEL_FILE, map_location=device, weights_only=True)
            )
            saved = torch.load(Path(directory) / STATE_FILE, map_location=device, weights_only=True)
        optimizer.load_state_dict(saved.pop("optimizer"))
        state = saved
        print(f"[unet_ray] resuming from the checkpoint of epoch {state['epoch']}", flush=True)
    return model, optimizer, state


def steps_per_worker_epoch(train_tiles: int, world_size: int, batch_size: int) -> int:
    """Optimiser steps in one epoch: enough batches of ``batch_size`` for every worker to see its
    share of the training tiles (Ray splits them equally, dropping a remainder) once."""
    return max(1, math.ceil((train_tiles // world_size) / batch_size))


def training_passes(epochs: int, train_tiles: int, world_size: int, batch_size: int) -> int:
    """Passes over the training tiles that one training run reads: enough that no worker's share
    (Ray splits the rows of all passes equally) runs out before ``epochs`` epochs of
    ``steps_per_worker_epoch`` steps, which round each epoch up to whole batches."""
    steps = steps_per_worker_epoch(train_tiles, world_size, batch_size)
    rows_per_worker = epochs * steps * batch_size
    return max(1, math.ceil(rows_per_worker * world_size / train_tiles))


def per_worker_batch_size(batch_size: int, world_size: int) -> int:
    """Each worker's share of the global batch (at least one)."""
    return max(1, batch_size // world_size)


def stream_batches(shard, batch_size: int, device: torch.device):
    """This worker's augmented training batches, without end.

    The training dataset holds one pass over the tiles per epoch
    (``build_training_datasets(passes=...)``), so one Ray Data execution feeds the epochs one
    after another and the pipeline's start-up stalls only the run's first batch. Should the
    passes run out (e.g. an epoch rounds its share up to whole batches), the next execution
    starts (``training_passes`` reads enough that this should not happen); every worker holds
    the same number of rows, so all of them would restart at the same step.
    """
    while True:
        batches = 0
        for batch in shard.iter_torch_batches(
            batch_size=batch_size,
            device=device,
            drop_last=False,
            local_shuffle_buffer_size=SHUFFLE_BATCHES * batch_size,
        ):
            batches += 1
            yield batch
        if not batches:
            raise RuntimeError("this worker's training shard is empty: too few tiles per worker")


def train_one_epoch(
    model,
    optimizer,
    loss_function,
    batches,
    config: Config,
    epoch: int,
    steps_per_epoch: int,
    device: torch.device,
) -> tuple[float, float]:
    """``steps_per_epoch`` steps on batches from ``stream_batches`` (augmented anew by Ray Data);
    returns the mean loss and the last learning rate."""
    model.train()
    total_loss, lr = 0.0, config.train.max_lr
    for step in range(steps_per_epoch):
        batch = next(batches)
        lr = learning_rate(
            config.train.scheduler,
            epoch + step / steps_per_epoch,
            config.train.max_lr,
            config.train.min_lr,
            config.train.restart_epochs,
            config.train.cycle_epochs,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        with _autocast(device):
            logits = model(batch["image"])
            loss = loss_function(logits.float(), batch["mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        total_loss += float(loss.detach())
    return total_loss / steps_per_epoch, lr


def evaluate_shard(
    model,
    loss_function,
    shard,
    config: Config,
    batch_size: int,
    device: torch.device,
    rank: int,
    world_size: int,
) -> dict[str, float]:
    """Validation metrics over the whole validation split, summed exactly across workers.

    The validation dataset is not split by Ray; every worker reads it all and evaluates the
    batches whose index modulo the world size is its rank, so each tile counts exactly once.
    """
    model.eval()
    sums = {
        "loss": 0.0,
        "images": 0.0,
        "tp": 0.0,
        "fp": 0.0,
        "fn": 0.0,
        "dsb": 0.0,
        "inst_tp": 0.0,
        "inst_fp": 0.0,
        "inst_fn": 0.0,
    }
    with torch.inference_mode():
        for index, batch in enumerate(
            shard.iter_torch_batches(batch_size=batch_size, device=device, drop_last=False)
        ):
            if index % world_size != rank:
                continue
            with _autocast(device):
                logits = model(batch["image"]).float()
            count = logits.shape[0]
            sums["loss"] += float(loss_function(logits, batch["mask"])) * count
            sums["images"] += count
            _accumulate_image_metrics(
                sums,
                torch.sigmoid(logits)[:, 0].cpu().numpy(),
                batch["labels"].cpu().numpy(),
                config,
            )
    totals = _all_reduce_sums(sums, world_size, device)
    images = max(totals["images"], 1.0)
    return {
        "loss": totals["loss"] / images,
        "pixel_f1": f1_from_counts(totals["tp"], totals["fp"], totals["fn"]),
        "pixel_iou": iou_from_counts(totals["tp"], totals["fp"], totals["fn"]),
        "dsb_score": totals["dsb"] / images,
        "f1_50": f1_from_counts(totals["inst_tp"], totals["inst_fp"], totals["inst_fn"]),
        "images": int(totals["images"]),
    }


def _accumulate_image_metrics(sums, probabilities, true_labels, config: Config) -> None:
    from unet_ray.instances import labels_from_probabilities
    from unet_ray.metrics import pixel_counts

    instances = config.instances
    for probability, truth in zip(probabilities, true_labels, strict=True):
        tp, fp, fn = pixel_counts(probability > instances.threshold, truth > 0)
        predicted = labels_from_probabilities(
            probability, instances.threshold, instances.min_size, instances.min_distance
        )
        inst_tp, inst_fp, inst_fn = instance_counts(truth, predicted, 0.5)
        sums["tp"] += tp
        sums["fp"] += fp
        sums["fn"] += fn
        sums["dsb"] += dsb_image_score(truth, predicted)
        sums["inst_tp"] += inst_tp
        sums["inst_fp"] += inst_fp
        sums["inst_fn"] += inst_fn


def _all_reduce_sums(sums: dict[str, float], world_size: int, device) -> dict[str, float]:
    if world_size == 1:
        return dict(sums)
    keys = sorted(sums)
    tensor = torch.tensor([sums[key] for key in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist(), strict=True))


def _all_reduce_mean(value: float, world_size: int, device) -> float:
    return _all_reduce_sums({"value": value}, world_size, device)["value"] / world_size


def _autocast(device: torch.device):
    """bf16 mixed precision on GPU; a no-op context on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _maybe_inject_failure(fault: dict[str, Any], epoch: int, rank: int, world_size: int) -> None:
    if not fault.get("epoch") or epoch + 1 != int(fault["epoch"]) or rank != world_size - 1:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(f"rank {rank} killed early in epoch {epoch + 1}\n")
    print(f"[unet_ray] fault injection: rank {rank} exits in epoch {epoch + 1}", flush=True)
    time.sleep(FAULT_DELAY_S)
    os._exit(1)


def _report_epoch(
    model, optimizer, state, config: Config, metrics, is_rank_zero, writer, is_best: bool
) -> None:
    """Log the epoch, write the run outputs and OUTPUT/best (rank 0), report a checkpoint to Ray."""
    import ray.train

    if not is_rank_zero:
        ray.train.report(metrics)  # every rank must report: it is a barrier
        return
    print(format_progress(metrics, config.train.epochs), flush=True)
    write_run_outputs(config.train.output, state["history"])
    _log_tensorboard(writer, config.train.output, metrics)
    if is_best:  # a plain folder that loads without Ray, kept current while training runs
        save_checkpoint(
            io.join_uri(config.train.output, BEST_DIR), model, config.to_dict(), metrics
        )
    with tempfile.TemporaryDirectory(prefix="unet_ray_ckpt_") as directory:
        save_checkpoint(directory, model, config.to_dict(), metrics)
        torch.save({**state, "optimizer": optimizer.state_dict()}, Path(directory) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def format_progress(metrics: dict[str, Any], epochs: int) -> str:
    return (
        f"[unet_ray] epoch {metrics['epoch']}/{epochs}  lr {metrics['lr']:.4g}  "
        f"train_loss {metrics['train_loss']:.4f}  val_loss {metrics['val_loss']:.4f}  "
        f"val_f1 {metrics['val_pixel_f1']:.4f}  val_iou {metrics['val_pixel_iou']:.4f}  "
        f"val_dsb {metrics['val_dsb_score']:.4f}  ({metrics['seconds']:.1f} s)"
    )


def _open_tensorboard(output: str, start_epoch: int):
    from tensorboardX import SummaryWriter

    local = output if not io.is_s3(output) else tempfile.mkdtemp(prefix="unet_ray_tb_")
    return SummaryWriter(
        logdir=str(Path(local) / TENSORBOARD_DIR), purge_step=start_epoch + 1, flush_secs=5
    )


def _log_tensorboard(writer, output: str, metrics: dict[str, Any]) -> None:
    if writer is None:
        return
    for name, value in metrics.items():
        if name not in ("epoch", "seconds"):
            writer.add_scalar(name.replace("_", "/", 1), value, metrics["epoch"])
    writer.flush()
    if io.is_s3(output):  # mirror the event files to object storage after every epoch
        logdir = Path(writer.logdir)
        for event_file in logdir.glob("events.*"):
            io.write_bytes_atomic(
                io.join_uri(output, TENSORBOARD_DIR, event_file.name), event_file.read_bytes()
            )


# ----------------------------------------------------------------------------- run outputs


def write_run_outputs(output: str, history: list[dict[str, Any]]) -> None:
    """OUTPUT/metrics.csv (one row per epoch) and OUTPUT/curves.png."""
    text = _bytes_io.StringIO()
    writer = csv.DictWriter(text, fieldnames=EPOCH_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    io.write_bytes_atomic(io.join_uri(output, METRICS_CSV), text.getvalue().encode())
    io.write_bytes_atomic(io.join_uri(output, CURVES_PNG), plot_curves(history))


def plot_curves(history: list[dict[str, Any]]) -> bytes:
    """Train/val loss and validation F1, IoU and DSB score against epochs, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axes, score_axes) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axes.plot(epochs, [row["train_loss"] for row in history], "o-", label="train loss")
    loss_axes.plot(epochs, [row["val_loss"] for row in history], "o-", label="validation loss")
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("loss")
    loss_axes.legend()
    for key, label in (
        ("val_pixel_f1", "pixel F1 (Dice)"),
        ("val_pixel_iou", "pixel IoU"),
        ("val_dsb_score", "DSB2018 score"),
    ):
        score_axes.plot(epochs, [row[key] for row in history], "o-", label=label)
    score_axes.set_xlabel("epoch")
    score_axes.set_ylabel("validation score")
    score_axes.set_ylim(0, 1)
    score_axes.legend()
    figure.tight_layout()
    buffer = _bytes_io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- driver side


def resolve_training_data(config: Config) -> str:
    """The prepared-shards URI for this run: given shards, raw DSB2018 prepared on the fly, or
    (no --data) a synthetic dataset generated into OUTPUT/synthetic and prepared."""
    from unet_ray.data import ensure_prepared
    from unet_ray.synth import write_synthetic_dataset

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
        from unet_ray.io import list_dsb_samples

        return bool(list_dsb_samples(source))
    except (ValueError, FileNotFoundError, OSError):
        return False


def build_trainer(config: Config, prepared: str, callbacks=None, fault_injection=None):
    """A TorchTrainer for this config; Ray Train's run lives in OUTPUT/ray_train."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from unet_ray.data import build_training_datasets, read_dataset_info

    info = read_dataset_info(prepared)
    if not info["val"]["tiles"]:
        raise ValueError(
            f"prepared dataset {prepared} has no validation tiles; raise --val-fraction"
        )
    workers = config.train.workers
    passes = training_passes(
        config.train.epochs,
        info["train"]["tiles"],
        workers,
        per_worker_batch_size(config.train.batch_size, workers),
    )
    datasets = build_training_datasets(prepared, config.data, passes=passes)
    filesystem, storage_path = io.resolve_filesystem(config.train.output)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.to_dict(),
            "train_tiles": info["train"]["tiles"],
            "fault_injection": fault_injection or _fault_injection_from_env(),
        },
        scaling_config=ScalingConfig(
            num_workers=config.train.workers,
            use_gpu=config.train.use_gpu,
            resources_per_worker={
                "CPU": config.train.cpus_per_worker,
                **({"GPU": 1} if config.train.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=storage_path,
            storage_filesystem=filesystem if io.is_s3(config.train.output) else None,
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=max(1, config.train.checkpoints_to_keep - 1),
                checkpoint_score_attribute=SCORE_METRIC,
                checkpoint_score_order="max",
            ),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=build_data_config(workers),
    )


def build_data_config(workers: int):
    """Ray Train's dataset options: the training set is split among the workers (equal rows
    each); validation is not (``evaluate_shard``). One worker reads the training set itself:
    splitting it for one starts a coordinator actor per run (5-8 s of a short run on 2 cores)
    that only passes the same rows on."""
    import ray.train

    from unet_ray.data import TRAIN_SPLIT

    return ray.train.DataConfig(datasets_to_split=[TRAIN_SPLIT] if workers > 1 else [])


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


def init_ray(min_cpus: int = 1) -> None:
    """Connect to RAY_ADDRESS when set (a cluster, `ray job submit`); otherwise start local Ray
    with at least ``min_cpus`` logical CPUs, so that e.g. two training workers on a 2-core laptop
    still leave a CPU for Ray Data instead of waiting for one forever."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, min_cpus))


def run_training(config: Config, fault_injection: dict[str, Any] | None = None) -> TrainResult:
    """Train, or resume when OUTPUT already holds a run (same command, same --output)."""
    import ray

    init_ray(required_cpus(config))
    available = ray.cluster_resources().get("CPU", 0)
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
    result = build_trainer(config, prepared, fault_injection=fault_injection).fit()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    return collect_result(config.train.output, result)


def collect_result(output: str, result) -> TrainResult:
    """The run's best metrics (OUTPUT/best, written by rank 0 whenever validation F1 improved) and
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
    )


def _latest_state(result) -> dict[str, Any]:
    """History and restarts, from Ray Train's latest checkpoint of the run."""
    if result.checkpoint is None:
        return {"history": [], "run_starts": []}
    with result.checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    return {"history": state["history"], "run_starts": state["run_starts"]}
