"""`unet-ray evaluate`: a checkpoint scored on annotated images through the inference path. No Ray.

Validation during training and `unet-ray evaluate` score whole source images at native size,
tiled exactly as `unet-ray segment` tiles them, because the DSB2018 score is a mean over images:
averaging over 256-px tiles weights big images more and cuts nuclei at tile borders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from unet_ray import io
from unet_ray.core.config import EVALUATE_SPLITS, Config, InstanceConfig
from unet_ray.inference import (
    COUNT_KEYS,
    image_probabilities,
    make_batch_predictor,
    score_image,
    summarise_scores,
)
from unet_ray.io.checkpoint import load_model
from unet_ray.io.prepared import is_prepared, read_split_images


def iterate_samples(
    data: str, split: str, recorded: dict[str, list[str]] | None = None
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(name, RGB uint8 image, int32 labels) of the images of ``split``.

    Prepared shards: their whole validation images (``val``). A raw DSB2018 layout: ``all`` its
    samples, or the ``val`` / ``train`` images of the split recorded in the checkpoint
    (``recorded``, the sample ids `prepare` put in each split).
    """
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
    tta: bool | None = None,
) -> dict[str, Any]:
    """Scores of a checkpoint on the images of ``split`` (see ``iterate_samples``), each image
    segmented whole as `unet-ray segment` does, with the checkpoint's instance settings
    (``overrides`` may change them: the CLI's flags) and test-time augmentation as its
    ``segment.tta`` says unless ``tta`` is given.

    Returns ``summarise_scores`` plus ``split``, ``checkpoint``, ``data`` and ``per_image`` (one
    row per image: its id, pixel F1, DSB2018 score, instance F1 at IoU 0.5, nuclei counts).
    """
    model, info = load_model(checkpoint, device=device)
    config = Config.from_dict(info.get("config", {}))
    instances = overrides(config.instances) if overrides else config.instances
    segment = config.segment if tta is None else dataclasses.replace(config.segment, tta=tta)
    predict_batch = make_batch_predictor(model, str(device), tta=segment.tta)
    rows = []
    for name, image, truth in iterate_samples(data, split, info.get("samples")):
        probabilities = image_probabilities(image, predict_batch, segment)
        rows.append(score_image(name, probabilities, truth, instances))
    if not rows:
        raise ValueError(f"no images to evaluate in {data}")
    return {
        **summarise_scores(rows),
        "split": split,
        "head": config.model.head,
        "instances": dataclasses.asdict(instances),
        "tta": segment.tta,
        "checkpoint": checkpoint,
        "data": data,
        "per_image": [
            {key: value for key, value in row.items() if key not in COUNT_KEYS} for row in rows
        ],
    }
