"""The Ray Data batch-segmentation job: list images, tile, infer, label and write, in two stages.

The driver holds only paths: it lists INPUT (a folder, an ``s3://`` prefix or one image file),
skips images whose five outputs already exist in OUTPUT, and feeds the rest, one row per image,
through two stages that Ray Data runs at the same time:

1. a pool of ``SegmentActor``s (one model each, GPU when asked, else CPU): each reads its image,
   cuts it into tiles (``unet_ray.inference`` over ``core.tiling``), runs them through the model a batch of tiles at a
   time while stitching the logits into one C x H x W map, and passes the probabilities (float16)
   on;
2. ``FinishImages`` workers on CPUs: instance labels (``unet_ray.core.instances``) and the five outputs
   (``unet_ray.io.writers``), each file whole.

So an actor (and its GPU) infers the next image while CPU workers post-process the last one
(``benchmarks/bench_segment.py`` measures the overlap). Every failure of one image becomes an
``error`` row; the driver writes ``manifest.csv``.
"""

from __future__ import annotations

import dataclasses
import io as bytes_io
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from unet_ray import io
from unet_ray.core.config import InstanceConfig, SegmentConfig, SlideConfig
from unet_ray.core.resample import model_scale, probabilities_at_scale
from unet_ray.core.tiling import check_tile_geometry
from unet_ray.inference import (
    GpuUnavailableError,
    image_maps,
    image_probabilities,
    labels_from_maps,
    make_batch_predictor,
    select_device,
    serialised,
)
from unet_ray.io.files import is_file
from unet_ray.io.images import read_image_with_pixel_size
from unet_ray.io.slide_reader import SLIDE_SUFFIXES
from unet_ray.io.writers import (
    MANIFEST_NAME,
    MANIFEST_STATUSES,
    OUTPUT_SUFFIXES,
    STATUS_ERROR,
    STATUS_OK,
    STATUS_SKIPPED,
    encode_outputs,
    image_stem,
    manifest_row,
    output_names,
    read_previous_nuclei,
    write_manifest,
)
from unet_ray.pipelines.slides import partition_inputs, segment_slides, training_mpp
from unet_ray.runtime.batch import (
    MAP_DTYPE,
    TASKS_IN_FLIGHT_PER_ACTOR,
    UNKNOWN_NUCLEI,
    actor_gpus,
    actor_stage,
    columns_of,
    default_cpus_per_worker,
    describe_error,
    finish_workers,
    gpus_needed,
    job_data_context,
    limit_worker_threads,
    one_line,
    post_task_cpus,
)
from unet_ray.runtime.cluster import check_gpu_request
from unet_ray.runtime.progress import Progress

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED = 0, 1


# ----------------------------------------------------------------------------- inference


# ----------------------------------------------------------------------------- one image


class SegmentActor:
    """Stage 1, a Ray Data actor: one model, loaded once; each call reads a batch of images and
    infers their probability maps, which travel on (float16) to ``FinishImages`` so that the
    actor (and its GPU) goes on to the next image while CPU workers post-process and write.

    Two calls run at once (``CONCURRENT_CALLS``, threads): while one image's tile batches are on
    the device, the other call reads, decodes and tiles the next image; the forward passes take
    turns (``inference.serialised``), so the maps are those of a serial actor. The sigmoid and
    the cast to float16 run on the GPU before the copy back.

    Strict ``--gpu``: an actor whose torch sees no CUDA device segments nothing; every image it
    is given becomes an error row naming the reason (a cluster job; local Ray exits 2 first).
    """

    CONCURRENT_CALLS = 2  # calls at once per actor (``runtime.batch.actor_stage``)

    def __init__(self, checkpoint: str, segment: dict[str, Any], threads: int = 1):
        self.segment = SegmentConfig(**segment)
        self.unusable = ""
        try:
            select_device(self.segment.use_gpu)
        except GpuUnavailableError as error:
            self.unusable = str(error)
            logger.error("inference actor %s: %s", os.getpid(), error)
            return
        predict_maps, info = load_predictor(checkpoint, self.segment, threads)
        self.predict_maps = serialised(predict_maps)
        self.model_mpp = training_mpp(info)  # images of a known pixel size are rescaled to it

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return columns_of([self.infer_one(str(uri)) for uri in batch["input"]])

    def infer_one(self, uri: str) -> dict[str, Any]:
        """Read and infer one image; a failure becomes an error row (empty arrays)."""
        started = time.time()
        try:
            if self.unusable:
                raise GpuUnavailableError(self.unusable)
            image, original, image_mpp = read_image_with_pixel_size(uri)
            probabilities = probabilities_at_scale(
                image,
                model_scale(self.segment.image_mpp or image_mpp, self.model_mpp),
                lambda pixels: image_maps(pixels, self.predict_maps, self.segment),
            )
        except Exception as error:  # one bad image must never abort the dataset
            return {**failed_row(uri, error, started), **empty_maps()}
        return {
            **manifest_row(uri, STATUS_OK, seconds=time.time() - started),
            "probabilities": probabilities.astype(MAP_DTYPE),
            "image": image,
            "original": b"" if original is image else encode_array(original),
            "mpp": self.segment.image_mpp or image_mpp or np.nan,  # the outputs' pixel size
            "infer_start": started,
            "infer_end": time.time(),
        }


