"""What runs in each Ray Train worker: the model built or resumed, epochs of DDP training on the
worker's shard, validation on whole images through ``unet_ray.inference`` (each image scored by
exactly one rank), checkpoints reported to Ray Train, and the run outputs (metrics.csv,
curves.png, TensorBoard, ``best/``). Fault injection for the drills lives here too."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io as _bytes_io
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from unet_ray import io
from unet_ray.core.config import Config
from unet_ray.core.losses import build_loss, head_targets
from unet_ray.core.model import is_pretrained, parameter_groups, use_sync_batchnorm
from unet_ray.core.schedules import config_learning_rate, step_epoch
from unet_ray.inference import (
    image_logits,
    make_batch_predictor,
    normalise_images,
    score_image,
    select_device,
    sigmoid_in_place,
    summarise_scores,
    validation_loss,
)
from unet_ray.io.checkpoint import MODEL_FILE, build_model, save_checkpoint
from unet_ray.io.prepared import VAL_SPLIT, read_split_images
from unet_ray.runtime.cluster import quiet_worker_logging

STATE_FILE = "training_state.pt"  # optimizer state, epoch, history: only for resuming
RUN_NAME = "ray_train"  # Ray Train's run folder under OUTPUT; same name + storage -> resume
BEST_DIR = "best"
METRICS_CSV = "metrics.csv"
CURVES_PNG = "curves.png"
TENSORBOARD_DIR = "tensorboard"
# running maximum of the epoch's `train.best_metric` (val_<metric>): what Tune's ASHA and Optuna
# compare trials on, the same name whichever metric the run selects by
BEST_SCORE_METRIC = "best_val_score"
# running maximum of val_pixel_f1, the metric searches ranked trials by before `best_metric`: a
# search started then and restored now still finds the metric its pickled scheduler expects
LEGACY_SEARCH_METRIC = "best_val_pixel_f1"
VAL_IMAGES_CSV = "val_images.csv"  # per-image validation scores of the latest epoch
# training batches Ray Data prepares ahead of the step (pinned and on their way to the GPU)
TRAIN_PREFETCH_BATCHES = 2


# Fault injection for tests and drills: the last rank dies (os._exit) early in this epoch
# (1-based), once: the marker file records that it already happened.
FAIL_AT_EPOCH_ENV = "UNET_RAY_FAIL_AT_EPOCH"
FAIL_MARKER_ENV = "UNET_RAY_FAIL_MARKER"


# The injected crash waits until Ray Train has registered the previous epoch's checkpoint.
FAULT_REGISTER_TIMEOUT_S = 300.0
FAULT_POLL_S = 0.2
CHECKPOINT_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2, in the run folder


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


IMAGE_COLUMNS = ("epoch", "image", "pixel_f1", "dsb_score", "f1_50", "nuclei_true", "nuclei_pred")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build model and optimiser, resume if a checkpoint exists, run epochs."""
    import ray.train
    import ray.train.torch

    if not loop_config.get("verbose"):
        quiet_worker_logging()
    config = Config.from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    is_rank_zero = rank == 0
    if config.train.use_gpu:
        select_device(True)  # strict --gpu: a worker whose torch sees no CUDA fails the run
    device = ray.train.torch.get_device()

    model, optimizer, state = _build_or_resume(config, device)
    state["run_starts"].append(state["epoch"])
    model = prepare_training_model(model, config, device, world_size)
    loss_function = build_loss(config.train.loss, config.train.contour_weight)
    per_worker_batch = per_worker_batch_size(config.train.batch_size, world_size)
    steps_per_epoch = steps_per_worker_epoch(
        loop_config["train_tiles"] * loop_config["copies"], world_size, per_worker_batch
    )
    train_batches = stream_batches(
        ray.train.get_dataset_shard("train"),
        per_worker_batch,
        device,
        config.train.shuffle_buffer_tiles,
    )
    val_samples = loop_config["samples"][VAL_SPLIT]
    writer = _open_tensorboard(config.train.output, state["epoch"]) if is_rank_zero else None

    for epoch in range(state["epoch"], config.train.epochs):
        _maybe_inject_failure(
            loop_config.get("fault_injection", {}), epoch, rank, world_size, config.train.output
        )
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
        average_buffers(model, world_size)  # one model on every rank for validation and saving
        summary, image_rows = validate_images(
            getattr(model, "module", model),
            loss_function,
            loop_config["prepared"],
            val_samples,
            config,
            device,
            rank,
            world_size,
        )
        train_loss = _all_reduce_mean(train_loss, world_size, device)
        metrics, is_best = _record_epoch(
            state, epoch, last_lr, train_loss, summary, started, config.train.best_metric
        )
        _report_epoch(
            model,
            optimizer,
            state,
            config,
            metrics,
            is_rank_zero,
            writer,
            is_best,
            loop_config["samples"],
            image_rows,
            print_progress=loop_config.get("progress_lines", True),
        )
    train_batches.close()  # ends the Ray Data execution still streaming unused passes
    if writer is not None:
        writer.close()


