"""The two stages of the whole-slide job, one row per region: ``InferRegions`` actors (one
model each, GPU when asked) read a region's window and infer its maps through
``unet_ray.inference``; ``FinishRegions`` workers on CPUs label the nuclei, keep those the region
owns (``core.regions``) and write its part (``io.slide_writers``). A region that fails
``REGION_ATTEMPTS`` times in a stage becomes a failed row; the driver (``pipelines.slides``)
plans the regions and assembles the outputs."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from unet_ray import io
from unet_ray.core.config import (
    InstanceConfig,
    SegmentConfig,
)
from unet_ray.core.regions import (
    Region,
    keep_owned_nuclei,
    plan_regions,
)
from unet_ray.inference import (
    GpuUnavailableError,
    image_maps,
    labels_from_maps,
    make_batch_predictor,
    select_device,
    serialised,
)
from unet_ray.io.slide_reader import (
    SlideReader,
    read_frame_window,
)
from unet_ray.io.slide_writers import (
    PARTS_SUFFIX,
    encode_region_part,
    part_uri,
)
from unet_ray.io.writers import STATUS_ERROR, STATUS_OK
from unet_ray.runtime.batch import (
    MAP_DTYPE,
    columns_of,
    describe_error,
    limit_worker_threads,
    peak_rss_mb,
    process_name,
)

logger = logging.getLogger(__name__)


REGION_ATTEMPTS = 2  # tries of a region in each stage before it is recorded failed
READER_CACHE = 2  # open slides kept per actor (regions of one slide usually arrive together)


RESULT_COLUMNS = (  # one row per region, from stage 2 (FinishRegions) to the driver
    "slide",
    "region",
    "status",
    "message",
    "nuclei",
    "cut",
    "read_s",  # stage 1 (inference actor)
    "infer_s",
    "post_s",  # stage 2 (post-processing worker): labels, owned nuclei, part encoded
    "write_s",
    "infer_start",  # time.time() stamps: stage 1 from reading to the maps
    "infer_end",
    "post_start",  # stage 2 from its first try to the part written (or its last failure)
    "post_end",
    "peak_rss_mb",  # the inference actor's peak RSS (model, one window and its maps)
    "actor",  # the inference actor, node:pid
    "post_peak_rss_mb",  # the post-processing worker's (one region's maps and labels)
    "post_actor",  # the post-processing worker, node:pid ("" when stage 1 failed)
)


TIMING_KEYS = ("read_s", "infer_s", "post_s", "write_s")
STAMP_KEYS = ("infer_start", "infer_end", "post_start", "post_end")
NUMBER_COLUMNS = (*TIMING_KEYS, *STAMP_KEYS, "peak_rss_mb", "post_peak_rss_mb")


@dataclass
class SlidePlan:
    """What the driver decided about one slide; travels to the actors as JSON."""

    uri: str
    stem: str
    output_uri: str
    frame_height: int
    frame_width: int
    scale: float  # level-0 pixels per frame pixel
    mpp: float | None  # microns per frame pixel, when known
    region: int
    halo: int
    spill: int
    to_segment: list[str]  # region keys with tissue
    skipped: list[str]  # region keys without tissue
    done: list[str]  # region keys whose part already exists (resume)
    intensity: list[float] | None = None  # (low, high) of a 16-bit/float slide; None: 8-bit
    bounds: list[int] | None = None  # a bounded slide's x, y, width, height: QuPath's crop

    def regions(self) -> list[Region]:
        return plan_regions(self.frame_height, self.frame_width, self.region, self.halo, self.spill)

    def region_by_key(self) -> dict[str, Region]:
        return {region.key: region for region in self.regions()}

    @property
    def parts_uri(self) -> str:
        return io.join_uri(self.output_uri, self.stem + PARTS_SUFFIX)


def infer_region(
    plan: SlidePlan,
    region: Region,
    reader: SlideReader,
    predict_maps: Callable[[np.ndarray], np.ndarray],
    segment: SegmentConfig,
) -> dict[str, Any]:
    """Stage 1 of one region: read its window and infer its maps (``predict_maps``: uint8
    windows -> probabilities, ``make_batch_predictor(probabilities=True)``); the row
    ``FinishRegions`` takes (float16 maps, the spill crop of the image for the part's table,
    timings)."""
    started = time.time()
    image = read_frame_window(reader, region.window, plan.scale)
    read_done = time.time()
    probabilities = image_maps(image, predict_maps, segment).astype(MAP_DTYPE)
    infer_done = time.time()
    return {
        "slide": plan.uri,
        "region": region.key,
        "status": STATUS_OK,
        "message": "",
        "read_s": read_done - started,
        "infer_s": infer_done - read_done,
        "infer_start": started,
        "infer_end": infer_done,
        "probabilities": probabilities,
        "spill_image": np.ascontiguousarray(image[region.spill.within(region.window)]),
    }


def finish_region(
    plan: SlidePlan,
    region: Region,
    probabilities: np.ndarray,
    spill_image: np.ndarray,
    instances: InstanceConfig,
) -> dict[str, Any]:
    """Stage 2 of one region: label its maps, keep the nuclei it owns and write its part;
    nuclei, cut and timings."""
    started = time.time()
    labels = labels_from_maps(probabilities, instances)
    kept, cut = keep_owned_nuclei(labels, region, plan.frame_height, plan.frame_width)
    del labels
    nucleus = probabilities[0][region.spill.within(region.window)]  # mean_probability
    part = encode_region_part(kept, spill_image, nucleus, region, plan)
    post_done = time.time()
    io.write_bytes_atomic(part_uri(plan, region.key), part)
    ended = time.time()
    return {
        "nuclei": int(kept.max()) if kept.size else 0,
        "cut": int(cut),
        "post_s": post_done - started,
        "write_s": ended - post_done,
        "post_start": started,
        "post_end": ended,
    }


def empty_region_row(plan_uri: str, key: str) -> dict[str, Any]:
    """A result row with every column at its blank value (every block keeps one schema)."""
    row: dict[str, Any] = {column: 0.0 for column in NUMBER_COLUMNS}
    row.update(slide=plan_uri, region=key, status=STATUS_OK, message="")
    row.update(nuclei=0, cut=0, actor="", post_actor="")
    return row


def failed_region_row(plan_uri: str, key: str, message: str) -> dict[str, Any]:
    return {**empty_region_row(plan_uri, key), "status": STATUS_ERROR, "message": message}


def empty_maps() -> dict[str, np.ndarray]:
    """The array columns of a row that stage 1 could not fill (every block keeps one schema)."""
    return {
        "probabilities": np.zeros((0, 0, 0), dtype=MAP_DTYPE),
        "spill_image": np.zeros((0, 0, 3), dtype=np.uint8),
    }


def task_region(task: dict[str, Any]) -> tuple[SlidePlan, Region]:
    plan = SlidePlan(**task["plan"])
    return plan, plan.region_by_key()[task["region"]]


class InferRegions:
    """Stage 1, a Ray Data actor: one model, loaded once; each call reads a batch of regions
    (JSON tasks) and infers their maps, which travel on (float16, with the spill crop of the
    image) to ``FinishRegions``, so the actor (and its GPU) goes on to the next region while
    CPU workers label and write. A region is tried ``REGION_ATTEMPTS`` times here; a failure
    becomes an error row that stage 2 passes on untouched.

    As ``pipelines.segment.SegmentActor``: two calls at once (``CONCURRENT_CALLS``), one reading
    its window while the other's tile batches are on the device, forward passes in turn
    (``inference.serialised``), each thread with slide readers of its own; sigmoid and float16
    on the GPU; strict ``--gpu`` (no CUDA: every region an error row naming the reason)."""

    CONCURRENT_CALLS = 2  # calls at once per actor (``runtime.batch.actor_stage``)

    def __init__(self, checkpoint: str, segment: dict[str, Any], threads: float = 1):
        self.segment = SegmentConfig(**segment)
        self.local = threading.local()  # per calling thread: its open slide readers
        self.actor = process_name()
        self.unusable = ""
        try:
            self.device = select_device(self.segment.use_gpu)
        except GpuUnavailableError as error:
            self.unusable = str(error)
            logger.error("region actor %s: %s", self.actor, error)
            return
        import torch

        if self.device == "cpu":  # a fractional CPU share rounds to whole threads
            torch.set_num_threads(max(1, min(round(threads), os.cpu_count() or 1)))
        # lazy: io.checkpoint pulls in torch (~650 MB RSS), which the post-processing workers
        # that import this module never need
        from unet_ray.io.checkpoint import load_model

        model, _ = load_model(checkpoint, device=self.device)
        self.predict_maps = serialised(
            make_batch_predictor(model, self.device, tta=self.segment.tta, probabilities=True)
        )

    @property
    def readers(self) -> dict[str, SlideReader]:
        """This thread's open slide readers (a reader's file is not shared between threads)."""
        if not hasattr(self.local, "readers"):
            self.local.readers = {}
        return self.local.readers

    def reader(self, plan: SlidePlan) -> SlideReader:
        readers = self.readers
        if plan.uri not in readers:
            while len(readers) >= READER_CACHE:
                readers.pop(next(iter(readers))).close()
            readers[plan.uri] = SlideReader(plan.uri, plan.intensity)
        return readers[plan.uri]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return columns_of([self.infer_task(str(task)) for task in batch["task"]])

    def infer_task(self, task_json: str) -> dict[str, Any]:
        """One region's stage-1 row: the maps, or an error row after ``REGION_ATTEMPTS``."""
        plan, region = task_region(json.loads(task_json))
        if self.unusable:
            row = {**failed_region_row(plan.uri, region.key, self.unusable), **empty_maps()}
            row.update(task=task_json, actor=self.actor, peak_rss_mb=peak_rss_mb())
            return row
        inferred, message = try_region(
            "reading or inference",
            plan,
            region,
            lambda: infer_region(plan, region, self.reader(plan), self.predict_maps, self.segment),
            # reopen: the file may have been replaced
            after_failure=lambda: self.readers.pop(plan.uri, None),
        )
        if inferred is None:
            row = {**failed_region_row(plan.uri, region.key, message), **empty_maps()}
        else:
            row = {**empty_region_row(plan.uri, region.key), **inferred}
        row.update(task=task_json, actor=self.actor, peak_rss_mb=peak_rss_mb())
        return row