def load_predictor(
    checkpoint: str, segment: SegmentConfig, threads: float = 1
) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
    """The inference actors' predictor and the checkpoint's info: the model on ``segment``'s
    device (strict ``--gpu``), uint8 windows -> float16 probabilities (sigmoid and cast on the
    device), with TTA as ``segment.tta`` says; on the CPU ``threads`` torch threads."""
    import torch

    # lazy: io.checkpoint pulls in torch (~650 MB RSS), which the post-processing workers
    # that import this module never need
    from unet_ray.io.checkpoint import load_model

    device = select_device(segment.use_gpu)
    if device == "cpu":  # a fractional CPU share rounds to whole threads
        torch.set_num_threads(max(1, min(round(threads), os.cpu_count() or 1)))
    model, info = load_model(checkpoint, device=device)
    return make_batch_predictor(model, device, tta=segment.tta, probabilities=True), info


class FinishImages:
    """Stage 2, Ray Data tasks on CPUs: instance labels from the maps, then the five outputs
    written; a failure becomes an error row. One OpenCV thread per worker
    (``limit_worker_threads``): the pool has a worker per free CPU."""

    def __init__(self, output_uri: str, instances: dict[str, Any]):
        limit_worker_threads()
        self.output_uri = output_uri
        self.instances = InstanceConfig(**instances)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = []
        for index, uri in enumerate(batch["input"]):
            row = {column: batch[column][index] for column in batch}
            rows.append(self.finish_one(str(uri), row))
        return columns_of(rows)

    def finish_one(self, uri: str, row: dict[str, Any]) -> dict[str, Any]:
        started = time.time()
        inferred = float(row["infer_end"]) - float(row["infer_start"])
        if row["status"] != STATUS_OK:
            return {**plain_row(row), **timing(row, started)}
        try:
            original = decode_array(row["original"]) if len(row["original"]) else None
            mpp = float(row["mpp"]) if np.isfinite(row["mpp"]) else None
            nuclei = finish_image(
                uri,
                self.output_uri,
                row["image"],
                row["probabilities"],
                self.instances,
                original,
                mpp,
            )
        except Exception as error:  # one bad image must never abort the dataset
            failed = failed_row(uri, error, started)
            failed["seconds"] = round(inferred + failed["seconds"], 3)
            return {**failed, **timing(row, started)}
        finished = manifest_row(uri, STATUS_OK, "", nuclei, inferred + time.time() - started)
        return {**finished, **timing(row, started)}


TIMING_COLUMNS = ("infer_start", "infer_end", "post_start", "post_end")  # time.time() stamps


def failed_row(uri: str, error: Exception, started: float) -> dict[str, Any]:
    unexpected = not isinstance(error, io.ImageReadError)  # a bad file needs no traceback
    logger.warning("segmenting %s failed: %s", uri, error, exc_info=unexpected)
    return manifest_row(uri, STATUS_ERROR, describe_error(error), seconds=time.time() - started)


