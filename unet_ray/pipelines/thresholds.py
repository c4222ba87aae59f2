"""Instance settings chosen on annotated images and stored in the checkpoint.

After training (``pipelines.train``, on OUTPUT/best), after a search (``pipelines.tune``, on its
best/) and by `unet-ray thresholds CHECKPOINT DATA --output NEW` (a user's own annotated images),
the checkpoint's model predicts each image once, whole and tiled as `unet-ray segment` tiles
(``inference.image_probabilities``, with test-time augmentation when asked), and
``inference.search_instance_settings`` picks threshold, the head's splitting parameter and minimum
size by the checkpoint's selection metric (``train.best_metric``). The chosen values replace the
checkpoint's ``instances`` section, which `evaluate` and `segment` use unless a flag overrides,
and ``config.json`` keeps the search's record (``threshold_search``: metric, chosen values,
scores before and after, images, TTA). The weights are never touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any

import torch

from unet_ray import io
from unet_ray.core.config import Config
from unet_ray.inference import (
    SearchResult,
    image_probabilities,
    make_batch_predictor,
    search_instance_settings,
    select_device,
)
from unet_ray.io.checkpoint import CONFIG_FILE, MODEL_FILE, load_model
from unet_ray.pipelines.evaluate import iterate_samples

logger = logging.getLogger(__name__)

SEARCH_RECORD = "threshold_search"  # config.json key of the search's record
DIGEST_CHARS = 16  # SHA-256 prefix of model.pt the record names: the weights it was searched for


def search_checkpoint(
    checkpoint: str,
    data: str,
    output: str | None = None,
    split: str = "val",
    device: str = "cpu",
    tta: bool | None = None,
    metric: str | None = None,
) -> dict[str, Any]:
    """Search the instance settings of ``checkpoint`` on the annotated images of ``data``
    (``split`` as `evaluate` picks them) and write the checkpoint with them to ``output``
    (default: ``checkpoint`` itself, only its ``config.json`` rewritten). ``tta`` and ``metric``
    default to the checkpoint's ``segment.tta`` and ``train.best_metric``. Returns the record
    stored under ``threshold_search``; a checkpoint written in place whose record names these
    very weights, data, split, TTA and metric is not searched again."""
    output = output or checkpoint
    model_bytes = io.read_bytes(io.join_uri(checkpoint, MODEL_FILE))
    model, info = load_model(checkpoint, device=device, model_bytes=model_bytes)
    config = Config.from_dict(info.get("config", {}))
    tta = config.segment.tta if tta is None else tta
    metric = metric or config.train.best_metric
    request = {
        "data": data,
        "split": split,
        "tta": tta,
        "weights_sha256": hashlib.sha256(model_bytes).hexdigest()[:DIGEST_CHARS],
    }
    done = info.get(SEARCH_RECORD) or {}
    if output == checkpoint and done.get("metric") == metric and _same(done, request):
        logger.info("%s: instance settings already searched for these weights", checkpoint)
        return done
    result = _search(model, config, data, split, info.get("samples"), str(device), tta, metric)
    record = {**result.record(), **request}
    config.instances = result.instances
    config.segment.tta = tta
    if output != checkpoint:
        io.make_dirs(output)
        io.write_bytes_atomic(io.join_uri(output, MODEL_FILE), model_bytes)
    saved = {**info, "config": config.to_dict(), SEARCH_RECORD: record}
    io.write_bytes_atomic(
        io.join_uri(output, CONFIG_FILE), json.dumps(saved, indent=2, default=float).encode()
    )
    return record


def _same(done: dict[str, Any], request: dict[str, Any]) -> bool:
    return all(done.get(key) == value for key, value in request.items())


def _search(
    model, config: Config, data, split, samples, device: str, tta: bool, metric: str
) -> SearchResult:
    """Probability maps of every image (once), then the search over them."""
    predict_batch = make_batch_predictor(model, device, tta=tta)
    segment = dataclasses.replace(config.segment, tta=tta)
    maps = [
        (name, image_probabilities(image, predict_batch, segment), truth)
        for name, image, truth in iterate_samples(data, split, samples)
    ]
    return search_instance_settings(maps, config.instances, metric)


def search_checkpoint_task(
    checkpoint: str, data: str, use_gpu: bool, threads: int, **options
) -> dict[str, Any]:
    """``search_checkpoint`` in a Ray task (on a GPU node when ``use_gpu``): the driver of a
    cluster job may run where there is neither a GPU nor the CPUs for it. The task asks for
    one training worker's resources (``threads`` CPUs, one GPU), a shape the cluster has just
    run: a request larger than any one node (all workers' CPUs together) would wait forever."""
    import ray

    def task() -> dict[str, Any]:
        torch.set_num_threads(max(1, threads))
        # strict, as every --gpu path: no CUDA where the task landed is an error, not a CPU run
        return search_checkpoint(checkpoint, data, device=select_device(use_gpu), **options)

    remote = ray.remote(num_cpus=threads, num_gpus=1 if use_gpu else 0, max_retries=1)(task)
    return ray.get(remote.remote())


# Below this many images a search's choice is mostly their noise: in benchmarks/accuracy.py
# (2 validation images, 2 seeds) the searched settings scored lower on held-out images than the
# defaults (README, Results)
FEW_SEARCH_IMAGES = 10


def describe_search(record: dict[str, Any]) -> str:
    """One line for the console: the metric before and after, and the chosen values."""
    metric = record["metric"]
    chosen = ", ".join(
        f"{key}={record['chosen'][key]}"
        for key in ("threshold", "core_ratio", "contour_threshold", "min_size")
    )
    images = record["before"]["n_images"]
    line = (
        f"instance settings searched on {images} annotated image(s)"
        f"{' with TTA' if record['tta'] else ''}: {metric} {record['before'][metric]:.4f} -> "
        f"{record['after'][metric]:.4f} ({chosen})"
    )
    if images < FEW_SEARCH_IMAGES:
        line += (
            f"; chosen on fewer than {FEW_SEARCH_IMAGES} images, they may fit these images and "
            "not others: score held-out images with `unet-ray evaluate` (--threshold etc. "
            "override), search more with `unet-ray thresholds`, or keep the defaults with "
            "--no-instance-search"
        )
    return line
