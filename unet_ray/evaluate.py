"""Per-image scores through the segmentation inference path, and `unet-ray evaluate`. No Ray.

Validation during training and `unet-ray evaluate` score whole source images at native size,
tiled exactly as `unet-ray segment` tiles them, because the DSB2018 score is a mean over images:
averaging over 256-px tiles weights big images more and cuts nuclei at tile borders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from unet_ray import io
from unet_ray.core.config import EVALUATE_SPLITS, Config, InstanceConfig, SegmentConfig
from unet_ray.core.instances import contour_target
from unet_ray.core.metrics import (
    dsb_image_score,
    f1_from_counts,
    instance_counts,
    iou_from_counts,
    pixel_counts,
)
from unet_ray.core.tiling import predict_tiled
from unet_ray.io.checkpoint import load_model
from unet_ray.segment import labels_from_maps, make_batch_predictor, plan_image, sigmoid_in_place

COUNT_KEYS = ("tp", "fp", "fn", "inst_tp", "inst_fp", "inst_fn")


def predict_logits(
    model, image: np.ndarray, segment: SegmentConfig, device: str, channels_last: bool = True
) -> np.ndarray:
    """Whole-image logits (C x H x W float32, one channel per head output) of an RGB uint8
    image, tiled as `segment` tiles it."""
    height, width = image.shape[:2]
    return predict_tiled(
        image,
        plan_image(height, width, segment),
        make_batch_predictor(model, str(device), channels_last),
        segment.batch_size,
    )


def score_image(
    name: str, probabilities: np.ndarray, truth: np.ndarray, instances: InstanceConfig
) -> dict[str, Any]:
    """One image's row: pixel and instance counts, pixel F1, instance F1 at IoU 0.5, DSB score,
    from its C x H x W probabilities; the predicted mask is the union of the predicted nuclei,
    as `unet-ray segment` writes it."""
    predicted = labels_from_maps(probabilities, instances)
    tp, fp, fn = pixel_counts(predicted > 0, truth > 0)
    inst_tp, inst_fp, inst_fn = instance_counts(truth, predicted, 0.5)
    return {
        "image": name,
        "pixel_f1": f1_from_counts(tp, fp, fn),
        "dsb_score": dsb_image_score(truth, predicted),
        "f1_50": f1_from_counts(inst_tp, inst_fp, inst_fn),
        "nuclei_true": int(len(np.unique(truth[truth > 0]))),
        "nuclei_pred": int(predicted.max()) if predicted.size else 0,
        **dict(zip(COUNT_KEYS, (tp, fp, fn, inst_tp, inst_fp, inst_fn), strict=True)),
    }


def summarise_scores(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Pixel F1 / IoU from counts summed over all images, ``dsb_score`` the mean of the images'
    DSB2018 scores, ``f1_50`` from instance counts summed over all images, ``n_images``."""
    if not rows:
        raise ValueError("no images were scored")
    totals = {key: sum(row[key] for row in rows) for key in COUNT_KEYS}
    return {
        "pixel_f1": f1_from_counts(totals["tp"], totals["fp"], totals["fn"]),
        "pixel_iou": iou_from_counts(totals["tp"], totals["fp"], totals["fn"]),
        "dsb_score": float(np.mean([row["dsb_score"] for row in rows])),
        "f1_50": f1_from_counts(totals["inst_tp"], totals["inst_fp"], totals["inst_fn"]),
        "n_images": len(rows),
    }


def iterate_samples(
    data: str, split: str, recorded: dict[str, list[str]] | None = None
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(name, RGB uint8 image, int32 labels) of the images of ``split``.

    Prepared shards: their whole validation images (``val``). A raw DSB2018 layout: ``all`` its
    samples, or the ``val`` / ``train`` images of the split recorded in the checkpoint
    (``recorded``, the sample ids `prepare` put in each split).
    """
    from unet_ray.io.prepared import is_prepared, read_split_images

    if split not in EVALUATE_SPLITS:
        raise ValueError(f"--split {split!r} is not one of {EVALUATE_SPLITS}")
    if is_prepared(data):
        if split != "val":
            raise ValueError(
                f"prepared shards {data} keep whole images of the validation split only: use "
                f"--split val, or evaluate the raw DSB2018 layout with --split {split}"
            )
        yield from read_split_images(data)
        return
    refs = io.list_dsb_samples(data)
    if split != "all":
        if not recorded or split not in recorded:
            raise ValueError(
                f"the checkpoint records no {split!r} split to pick images of {data} by: pass "
                f"--split all, or the prepared shards it was trained on"
            )
        wanted = set(recorded[split])
        refs = [ref for ref in refs if ref.sample_id in wanted]
        if not refs:
            raise ValueError(
                f"none of the checkpoint's {len(wanted)} {split!r} images is in {data}: is it "
                f"the dataset the model was trained on? (--split all scores every image)"
            )
    for ref in refs:
        image, labels = io.read_dsb_sample(ref)
        yield ref.sample_id, image, labels


def evaluate_checkpoint(
    checkpoint: str,
    data: str,
    split: str = "val",
    device: str = "cpu",
    overrides: Callable[[InstanceConfig], InstanceConfig] | None = None,
) -> dict[str, Any]:
    """Scores of a checkpoint on the images of ``split`` (see ``iterate_samples``), each image
    segmented whole as `unet-ray segment` does, with the checkpoint's instance settings
    (``overrides`` may change them: the CLI's flags).

    Returns ``summarise_scores`` plus ``split``, ``checkpoint``, ``data`` and ``per_image`` (one
    row per image: its id, pixel F1, DSB2018 score, instance F1 at IoU 0.5, nuclei counts).
    """
    model, info = load_model(checkpoint, device=device)
    config = Config.from_dict(info.get("config", {}))
    instances = overrides(config.instances) if overrides else config.instances
    rows = []
    for name, image, truth in iterate_samples(data, split, info.get("samples")):
        probabilities = sigmoid_in_place(predict_logits(model, image, config.segment, device))
        rows.append(score_image(name, probabilities, truth, instances))
    if not rows:
        raise ValueError(f"no images to evaluate in {data}")
    return {
        **summarise_scores(rows),
        "split": split,
        "head": config.model.head,
        "instances": dataclasses.asdict(instances),
        "checkpoint": checkpoint,
        "data": data,
        "per_image": [
            {key: value for key, value in row.items() if key not in COUNT_KEYS} for row in rows
        ],
    }


def validation_loss(loss_function, logits: np.ndarray, truth: np.ndarray) -> float:
    """The training loss of one whole image's C x H x W logits against the targets derived
    from its labels as in training (``image_targets``)."""
    with torch.inference_mode():
        return float(
            loss_function(
                torch.from_numpy(logits)[None],
                torch.from_numpy(image_targets(truth, len(logits)))[None],
            )
        )


def image_targets(labels: np.ndarray, channels: int) -> np.ndarray:
    """float32 C x H x W targets of an instance label image: the nucleus mask, then (two
    channels) the nucleus contour."""
    targets = [labels > 0]
    if channels > 1:
        targets.append(contour_target(labels))
    return np.stack(targets).astype(np.float32)