def empty_maps() -> dict[str, Any]:
    """The array columns of a row that has none (every block keeps one schema)."""
    now = time.time()
    return {
        "probabilities": np.zeros((0, 0, 0), dtype=MAP_DTYPE),
        "image": np.zeros((0, 0, 3), dtype=np.uint8),
        "original": b"",
        "mpp": np.nan,
        "infer_start": now,
        "infer_end": now,
    }


def timing(row: dict[str, Any], started: float) -> dict[str, float]:
    return {
        "infer_start": float(row["infer_start"]),
        "infer_end": float(row["infer_end"]),
        "post_start": started,
        "post_end": time.time(),
    }


def plain_row(row: dict[str, Any]) -> dict[str, Any]:
    """A manifest row from a dataset row (numpy scalars to Python values)."""
    nuclei = row["nuclei"]
    return manifest_row(
        str(row["input"]),
        str(row["status"]),
        str(row["message"]),
        "" if nuclei == "" or int(nuclei) == UNKNOWN_NUCLEI else int(nuclei),
        float(row["seconds"]),
    )


def encode_array(array: np.ndarray) -> bytes:
    buffer = bytes_io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def decode_array(data: bytes) -> np.ndarray:
    return np.load(bytes_io.BytesIO(bytes(data)), allow_pickle=False)


def finish_image(
    uri: str,
    output_uri: str,
    image: np.ndarray,
    probabilities: np.ndarray,
    instances: InstanceConfig,
    original: np.ndarray | None = None,
    mpp: float | None = None,
) -> int:
    """Label one image's C x H x W probabilities and write its five outputs (``mpp``: the
    image's microns per pixel, for the measurements in microns); nuclei count."""
    labels = labels_from_maps(probabilities, instances)
    mask = labels > 0  # the union of the nuclei: mask.png and labels.tif always agree
    outputs = encode_outputs(image, mask, labels, image_stem(uri), original, probabilities[0], mpp)
    for name, data in outputs.items():
        io.write_bytes_atomic(io.join_uri(output_uri, name), data)
    return int(labels.max())


def segment_image_file(
    uri: str,
    output_uri: str,
    predict_batch: Callable[[np.ndarray], np.ndarray],
    segment: SegmentConfig,
    instances: InstanceConfig,
    model_mpp: float | None = None,
) -> int:
    """Read, tile, infer, stitch, label and write the five outputs of one image in this process
    (the job's two stages in one); nuclei count. With ``model_mpp`` (the checkpoint's data.mpp)
    an image of a known pixel size is inferred at the model's and its maps resized back.

    The network sees the 8-bit rendering (``io`` normalises >8-bit images); the nuclei table's
    intensities come from the original, in the input's own units (no copy for an 8-bit image).
    """
    image, original, image_mpp = read_image_with_pixel_size(uri)
    probabilities = probabilities_at_scale(
        image,
        model_scale(segment.image_mpp or image_mpp, model_mpp),
        lambda pixels: image_probabilities(pixels, predict_batch, segment),
    )
    mpp = segment.image_mpp or image_mpp
    return finish_image(uri, output_uri, image, probabilities, instances, original, mpp)


# ----------------------------------------------------------------------------- the driver


@dataclass
class SegmentSummary:
    ok: int
    error: int
    skipped: int
    manifest: str  # URI of manifest.csv
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every image is ok or skipped, 1 when any failed."""
        return EXIT_FAILED if self.error else EXIT_OK


def list_inputs(input_uri: str) -> list[str]:
    """The image URIs of a folder/prefix (not recursive), or ``[input_uri]`` for one image file.
    A folder in the DSB2018 layout (no image at its top, ``<id>/images/<id>.png`` below) gives
    its samples' images, so that a test set segments as it was downloaded."""
    if is_file(input_uri):
        return [str(input_uri)]

    found = io.list_files(input_uri, io.IMAGE_SUFFIXES + SLIDE_SUFFIXES)
    if found:
        return found
    try:
        return io.list_dsb_images(input_uri)
    except io.DatasetError as error:
        raise FileNotFoundError(
            f"no images ({', '.join(io.IMAGE_SUFFIXES)}) in {input_uri} nor a DSB2018 layout "
            f"below it ({error}): give a folder, an s3:// prefix or one image file"
        ) from error


