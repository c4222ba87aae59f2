"""Whole-slide images out of core: window reading, resolution, tissue mask, regions, the Ray job.

A *slide* is a pyramidal or tiled TIFF, OME-TIFF, SVS or other ``tiffslide`` format (OpenSlide's
formats too where ``openslide-python`` and ``openslide-bin`` are installed, extra ``[slides]``)
larger than one region. ``unet-ray segment`` routes such inputs here; smaller images keep the
whole-image path of ``unet_ray.pipelines.segment``.

The driver opens each slide only for its metadata and a low-resolution *overview* (at most
``OVERVIEW_MAX_SIDE`` px), finds tissue on it (Otsu on saturation) and cuts the slide, in the
*frame* (the slide at the resolution segmented, ``--mpp``), into ``--region``-sized cores. Each
core grows by a halo of context into a *window*; every non-background region is one row of a Ray
Data job, so one slide spreads over all actors and many slides interleave. The job has two stages
that Ray Data runs at the same time, as the whole-image job does: an ``InferRegions`` actor (one
model, GPU when asked) reads its window (the pyramid level just finer than the frame, resampled),
tiles and infers it as the whole-image path does, and passes the maps on (float16) with the part
of the image the region's table needs; ``FinishRegions`` workers on CPUs label the nuclei and keep
those whose centroid lies in the core, so the actor infers the next region meanwhile. Each nucleus
belongs to exactly one region, and is whole when the halo is at least the largest nucleus plus the
network's context (``halo - overlap`` px across is guaranteed). The kept nuclei (which may reach up
to ``halo - overlap`` px beyond the core, the *spill*) are written as one region part; when every
region of a slide is done, ``unet_ray.io.slide_writers`` assembles the outputs part by part. No
process holds a slide, its probability map or its labels at full resolution: an actor holds one
window and its maps, a post-processing worker one window's maps and labels, the assembler one
region-sized block.

Resume: a region whose part exists is not recomputed; a slide whose ``<stem>.slide.json`` says
``ok`` is skipped. A region that fails ``REGION_ATTEMPTS`` times in either stage (stage 2 retries
on the maps it was given) is recorded and its slide marked ``error`` (its parts stay, so a rerun
computes only what is missing).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from unet_ray import io
from unet_ray.core.config import (
    InstanceConfig,
    SegmentConfig,
    SlideConfig,
    check_slide_config,
)
from unet_ray.core.regions import (
    overview_shape,
    plan_regions,
    region_has_tissue,
    tissue_mask,
)
from unet_ray.io.slide_reader import (
    SlideReader,
    is_slide,
    read_overview,
    slide_intensity_range,
)
from unet_ray.io.slide_writers import (
    SUMMARY_SUFFIX,
    assemble_slide,
    existing_parts,
    is_own_output,
    remove_parts,
)
from unet_ray.io.writers import STATUS_ERROR, STATUS_OK, STATUS_SKIPPED, image_stem, manifest_row
from unet_ray.pipelines.slide_regions import (
    RESULT_COLUMNS,
    TIMING_KEYS,
    FinishRegions,
    InferRegions,
    SlidePlan,
    failed_region_row,
)
from unet_ray.runtime.batch import (
    TASK_RETRIES,
    TASKS_IN_FLIGHT_PER_ACTOR,
    actor_gpus,
    actor_stage,
    describe_error,
    finish_workers,
    job_data_context,
    one_line,
    post_task_cpus,
)
from unet_ray.runtime.progress import Progress

logger = logging.getLogger(__name__)

MPP_MISMATCH_RATIO = 1.5  # warn when segmenting this much finer/coarser than the model learnt
PARTS_SIGNATURE = "signature.json"  # in the parts folder: the settings its parts were made with
PART_FORMAT = 2  # parts of another format are redone (2: shape features, probability, frames)


# ----------------------------------------------------------------------------- the driver


class SlideError(ValueError):
    """A slide cannot be segmented as asked; the message names the slide and the problem."""


def stem_of(uri: str) -> str:
    """The slide's name without its suffix, OME's included: ``s3://b/case.ome.tif`` -> ``case``."""
    stem = image_stem(uri)
    return stem[: -len(".ome")] if stem.lower().endswith(".ome") else stem


def read_summary(output_uri: str, stem: str) -> dict[str, Any] | None:
    uri = io.join_uri(output_uri, stem + SUMMARY_SUFFIX)
    if not io.exists(uri):
        return None
    try:
        return json.loads(io.read_bytes(uri))
    except (OSError, ValueError):
        return None