def prepare_training_model(model, config: Config, device: torch.device, world_size: int):
    """The model as DDP trains it: SyncBatchNorm when several GPU workers use it; on a GPU
    channels-last with ``cudnn.benchmark`` (training shapes are fixed, so cuDNN's search pays
    once); wrapped by Ray Train (DDP, the device)."""
    import ray.train.torch

    if use_sync_batchnorm(config.train.sync_batchnorm, config.train.use_gpu, world_size):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)
    return ray.train.torch.prepare_model(model)


def _record_epoch(
    state: dict[str, Any],
    epoch: int,
    last_lr: float,
    train_loss: float,
    summary: dict[str, Any],
    started: float,
    best_metric: str,
) -> tuple[dict[str, Any], bool]:
    """The epoch's metrics row, appended to ``state``'s history with the running best of
    ``best_metric``; and whether this epoch is the best so far (``is_better``)."""
    is_best = all(is_better(summary, row, best_metric) for row in state["history"])
    best = max(
        [summary[best_metric], *(row[score_metric(best_metric)] for row in state["history"])]
    )
    metrics = {
        "epoch": epoch + 1,
        "lr": last_lr,
        "train_loss": train_loss,
        **{f"val_{name}": value for name, value in summary.items() if name != "n_images"},
        "val_images": summary["n_images"],
        BEST_SCORE_METRIC: best,
        LEGACY_SEARCH_METRIC: max(
            [summary["pixel_f1"], *(row["val_pixel_f1"] for row in state["history"])]
        ),
        "seconds": round(time.perf_counter() - started, 2),
    }
    state["epoch"] = epoch + 1
    state["history"].append(metrics)
    return metrics, is_best


def score_metric(best_metric: str) -> str:
    """The metrics-row key of a ``train.best_metric``: ``val_dsb_score`` etc."""
    return f"val_{best_metric}"


def is_better(summary: dict[str, Any], row: dict[str, Any], best_metric: str) -> bool:
    """Whether an epoch's validation ``summary`` beats an earlier epoch's metrics ``row``: a
    higher ``best_metric``; on a tie (a young model's DSB score is 0.0 for several epochs), a
    higher pixel F1. Computed from the history, so a run resumed with another --best-metric
    compares by the new one."""
    ours = (summary[best_metric], summary["pixel_f1"])
    theirs = (row[score_metric(best_metric)], row["val_pixel_f1"])
    return ours > theirs