def try_region(
    what: str,
    plan: SlidePlan,
    region: Region,
    action: Callable[[], dict[str, Any]],
    after_failure: Callable[[], Any] | None = None,
) -> tuple[dict[str, Any] | None, str]:
    """``action()`` up to ``REGION_ATTEMPTS`` times: its result and "", or None and the last
    error's message; each failure is logged (``what`` failed) and followed by
    ``after_failure()``. One bad region must never abort the dataset."""
    message = ""
    for attempt in range(1, REGION_ATTEMPTS + 1):
        try:
            return action(), ""
        except Exception as error:
            message = describe_error(error)
            logger.warning(
                "%s region %s: %s failed (attempt %d/%d): %s",
                plan.uri,
                region.key,
                what,
                attempt,
                REGION_ATTEMPTS,
                message,
            )
            if after_failure is not None:
                after_failure()
    return None, message


class FinishRegions:
    """Stage 2, Ray Data actors on CPUs: from the maps stage 1 passed on, labels, the nuclei
    the region owns and its part written; the result row (``RESULT_COLUMNS``). A failure here is
    retried on the same maps (``REGION_ATTEMPTS`` tries), then becomes an error row; an error
    row of stage 1 passes untouched."""

    def __init__(self, instances: dict[str, Any]):
        limit_worker_threads()  # one OpenCV thread: a worker per free CPU
        self.instances = InstanceConfig(**instances)
        self.worker = process_name()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = []
        for index in range(len(batch["task"])):
            rows.append(self.finish_row({column: batch[column][index] for column in batch}))
        return columns_of(rows)

    def finish_row(self, row: dict[str, Any]) -> dict[str, Any]:
        result = {column: row[column] for column in RESULT_COLUMNS}
        if str(row["status"]) != STATUS_OK:
            return result
        plan, region = task_region(json.loads(str(row["task"])))
        started = time.time()
        finished, message = try_region(
            "labelling or writing",
            plan,
            region,
            lambda: finish_region(
                plan, region, row["probabilities"], row["spill_image"], self.instances
            ),
        )
        if finished is None:
            result.update(
                status=STATUS_ERROR,
                message=f"labelling or writing its part failed: {message}",
                post_start=started,
                post_end=time.time(),
            )
        else:
            result.update(finished, post_start=started)  # failed tries included
        result.update(post_actor=self.worker, post_peak_rss_mb=peak_rss_mb())
        return result