def drop_own_outputs(inputs: list[str], input_uri: str, output_uri: str) -> list[str]:
    """When OUTPUT is the INPUT folder, its earlier outputs are not new inputs."""
    if io.resolve_filesystem(input_uri)[1] != io.resolve_filesystem(output_uri)[1]:
        return inputs
    suffixes = tuple(OUTPUT_SUFFIXES.values())
    return [uri for uri in inputs if not PurePosixPath(uri).name.endswith(suffixes)]


def existing_names(output_uri: str) -> set[str]:
    """Base names of the files already in the output folder (one listing, also on S3)."""
    return {PurePosixPath(uri).name for uri in io.list_files(output_uri)}


def outputs_complete(stem: str, names: set[str]) -> bool:
    return all(name in names for name in output_names(stem).values())


def triage_inputs(
    inputs: list[str], output_uri: str, overwrite: bool
) -> tuple[list[str], list[dict[str, Any]]]:
    """Split inputs into those to segment and ready-made rows (skipped, name clashes)."""
    names = set() if overwrite else existing_names(output_uri)
    previous = {} if overwrite else read_previous_nuclei(io.join_uri(output_uri, MANIFEST_NAME))
    owners: dict[str, str] = {}
    to_run, rows = [], []
    for uri in inputs:
        stem = image_stem(uri)
        if stem in owners:
            message = (
                f"its outputs would overwrite those of {owners[stem]} (same name '{stem}' before "
                f"the suffix); rename one of them"
            )
            rows.append(manifest_row(uri, STATUS_ERROR, message))
            continue
        owners[stem] = uri
        if outputs_complete(stem, names):
            rows.append(
                manifest_row(uri, STATUS_SKIPPED, "outputs complete", previous.get(uri, ""))
            )
        else:
            to_run.append(uri)
    return to_run, rows


def build_dataset(
    checkpoint: str,
    uris: list[str],
    output_uri: str,
    segment: SegmentConfig,
    instances: InstanceConfig,
    cpus_per_worker: float,
):
    """One row per image URI: stage 1, a pool of ``SegmentActor``s, infers the maps; stage 2,
    ``FinishImages`` on CPU tasks, labels and writes them and gives the manifest rows. Ray Data
    streams rows from one stage to the next, so both run at once."""
    import ray

    items = ray.data.from_items([{"input": uri} for uri in uris], override_num_blocks=len(uris))
    inferred = actor_stage(
        items,
        SegmentActor,
        {
            "checkpoint": checkpoint,
            "segment": dataclasses.asdict(segment),
            "threads": max(1, round(cpus_per_worker)),
        },
        ray.data.ActorPoolStrategy(
            size=min(segment.workers, len(uris)),
            max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT_PER_ACTOR,
        ),
        num_cpus=cpus_per_worker,
        num_gpus=actor_gpus(segment),
    )
    return actor_stage(
        inferred,
        FinishImages,
        {"output_uri": output_uri, "instances": dataclasses.asdict(instances)},
        ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, finish_workers(segment))),
        num_cpus=post_task_cpus(segment.use_gpu),
    )