def _build_or_resume(config: Config, device: torch.device):
    """Model and optimiser, restored from Ray Train's latest checkpoint when there is one.

    SGD with momentum over ``parameter_groups``: a pretrained encoder learns at
    ``encoder_lr_scale`` times the decoder's rate; batch-norm weights and biases get no weight
    decay. On resume, the digest of the restored weights is recorded (``state["resumes"]``), so a
    drill can check that they are exactly the checkpoint's.
    """
    import ray.train

    model = build_model(config.model).to(device)
    encoder_scale = config.train.encoder_lr_scale if is_pretrained(config.model) else 1.0
    optimizer = torch.optim.SGD(
        parameter_groups(model, config.train.weight_decay, encoder_scale),
        lr=config.train.max_lr,
        momentum=config.train.momentum,
    )
    state = {
        "epoch": 0,
        "history": [],
        "run_starts": [],
        "digests": {},
        "resumes": [],
    }
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            model.load_state_dict(
                torch.load(Path(directory) / MODEL_FILE, map_location=device, weights_only=True)
            )
            saved = torch.load(Path(directory) / STATE_FILE, map_location=device, weights_only=True)
        optimizer.load_state_dict(saved.pop("optimizer"))
        state = {**state, **saved}
        state["resumes"].append({"epoch": state["epoch"], "digest": weights_digest(model)})
        print(f"[unet_ray] resuming from the checkpoint of epoch {state['epoch']}", flush=True)
    return model, optimizer, state


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 (hex, 16 digits) over a model's state-dict tensors in key order."""
    model = getattr(model, "module", model)
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


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
    """Each worker's share of the global batch (``config.check_batch_divides`` made it exact)."""
    return max(1, batch_size // world_size)


def stream_batches(shard, batch_size: int, device: torch.device, shuffle_tiles: int = 1):
    """This worker's augmented training batches, without end, mixed in a shuffle buffer of
    ``shuffle_tiles`` tiles.

    The training dataset holds one pass over the tiles per epoch
    (``build_training_datasets(passes=...)``), so one Ray Data execution feeds the epochs one
    after another and the pipeline's start-up stalls only the run's first batch. Should the
    passes run out (e.g. an epoch rounds its share up to whole batches), the next execution
    starts (``training_passes`` reads enough that this should not happen); every worker holds
    the same number of rows, so all of them would restart at the same step.

    Batches are uint8 (``data.to_model_batch``); on a GPU they are collated into pinned memory
    and copied to the device without blocking (Ray's default), ``TRAIN_PREFETCH_BATCHES``
    ahead of the step; ``device_batch`` then normalises them there.
    """
    on_cuda = torch.device(device).type == "cuda"
    while True:
        batches = 0
        for batch in shard.iter_torch_batches(
            batch_size=batch_size,
            device=device,
            drop_last=False,
            local_shuffle_buffer_size=max(shuffle_tiles, batch_size),
            prefetch_batches=TRAIN_PREFETCH_BATCHES,
            pin_memory=on_cuda,
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
    returns the mean loss and the last (decoder) learning rate. Each parameter group learns at
    the schedule's rate times its ``lr_scale``. The losses are summed on the device and read
    once at the end of the epoch (no host sync per step)."""
    model.train()
    total_loss, lr = torch.zeros((), device=device), config.train.max_lr
    for step in range(steps_per_epoch):
        batch = device_batch(next(batches), device)
        lr = config_learning_rate(config.train, step_epoch(epoch, step, steps_per_epoch))
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        with _autocast(device):
            logits = model(batch["image"])
            loss = loss_function(logits.float(), head_targets(batch, logits.shape[1]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        total_loss += loss.detach()
    return float(total_loss) / steps_per_epoch, lr


def device_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A training batch as the model and loss take it: a uint8 image normalised on the device
    (``inference.normalise_images``; channels-last on a GPU, as the model is), a float mask,
    labels as they came (only the contour head has them). Float batches pass unchanged."""
    image = batch["image"]
    if image.dtype == torch.uint8:
        image = normalise_images(image)
    if torch.device(device).type == "cuda":
        image = image.contiguous(memory_format=torch.channels_last)
    return {**batch, "image": image, "mask": batch["mask"].float()}


def rank_share(sample_ids: list[str], rank: int, world_size: int) -> list[str]:
    """The validation images one rank scores: every ``world_size``-th of the sorted ids from
    ``rank`` on, so each image is scored by exactly one rank (a rank may get none)."""
    return sorted(sample_ids)[rank::world_size]


def validate_images(
    model,
    loss_function,
    prepared: str,
    val_samples: list[str],
    config: Config,
    device: torch.device,
    rank: int,
    world_size: int,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Validation on whole images at native size, each scored by exactly one rank.

    Each rank reads only its share of the validation images (``rank_share``), segments them as
    `unet-ray segment` does and scores them (``inference.score_image``); one all-gather brings every
    rank all rows, so every rank makes the same number of collective calls whatever its share
    (also none). ``model`` is the unwrapped module: evaluation runs no DDP collectives. Returns
    ``(summary, rows)``: ``summarise_scores`` plus ``loss`` (pixel-weighted), and one row per
    image sorted by image id.
    """
    # eval mode; channels-last on a GPU, the memory format the model trained in
    predict_batch = make_batch_predictor(model, str(device))
    rows = []
    for name, image, truth in read_split_images(
        prepared, rank_share(val_samples, rank, world_size)
    ):
        logits = image_logits(image, predict_batch, config.segment)
        loss = validation_loss(loss_function, logits, truth, device)
        row = score_image(name, sigmoid_in_place(logits), truth, config.instances)
        rows.append({**row, "loss": loss, "pixels": truth.size, "rank": rank})
    rows = _all_gather_rows(rows, world_size)
    rows.sort(key=lambda row: row["image"])
    summary = summarise_scores(rows)
    pixels = sum(row["pixels"] for row in rows)
    summary["loss"] = sum(row["loss"] * row["pixels"] for row in rows) / pixels
    return summary, rows


def average_buffers(model: torch.nn.Module, world_size: int) -> None:
    """Average the batch-norm running statistics over the ranks (one all-reduce).

    DDP broadcasts rank 0's buffers before each training forward, but the last step then updates
    every rank's statistics with its own batch: without this, the ranks would validate slightly
    different models and the checkpoint would hold only rank 0's statistics.
    """
    if world_size == 1:
        return
    buffers = [buffer for buffer in model.buffers() if buffer.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([buffer.detach().reshape(-1) for buffer in buffers])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    offset = 0
    with torch.no_grad():
        for buffer in buffers:
            buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
            offset += buffer.numel()


def _all_gather_rows(rows: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    if world_size == 1:
        return rows
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, rows)
    return [row for rank_rows in gathered for row in rank_rows]


def _all_reduce_mean(value: float, world_size: int, device) -> float:
    if world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return float(tensor.item()) / world_size


def _autocast(device: torch.device):
    """bf16 mixed precision on GPU; a no-op context on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def registered_epochs(output: str) -> set[int]:
    """Epochs whose checkpoints Ray Train has registered for the run in OUTPUT (from its
    checkpoint-manager snapshot); empty before the first."""
    uri = io.join_uri(output, RUN_NAME, CHECKPOINT_SNAPSHOT_FILE)
    try:
        snapshot = json.loads(io.read_bytes(uri))
    except (FileNotFoundError, OSError, ValueError):
        return set()
    epochs: set[int] = set()

    def walk(value) -> None:
        if isinstance(value, dict):
            metrics = value.get("metrics")
            if isinstance(metrics, dict) and isinstance(metrics.get("epoch"), int):
                epochs.add(metrics["epoch"])
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and value.startswith(("{", "[")):
            with contextlib.suppress(ValueError):
                walk(json.loads(value))

    walk(snapshot)
    return epochs


def _maybe_inject_failure(
    fault: dict[str, Any], epoch: int, rank: int, world_size: int, output: str
) -> None:
    """Fault drill: the last rank dies at the start of epoch ``fault["epoch"]`` (1-based), once,
    as soon as Ray Train has registered the previous epoch's checkpoint (a crash before that may
    take the last report with it, and the drill would test nothing).

    With ``fault["hold"]`` (node-loss drill) it writes its node's id into the marker instead and
    waits there, mid-epoch, for the drill to take that node away."""
    if not fault.get("epoch") or epoch + 1 != int(fault["epoch"]) or rank != world_size - 1:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    deadline = time.monotonic() + FAULT_REGISTER_TIMEOUT_S
    while epoch > 0 and epoch not in registered_epochs(output):
        if time.monotonic() > deadline:
            raise RuntimeError(f"fault drill: epoch {epoch}'s checkpoint was never registered")
        time.sleep(FAULT_POLL_S)
    if fault.get("hold"):
        _hold_for_node_loss(marker, rank, epoch)
    marker.write_text(f"rank {rank} killed early in epoch {epoch + 1}\n")
    print(f"[unet_ray] fault injection: rank {rank} exits in epoch {epoch + 1}", flush=True)
    os._exit(1)


def _hold_for_node_loss(marker: Path, rank: int, epoch: int) -> None:
    """Node-loss drill: say which node this rank runs on (the marker holds the node id), then
    wait until the drill removes that node, which ends this process."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    io.write_bytes_atomic(str(marker), f"{node_id}\n".encode())
    print(f"[unet_ray] fault injection: rank {rank} waits in epoch {epoch + 1}", flush=True)
    time.sleep(FAULT_REGISTER_TIMEOUT_S)
    raise RuntimeError(f"fault drill: node {node_id} of the waiting rank was never removed")


def _report_epoch(
    model,
    optimizer,
    state,
    config: Config,
    metrics,
    is_rank_zero,
    writer,
    is_best: bool,
    samples: dict[str, list[str]],
    image_rows: list[dict[str, Any]],
    print_progress: bool = True,
) -> None:
    """Log the epoch, write the run outputs and OUTPUT/best (rank 0), report a checkpoint to Ray.

    ``print_progress`` False: the driver shows the epochs (a bar on its terminal), not rank 0.

    The digest of the weights saved for each epoch goes into the training state
    (``state["digests"]``), so that a resumed run can be checked against it."""
    import ray.train

    if not is_rank_zero:
        ray.train.report(metrics)  # every rank must report: it is a barrier
        return
    if print_progress:
        print(format_progress(metrics, config.train.epochs), flush=True)
    state["digests"][str(metrics["epoch"])] = weights_digest(model)
    write_run_outputs(config.train.output, state["history"])
    image_csv = per_image_csv(metrics["epoch"], image_rows)
    io.write_bytes_atomic(io.join_uri(config.train.output, VAL_IMAGES_CSV), image_csv)
    _log_tensorboard(writer, config.train.output, metrics)
    if is_best:  # a plain folder that loads without Ray, kept current while training runs
        best = io.join_uri(config.train.output, BEST_DIR)
        save_checkpoint(best, model, config.to_dict(), metrics, samples)
        io.write_bytes_atomic(io.join_uri(best, VAL_IMAGES_CSV), image_csv)
    with tempfile.TemporaryDirectory(prefix="unet_ray_ckpt_") as directory:
        save_checkpoint(directory, model, config.to_dict(), metrics, samples)
        torch.save({**state, "optimizer": optimizer.state_dict()}, Path(directory) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def per_image_csv(epoch: int, rows: list[dict[str, Any]]) -> bytes:
    """One epoch's per-image validation scores as CSV (``IMAGE_COLUMNS``)."""
    text = _bytes_io.StringIO()
    writer = csv.DictWriter(text, fieldnames=IMAGE_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**row, "epoch": epoch} for row in rows)
    return text.getvalue().encode()


def format_progress(metrics: dict[str, Any], epochs: int) -> str:
    return (
        f"[unet_ray] epoch {metrics['epoch']}/{epochs}  lr {metrics['lr']:.4g}  "
        f"train_loss {metrics['train_loss']:.4f}  val_loss {metrics['val_loss']:.4f}  "
        f"val_f1 {metrics['val_pixel_f1']:.4f}  val_iou {metrics['val_pixel_iou']:.4f}  "
        f"val_dsb {metrics['val_dsb_score']:.4f}  val_f1_50 {metrics['val_f1_50']:.4f}  "
        f"({metrics['seconds']:.1f} s)"
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


def read_history(output: str) -> list[dict[str, Any]]:
    """OUTPUT/metrics.csv as one dict per epoch (numbers as numbers); [] before the first."""
    try:
        text = io.read_bytes(io.join_uri(output, METRICS_CSV)).decode()
    except (FileNotFoundError, OSError, UnicodeDecodeError):
        return []
    rows = []
    for row in csv.DictReader(_bytes_io.StringIO(text)):
        with contextlib.suppress(ValueError, TypeError):
            rows.append({key: float(value) for key, value in row.items()})
    for row in rows:
        row["epoch"] = int(row["epoch"])
    return rows