def frame_geometry(reader: SlideReader, slide: SlideConfig, uri: str) -> tuple[float, float | None]:
    """(level-0 pixels per frame pixel, microns per frame pixel) for ``--mpp``."""
    if slide.mpp is None:
        return 1.0, reader.mpp
    if reader.mpp is None:
        raise SlideError(
            f"{uri}: --mpp {slide.mpp} asked, but the slide does not say its own resolution "
            "(no microns-per-pixel in its metadata); leave --mpp out to segment it as it is"
        )
    return slide.mpp / reader.mpp, slide.mpp


def warn_mpp_mismatch(uri: str, mpp: float | None, training_mpp: float | None) -> None:
    if mpp is None or training_mpp is None:
        return
    ratio = max(mpp, training_mpp) / min(mpp, training_mpp)
    if ratio >= MPP_MISMATCH_RATIO:
        logger.warning(
            "%s is segmented at %.3g um/px but the model was trained at %.3g um/px (%.1fx): "
            "nuclei look %s to it; pass --mpp %.3g to resample",
            uri,
            mpp,
            training_mpp,
            ratio,
            "larger" if mpp < training_mpp else "smaller",
            training_mpp,
        )


def training_mpp(checkpoint_info: dict[str, Any]) -> float | None:
    """The model's training resolution when its checkpoint records one (``data.mpp``)."""
    value = checkpoint_info.get("config", {}).get("data", {}).get("mpp")
    try:
        return float(value) if value else None
    except (TypeError, ValueError):
        return None


def parts_signature(
    plan: SlidePlan, checkpoint: str, segment: SegmentConfig, instances: InstanceConfig
) -> dict[str, Any]:
    """What finished parts depend on: a rerun reuses them only when all of it is unchanged."""
    return {
        "part_format": PART_FORMAT,
        "checkpoint": str(checkpoint),
        "frame": [plan.frame_height, plan.frame_width],
        "scale": plan.scale,
        "mpp": plan.mpp,
        "bounds": plan.bounds,
        "region": plan.region,
        "halo": plan.halo,
        "spill": plan.spill,
        "tiling": [segment.scheme, segment.tile, segment.overlap],
        "instances": dataclasses.asdict(instances),
    }


def claim_parts(plan: SlidePlan, signature: dict[str, Any]) -> None:
    """Keep the finished parts of an earlier run made with the same ``signature`` (resume);
    drop them when anything they depend on changed, and record this run's signature."""
    uri = io.join_uri(plan.parts_uri, PARTS_SIGNATURE)
    previous = None
    if io.exists(uri):
        try:
            previous = json.loads(io.read_bytes(uri))
        except (OSError, ValueError):
            previous = None
    if previous != json.loads(json.dumps(signature)):
        if plan.done:
            logger.warning(
                "%s: %d finished regions of an earlier run with other settings are redone",
                plan.uri,
                len(plan.done),
            )
        plan.done = []

        remove_parts(plan)
    io.write_bytes_atomic(uri, json.dumps(signature, indent=2).encode())


def plan_slide(
    uri: str,
    output_uri: str,
    slide: SlideConfig,
    segment: SegmentConfig,
    model_mpp: float | None = None,
) -> SlidePlan:
    """Open one slide for its metadata and overview; its regions, tissue and finished parts."""
    reader = SlideReader(uri)
    try:
        scale, mpp = frame_geometry(reader, slide, uri)
        warn_mpp_mismatch(uri, mpp, model_mpp)
        frame_height = max(1, math.floor(reader.extent[3] / scale))  # the bounds, if any
        frame_width = max(1, math.floor(reader.extent[2] / scale))
        regions = plan_regions(
            frame_height, frame_width, slide.region, slide.halo, slide.halo - segment.overlap
        )
        reader.intensity = slide_intensity_range(reader)  # None for 8-bit slides
        mask = None
        if slide.tissue_mask:
            overview = read_overview(reader, *overview_shape(frame_height, frame_width))
            mask = tissue_mask(overview)
            if mask is None:
                logger.warning("%s: no colour contrast for a tissue mask; no region skipped", uri)
    finally:
        reader.close()
    stem = stem_of(uri)
    with_tissue = [
        region.key
        for region in regions
        if mask is None or region_has_tissue(mask, region.core, frame_height, frame_width)
    ]
    plan = SlidePlan(
        uri=str(uri),
        stem=stem,
        output_uri=output_uri,
        frame_height=frame_height,
        frame_width=frame_width,
        scale=scale,
        mpp=mpp,
        region=slide.region,
        halo=slide.halo,
        spill=slide.halo - segment.overlap,
        to_segment=with_tissue,
        skipped=[region.key for region in regions if region.key not in set(with_tissue)],
        done=[],
        intensity=list(reader.intensity) if reader.intensity is not None else None,
        bounds=list(reader.bounds) if reader.bounds is not None else None,
    )
    finished = existing_parts(plan.parts_uri) if not segment.overwrite else set()
    plan.done = [key for key in with_tissue if key in finished]
    return plan