def segment_with_ray(
    checkpoint: str,
    uris: list[str],
    output_uri: str,
    segment: SegmentConfig,
    instances: InstanceConfig,
    cpus_per_worker: int,
) -> list[dict[str, Any]]:
    """Run the actor pool over ``uris``; one manifest row per URI, in completion order."""
    rows: list[dict[str, Any]] = []
    stopped = ""
    with job_data_context(), Progress("segment", len(uris), unit="image") as progress:
        dataset = build_dataset(checkpoint, uris, output_uri, segment, instances, cpus_per_worker)
        try:
            for dataset_row in dataset.iter_rows():
                rows.append(
                    {**plain_row(dataset_row), **{k: dataset_row[k] for k in TIMING_COLUMNS}}
                )
                logger.debug(
                    "segmented %d/%d: %s %s %s",
                    len(rows),
                    len(uris),
                    rows[-1]["input"],
                    rows[-1]["status"],
                    rows[-1]["message"]
                    or f"({rows[-1]['nuclei']} nuclei, {rows[-1]['seconds']} s)",
                )
                errors = sum(row["status"] == STATUS_ERROR for row in rows)
                progress.update(summary=f"{len(rows) - errors} ok, {errors} error")
        except Exception as error:  # the pool could not start or broke: keep what finished
            logger.error("the segmentation dataset stopped: %s", error)
            stopped = f"not segmented: the job stopped ({one_line(error)}; see the log)"
    finished = {row["input"] for row in rows}
    lost = stopped or "not segmented: its actor died (out of memory?) on every try"
    rows.extend(manifest_row(uri, STATUS_ERROR, lost) for uri in uris if uri not in finished)
    return rows


def run_segmentation(
    checkpoint: str,
    input_uri: str,
    output_uri: str,
    segment: SegmentConfig,
    instances: InstanceConfig,
    cpus_per_worker: int | None = None,
    slide=None,
) -> SegmentSummary:
    """Segment every image of ``input_uri`` into ``output_uri``; write ``manifest.csv``.

    Whole-slide images (``unet_ray.pipelines.slides``, ``slide``: a ``SlideConfig``) run region by region
    on their own Ray Data job; their rows join the manifest.

    Needs a running Ray (``ray.init()``). Images whose five outputs exist are skipped unless
    ``segment.overwrite``. Bad inputs become error rows; the summary's ``exit_code`` is 1 then.
    Bad usage (geometry, an unwritable ``output_uri``, a bad checkpoint) raises before any work.
    """
    check_tile_geometry(segment.tile, segment.overlap)
    if segment.workers < 1 or segment.batch_size < 1:
        raise ValueError("--workers and --batch-size must be at least 1")
    actor_gpus(segment)  # a bad --actors-per-gpu
    check_gpu_request(
        segment.use_gpu,
        gpus_needed(segment),
        f"one GPU per {segment.actors_per_gpu} inference actor(s) of {segment.workers}",
        "lower --workers or raise --actors-per-gpu",
    )
    io.check_writable(output_uri)
    # lazy: io.checkpoint pulls in torch (~650 MB RSS), which the post-processing workers
    # that import this module never need
    from unet_ray.io.checkpoint import load_model

    load_model(checkpoint)  # fail fast on a missing or corrupt checkpoint, before any actor
    inputs = drop_own_outputs(list_inputs(input_uri), input_uri, output_uri)

    slide = slide or SlideConfig()
    slide_inputs, inputs = partition_inputs(inputs, slide, segment)
    io.make_dirs(output_uri)
    to_run, rows = triage_inputs(inputs, output_uri, segment.overwrite)
    logger.info(
        "%d images in %s: %d to segment, %d skipped or refused",
        len(inputs),
        input_uri,
        len(to_run),
        len(rows),
    )
    if to_run:
        cpus = cpus_per_worker or default_cpus_per_worker(segment.workers, segment.use_gpu)
        rows += segment_with_ray(checkpoint, to_run, output_uri, segment, instances, cpus)
    if slide_inputs:
        cpus = cpus_per_worker or default_cpus_per_worker(segment.workers, segment.use_gpu)
        rows += segment_slides(
            checkpoint, slide_inputs, output_uri, segment, instances, slide, cpus
        )
    manifest_uri = io.join_uri(output_uri, MANIFEST_NAME)
    write_manifest(rows, manifest_uri)
    counts = {status: sum(row["status"] == status for row in rows) for status in MANIFEST_STATUSES}
    summary = SegmentSummary(
        counts[STATUS_OK], counts[STATUS_ERROR], counts[STATUS_SKIPPED], manifest_uri, rows
    )
    logger.info(
        "segmentation done: %d ok, %d error, %d skipped; manifest %s",
        summary.ok,
        summary.error,
        summary.skipped,
        manifest_uri,
    )
    return summary


# ----------------------------------------------------------------------------- command line
