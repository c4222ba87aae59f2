"""`unet-ray evaluate`: a checkpoint's metrics on DSB2018-layout data or prepared shards. No Ray."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from unet_ray import io
from unet_ray.checkpoint import load_model
from unet_ray.config import Config
from unet_ray.instances import labels_from_probabilities
from unet_ray.metrics import (
    dsb_image_score,
    f1_from_counts,
    instance_counts,
    iou_from_counts,
    pixel_counts,
)
from unet_ray.segment import make_batch_predictor, predict_probabilities
from unet_ray.tiling import plan_whole_image


def predict_whole_image(
    model: torch.nn.Module, image: np.ndarray, device: str = "cpu"
) -> np.ndarray:
    """Whole-image nucleus probabilities (one reflect-padded window) of an RGB uint8 image."""
    height, width = image.shape[:2]
    return predict_probabilities(
        image, plan_whole_image(height, width), make_batch_predictor(model, device), batch_size=1
    )


def iterate_samples(data: str, split: str) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(name, RGB uint8 image, int32 labels) for every sample of a DSB2018 layout or prepared split."""
    from unet_ray.data import is_prepared

    if is_prepared(data):
        yield from _iterate_prepared_tiles(data, split)
        return
    for ref in io.list_dsb_samples(data):
        image, labels = io.read_dsb_sample(ref)
        yield ref.sample_id, image, labels


def _iterate_prepared_tiles(data: str, split: str):
    import pyarrow.parquet as parquet

    filesystem, path = io.resolve_filesystem(io.join_uri(data, split))
    table = parquet.read_table(path, filesystem=filesystem)
    if table.num_rows == 0:
        raise ValueError(f"prepared dataset {data} has no '{split}' tiles")
    for row in table.to_pylist():
        side_h, side_w = row["height"], row["width"]
        image = np.frombuffer(row["image"], dtype=np.uint8).reshape(side_h, side_w, 3)
        labels = np.frombuffer(row["labels"], dtype=np.int32).reshape(side_h, side_w)
        yield row["tile_id"], image, labels


def evaluate_checkpoint(
    checkpoint: str, data: str, split: str = "val", device: str = "cpu"
) -> dict:
    """Pixel F1 / IoU (from counts summed over all images), DSB2018 score and instance F1 at IoU 0.5.

    ``dsb_score`` is the mean over images of the per-image DSB2018 score (mean over IoU thresholds
    0.50:0.05:0.95 of TP / (TP + FP + FN)); ``f1_50`` is computed from instance counts summed over
    all images at IoU 0.5.
    """
    model, info = load_model(checkpoint, device=device)
    instances = Config.from_dict(info.get("config", {})).instances
    totals = np.zeros(6, dtype=np.int64)  # pixel tp, fp, fn, instance tp, fp, fn
    scores = []
    for _name, image, truth in iterate_samples(data, split):
        probabilities = predict_whole_image(model, image, device)
        predicted = labels_from_probabilities(
            probabilities, instances.threshold, instances.min_size, instances.min_distance
        )
        totals[:3] += pixel_counts(probabilities > instances.threshold, truth > 0)
        totals[3:] += instance_counts(truth, predicted, 0.5)
        scores.append(dsb_image_score(truth, predicted))
    if not scores:
        raise ValueError(f"no images to evaluate in {data}")
    return {
        "pixel_f1": f1_from_counts(*totals[:3]),
        "pixel_iou": iou_from_counts(*totals[:3]),
        "dsb_score": float(np.mean(scores)),
        "f1_50": f1_from_counts(*totals[3:]),
        "n_images": len(scores),
        "checkpoint": checkpoint,
        "data": data,
    }
