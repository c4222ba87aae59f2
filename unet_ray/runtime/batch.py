"""Ray Data plumbing shared by the image and slide jobs: the actor stage helper
(``actor_stage``, bounded retries), the job's ``DataContext`` settings, CPU shares of inference
actors and post-processing workers, rows as numpy columns, one-line error messages and the
per-process memory and name that benchmarks read. Nothing here knows about nuclei.
"""

from __future__ import annotations

import math
import os
import re
import resource
import sys
import warnings
from contextlib import contextmanager
from typing import Any

import numpy as np

from unet_ray import io
from unet_ray.core.config import (
    SegmentConfig,
)

UNKNOWN_NUCLEI = -1  # nuclei count of an error row while it travels through Ray Data


TASK_RETRIES = 2  # an image whose actor dies this often more becomes an error row
ACTOR_START_TIMEOUT_S = 900  # an autoscaling cluster may take minutes to add a (GPU) node
UNLIMITED = -1
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def one_line(error: BaseException) -> str:
    """``Type: first line of the message``, without terminal colour codes."""
    lines = ANSI_ESCAPE.sub("", str(error)).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def describe_error(error: Exception) -> str:
    """A one-line message; io's read errors already name the file and the problem."""
    if isinstance(error, io.ImageReadError):
        return str(error)
    return one_line(error)


MAP_DTYPE = np.float16  # probabilities between the stages: half the bytes, steps of 0.0005 at 0.5


def columns_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Column arrays of rows; nuclei travels as int64 (``UNKNOWN_NUCLEI`` when blank) so every
    block has one schema. Array columns stay lists of arrays (shapes differ between images)."""
    columns: dict[str, Any] = {}
    for column in rows[0]:
        values = [row[column] for row in rows]
        if column == "nuclei":
            values = [UNKNOWN_NUCLEI if value == "" else value for value in values]
        if isinstance(values[0], np.ndarray):
            columns[column] = values
        elif isinstance(values[0], bytes):
            columns[column] = np.array(values, dtype=object)
        else:
            columns[column] = np.array(values)
    return columns


def default_cpus_per_worker(workers: int, use_gpu: bool) -> float:
    """CPUs per inference actor: one beside a GPU; on CPU, an equal share of the cluster (capped
    at the biggest node) less what the post-processing tasks need (``post_task_cpus``)."""
    import ray

    if use_gpu:
        return 1
    total = float(ray.cluster_resources().get("CPU", 1))
    largest_node = max(
        (float(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")),
        default=total,
    )
    share = min(largest_node, total / max(1, workers)) - post_task_cpus(use_gpu)
    return max(0.5, share)


def post_task_cpus(use_gpu: bool) -> float:
    """CPUs of one post-processing task: a whole one beside GPU actors (the CPUs the GPU
    actors leave free run as many tasks at once); on CPU a quarter, since inference takes ~50x
    longer there and the actors should keep the rest."""
    return 1.0 if use_gpu else 0.25


@contextmanager
def job_data_context():
    """Ray Data settings for this job, restored afterwards.

    A block whose actor died (e.g. out of memory on one huge image) is dropped instead of
    aborting the dataset, so its image gets an error row and every other image is still written;
    an actor pool that cannot start (e.g. ``--gpu`` on a cluster without GPUs) fails after
    ``ACTOR_START_TIMEOUT_S`` instead of waiting forever.
    """
    import ray

    context = ray.data.DataContext.get_current()
    saved = (context.max_errored_blocks, context.wait_for_min_actors_s)
    context.max_errored_blocks = UNLIMITED
    context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    try:
        yield context
    finally:
        context.max_errored_blocks, context.wait_for_min_actors_s = saved


def actor_stage(
    dataset,
    actor_class: type,
    constructor_kwargs: dict[str, Any],
    pool,
    num_cpus: float,
    num_gpus: float | None = None,
    max_task_retries: int = TASK_RETRIES,
):
    """``dataset`` through one stage of ``actor_class`` actors (built with
    ``constructor_kwargs``, each call one row as numpy columns) on the ``pool``
    (a ``ray.data.ActorPoolStrategy``).

    ``max_task_retries``: how often a row whose actor died is retried before the dataset gives
    up on it (Ray Data's default retries forever, with the actor restarted each time: a row that
    runs its actor out of memory would never end).

    An actor class whose calls may run at once in threads says so with a ``CONCURRENT_CALLS``
    attribute (the inference actors: 2, so that one call reads and tiles its image while the
    other's batches are on the device); its pool then runs that many calls per actor.
    """
    extra: dict[str, Any] = {"max_task_retries": max_task_retries}
    if num_gpus is not None:
        extra["num_gpus"] = num_gpus
    pool = with_concurrent_calls(pool, getattr(actor_class, "CONCURRENT_CALLS", 1))
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for max_task_retries yet; without it a row that kills
        # its actor (out of memory) would be retried forever
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return dataset.map_batches(
            actor_class,
            fn_constructor_kwargs=constructor_kwargs,
            batch_size=1,
            batch_format="numpy",
            compute=pool,
            num_cpus=num_cpus,
            **extra,
        )


def with_concurrent_calls(pool, calls: int):
    """``pool`` (a ``ray.data.ActorPoolStrategy``) with ``calls`` calls running at once in each
    actor, in threads of their own (Ray Data otherwise runs an actor's calls one by one)."""
    import ray

    if calls <= 1:
        return pool
    return ray.data.ActorPoolStrategy(
        min_size=pool.min_size,
        max_size=None if pool.max_size == float("inf") else pool.max_size,
        initial_size=pool.initial_size,
        max_tasks_in_flight_per_actor=max(calls, pool.max_tasks_in_flight_per_actor or calls),
        max_concurrent_calls_per_actor=calls,
        enable_true_multi_threading=True,
    )


def actor_gpus(segment: SegmentConfig) -> float:
    """GPUs one inference actor holds: none on CPU, else its share of one GPU
    (``--actors-per-gpu N``: 1/N, N actors with a model each on every GPU)."""
    if not segment.use_gpu:
        return 0
    if segment.actors_per_gpu < 1:
        raise ValueError(f"--actors-per-gpu {segment.actors_per_gpu} must be at least 1")
    return 1.0 / segment.actors_per_gpu


def gpus_needed(segment: SegmentConfig) -> int:
    """Whole GPUs the inference actors of ``segment`` need at once."""
    return math.ceil(segment.workers / segment.actors_per_gpu) if segment.use_gpu else 0


def finish_workers(segment: SegmentConfig) -> int:
    """Post-processing workers: on GPU, every CPU of the cluster the inference actors leave
    free (one CPU each; no cap: labelling and writing are what a GPU job waits for); on CPU,
    one per inference actor."""
    import ray

    if not segment.use_gpu:
        return segment.workers
    free = int(ray.cluster_resources().get("CPU", 1)) - segment.workers
    return max(1, free)


def limit_worker_threads() -> None:
    """One OpenCV thread (and one torch thread, where torch is loaded) in a post-processing
    worker: every CPU runs a worker of its own, and nested thread pools only contend. BLAS and
    OpenMP follow OMP_NUM_THREADS, which Ray sets to the worker's (one) CPU."""
    import cv2

    cv2.setNumThreads(1)
    torch = sys.modules.get("torch")  # never imported here: the workers stay torch-free
    if torch is not None:
        torch.set_num_threads(1)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process_name() -> str:
    """``node:pid`` of this process: names the actor or worker in the result rows."""
    return f"{os.uname().nodename}:{os.getpid()}"


TASKS_IN_FLIGHT_PER_ACTOR = 2  # one image running, one queued: big and small images balance