def region_tasks(plans: list[SlidePlan]) -> list[dict[str, str]]:
    """One row per region still to segment; slides interleave so all of them progress."""
    queues = [[key for key in plan.to_segment if key not in set(plan.done)] for plan in plans]
    rows = []
    for index in range(max((len(queue) for queue in queues), default=0)):
        for plan, queue in zip(plans, queues, strict=True):
            if index < len(queue):
                task = {"plan": dataclasses.asdict(plan), "region": queue[index]}
                rows.append({"task": json.dumps(task)})
    return rows


def build_region_dataset(
    checkpoint: str,
    tasks: list[dict[str, str]],
    segment: SegmentConfig,
    instances: InstanceConfig,
    cpus_per_worker: float,
):
    """One row per region task: stage 1, a pool of ``InferRegions`` actors (GPU when asked),
    reads and infers; stage 2, ``FinishRegions`` on CPUs (sized as the whole-image job's
    ``FinishImages``), labels, writes the parts and gives the result rows. Ray Data streams rows
    from one stage to the next, so both run at once."""
    import ray

    items = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    inferred = actor_stage(
        items,
        InferRegions,
        {
            "checkpoint": checkpoint,
            "segment": dataclasses.asdict(segment),
            "threads": cpus_per_worker,
        },
        ray.data.ActorPoolStrategy(
            size=min(segment.workers, len(tasks)),
            max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT_PER_ACTOR,
        ),
        num_cpus=cpus_per_worker,
        num_gpus=actor_gpus(segment),  # --actors-per-gpu N: 1/N of a GPU each
        max_task_retries=TASK_RETRIES,
    )
    return actor_stage(
        inferred,
        FinishRegions,
        {"instances": dataclasses.asdict(instances)},
        ray.data.ActorPoolStrategy(
            min_size=1, max_size=max(1, min(finish_workers(segment), len(tasks)))
        ),
        num_cpus=post_task_cpus(segment.use_gpu),
        max_task_retries=TASK_RETRIES,
    )


def run_region_job(
    checkpoint: str,
    plans: list[SlidePlan],
    segment: SegmentConfig,
    instances: InstanceConfig,
    cpus_per_worker: int,
    on_slide_done: Callable[[SlidePlan, list[dict[str, Any]]], None],
) -> None:
    """Segment every pending region of ``plans`` on the actor pool; call ``on_slide_done(plan,
    its result rows)`` as soon as the last region of a slide reports (rows of this run only).
    Progress on the console: regions done / total (resumed ones count as done) and the nuclei
    found so far, as a bar on a terminal, a line every few regions otherwise."""
    tasks = region_tasks(plans)
    by_uri = {plan.uri: plan for plan in plans}
    pending = {plan.uri: len(plan.to_segment) - len(plan.done) for plan in plans}
    results: dict[str, list[dict[str, Any]]] = {plan.uri: [] for plan in plans}
    for plan in plans:
        if pending[plan.uri] == 0:
            on_slide_done(plan, [])
    if not tasks:
        return
    stopped = ""
    total = sum(len(plan.to_segment) for plan in plans)
    progress = Progress("slides", total, unit="region", initial=total - len(tasks))
    counts = {"nuclei": 0, "failed": 0}
    with job_data_context(), progress:
        dataset = build_region_dataset(checkpoint, tasks, segment, instances, cpus_per_worker)
        try:
            for row in dataset.iter_rows():
                row = {column: row[column] for column in RESULT_COLUMNS}
                uri = str(row["slide"])
                results[uri].append(row)
                pending[uri] -= 1
                logger.debug(
                    "slide %s region %s: %s %s",
                    uri,
                    row["region"],
                    row["status"],
                    row["message"] or f"({row['nuclei']} nuclei)",
                )
                progress.update(summary=regions_progress(counts, row))
                if pending[uri] == 0:
                    on_slide_done(by_uri[uri], results[uri])
        except Exception as error:  # the pool broke: the regions not reported are failures
            logger.error("the slide region dataset stopped: %s", error)
            stopped = f"the job stopped ({one_line(error)})"
    for uri, count in pending.items():
        if count > 0:
            plan = by_uri[uri]
            reported = {str(row["region"]) for row in results[uri]}
            missing = [
                key for key in plan.to_segment if key not in set(plan.done) and key not in reported
            ]
            message = stopped or (
                "its inference actor or post-processing worker died (out of memory?) on every try"
            )
            results[uri] += [failed_region_row(uri, key, message) for key in missing]
            on_slide_done(plan, results[uri])


def regions_progress(counts: dict[str, int], row: dict[str, Any]) -> str:
    """``1234 nuclei, 1 failed``: ``counts`` with one more region's result ``row`` added, the
    nuclei of the regions computed so far and the failures."""
    if str(row["status"]) == STATUS_OK:
        counts["nuclei"] += int(row["nuclei"])
    else:
        counts["failed"] += 1
    return f"{counts['nuclei']} nuclei, {counts['failed']} failed"


def summarise_regions(plan: SlidePlan, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts, failures, time split, per-process peak memory of one slide's run, and how much of
    its post-processing ran while its inference actor was already on another region."""
    failed = [row for row in rows if row["status"] != STATUS_OK]
    computed = [row for row in rows if row["status"] == STATUS_OK]
    return {
        "regions": len(plan.to_segment) + len(plan.skipped),
        "regions_done": len(plan.to_segment) - len(failed),
        "regions_computed": len(computed),
        "regions_resumed": len(plan.done),
        "regions_skipped": len(plan.skipped),
        "regions_failed": len(failed),
        "failures": {str(row["region"]): str(row["message"]) for row in failed},
        "nuclei_cut_by_halo": int(sum(int(row["cut"]) for row in computed)),
        "seconds": {key: round(sum(float(row[key]) for row in computed), 3) for key in TIMING_KEYS},
        "post_beside_inference_s": round(post_beside_inference(computed, rows), 3),
        "peak_rss_mb_by_actor": peaks_by_process(rows, "actor", "peak_rss_mb"),
        "peak_rss_mb_by_post_worker": peaks_by_process(rows, "post_actor", "post_peak_rss_mb"),
    }


def peaks_by_process(rows: list[dict[str, Any]], name: str, peak: str) -> dict[str, float]:
    """{process: its highest ``peak`` column} over the rows it named in column ``name``."""
    peaks: dict[str, float] = {}
    for row in rows:
        if row[name]:
            process = str(row[name])
            peaks[process] = max(peaks.get(process, 0.0), float(row[peak]))
    return {process: round(value, 1) for process, value in peaks.items()}


def post_beside_inference(finished: list[dict[str, Any]], rows: list[dict[str, Any]]) -> float:
    """Seconds of the ``finished`` rows' post-processing and writing (stage 2) during which the
    region's own inference actor was already reading or inferring another of the ``rows`` (one
    slide's): 0 when one process does both in turn, as one actor did before the stages split."""
    total = 0.0
    for row in finished:
        start, end = float(row["post_start"]), float(row["post_end"])
        busy = [
            (max(start, float(other["infer_start"])), min(end, float(other["infer_end"])))
            for other in rows
            if other is not row and other["actor"] and other["actor"] == row["actor"]
        ]
        total += union_length([(first, last) for first, last in busy if last > first])
    return total


def union_length(spans: list[tuple[float, float]]) -> float:
    """The length of the union of ``(start, end)`` spans."""
    length, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            length += end - max(start, reach)
            reach = end
    return length


def regions_message(summary: dict[str, Any]) -> str:
    message = (
        f"regions: {summary['regions_done']} done, {summary['regions_skipped']} skipped "
        f"(background), {summary['regions_failed']} failed"
    )
    if summary["failures"]:
        key, reason = next(iter(summary["failures"].items()))
        message += f"; region {key}: {reason}"
    return message


def assemble_remote(plan_dict: dict[str, Any], summary: dict[str, Any]) -> int:
    """Assemble one slide's outputs from its parts (run as a Ray task); its nuclei count."""
    return assemble_slide(SlidePlan(**plan_dict), summary)


def plan_slides(
    checkpoint: str,
    uris: list[str],
    output_uri: str,
    segment: SegmentConfig,
    instances: InstanceConfig,
    slide: SlideConfig,
    started: dict[str, float],
    planning: dict[str, float],
) -> tuple[list[SlidePlan], list[dict[str, Any]]]:
    """The plans of the slides to segment, and the manifest rows of those skipped (complete) or
    refused (cannot be opened or planned). ``started`` and ``planning`` receive each slide's
    start time and planning seconds."""
    # lazy: io.checkpoint pulls in torch (~650 MB RSS), which the post-processing workers
    # that import this module never need
    from unet_ray.io.checkpoint import read_checkpoint_info

    model_mpp = training_mpp(read_checkpoint_info(checkpoint))
    plans: list[SlidePlan] = []
    rows: list[dict[str, Any]] = []
    for uri in uris:
        started[uri] = time.perf_counter()
        previous = None if segment.overwrite else read_summary(output_uri, stem_of(uri))
        if previous and previous.get("status") == STATUS_OK:
            rows.append(
                manifest_row(uri, STATUS_SKIPPED, "outputs complete", previous.get("nuclei", ""))
            )
            continue
        try:
            plan = plan_slide(uri, output_uri, slide, segment, model_mpp)
            claim_parts(plan, parts_signature(plan, checkpoint, segment, instances))
            plans.append(plan)
            planning[uri] = round(time.perf_counter() - started[uri], 3)
        except Exception as error:
            logger.warning("cannot plan slide %s: %s", uri, error)
            rows.append(manifest_row(uri, STATUS_ERROR, describe_error(error)))
    return plans, rows


def segment_slides(
    checkpoint: str,
    uris: list[str],
    output_uri: str,
    segment: SegmentConfig,
    instances: InstanceConfig,
    slide: SlideConfig,
    cpus_per_worker: int,
) -> list[dict[str, Any]]:
    """Segment whole slides region by region on Ray; one manifest row per slide.

    Needs a running Ray. Slides whose summary says ``ok`` are skipped unless
    ``segment.overwrite``; a slide that cannot be opened or planned, or any of whose regions
    failed, is an ``error`` row (its finished parts stay for the rerun)."""
    import ray

    check_slide_config(slide, segment)
    started: dict[str, float] = {}
    planning: dict[str, float] = {}  # seconds the driver spent on each slide's overview
    plans, rows = plan_slides(
        checkpoint, uris, output_uri, segment, instances, slide, started, planning
    )
    assemble = ray.remote(num_cpus=1, max_retries=1)(assemble_remote)
    assembling: list[tuple[SlidePlan, dict[str, Any], Any]] = []

    def on_slide_done(plan: SlidePlan, region_rows: list[dict[str, Any]]) -> None:
        summary = summarise_regions(plan, region_rows)
        summary["seconds"]["plan_s"] = planning[plan.uri]
        summary["checkpoint"] = str(checkpoint)  # in slide.json and the table's metadata
        if summary["regions_failed"]:
            write_error_summary(plan, summary)
            rows.append(
                manifest_row(
                    plan.uri,
                    STATUS_ERROR,
                    regions_message(summary),
                    seconds=time.perf_counter() - started[plan.uri],
                )
            )
            return
        assembling.append((plan, summary, assemble.remote(dataclasses.asdict(plan), summary)))

    run_region_job(checkpoint, plans, segment, instances, cpus_per_worker, on_slide_done)
    progress = Progress("assemble", len(assembling), unit="slide") if assembling else None
    for plan, summary, reference in assembling:
        try:
            nuclei = ray.get(reference)
        except Exception as error:
            progress.update(summary=f"{plan.stem}: failed")
            rows.append(
                manifest_row(
                    plan.uri,
                    STATUS_ERROR,
                    f"writing the outputs failed: {describe_error(error)}",
                    seconds=time.perf_counter() - started[plan.uri],
                )
            )
            continue
        progress.update(summary=f"{plan.stem}: {nuclei} nuclei")
        rows.append(
            manifest_row(
                plan.uri,
                STATUS_OK,
                regions_message(summary),
                nuclei,
                time.perf_counter() - started[plan.uri],
            )
        )
    if progress is not None:
        progress.close()
    return rows


def write_error_summary(plan: SlidePlan, summary: dict[str, Any]) -> None:
    document = {"input": plan.uri, "status": STATUS_ERROR, **summary}
    io.write_bytes_atomic(
        io.join_uri(plan.output_uri, plan.stem + SUMMARY_SUFFIX),
        json.dumps(document, indent=2).encode(),
    )


# ----------------------------------------------------------------------------- command line


def partition_inputs(
    uris: list[str], slide: SlideConfig, segment: SegmentConfig
) -> tuple[list[str], list[str]]:
    """(slides, images) of the driver's input list; our own label outputs are dropped. Bad
    slide flags raise ValueError first."""
    check_slide_config(slide, segment)
    slides, images = [], []
    for uri in uris:
        if is_own_output(uri):
            continue
        (slides if is_slide(uri, slide.region) else images).append(uri)
    return slides, images
