"""Augmentation throughput per CPU core at 256x256, with and without elastic deformation.

python benchmarks/bench_augment.py [--quick] [--json FILE]     # prints a markdown table

One process, OpenCV limited to one thread, synthetic 256x256 images (the three styles in turn,
generated before timing). Each figure applies ``unet_ray.pipelines.data.build_augmentation`` (the training
pipeline's albumentations Compose) to N images after a short warm-up; images/s per core is N over
the CPU time the process used (so other load on the machine does not count), and the wall-clock
rate is given beside it. "training UDF" is the whole per-epoch map function at the default
elastic probability: decode a 256 tile from Parquet bytes, augment, convert to float tensors.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from bench_common import standalone_main  # noqa: E402

SIDE = 256
QUICK_IMAGES = 64
FULL_IMAGES = 512
WARMUP_IMAGES = 4
STYLES = ("fluorescence", "brightfield", "he")
IMAGE_SEED = 0
AUGMENT_SEED = 0


def make_images(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` synthetic (image, labels) pairs of SIDE x SIDE, styles in turn."""
    from unet_ray.io.synth import generate_sample

    rng = np.random.default_rng(IMAGE_SEED)
    return [generate_sample(rng, SIDE, SIDE, STYLES[index % len(STYLES)]) for index in range(count)]


def time_calls(function, items) -> tuple[float, float]:
    """(CPU seconds, wall seconds) to call ``function`` on every item."""
    for item in items[:WARMUP_IMAGES]:
        function(item)
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    for item in items:
        function(item)
    return time.process_time() - cpu_started, time.perf_counter() - wall_started


def measure_augmentation(images, elastic_probability: float) -> tuple[float, float]:
    """(images per CPU-second, images per wall-second) of build_augmentation + augment_sample."""
    from unet_ray.pipelines.data import augment_sample, build_augmentation

    transform = build_augmentation(elastic_probability, seed=AUGMENT_SEED)
    cpu, wall = time_calls(lambda pair: augment_sample(pair[0], pair[1], transform), images)
    return len(images) / cpu, len(images) / wall


def measure_training_udf(images, elastic_probability: float) -> tuple[float, float]:
    """Images/s of ``augment_batch`` (the map_batches function) on one-tile batches."""
    from unet_ray.pipelines.data import augment_batch

    batches = [
        {
            "image": np.array([image.tobytes()], dtype=object),
            "labels": np.array([labels.astype(np.int32).tobytes()], dtype=object),
            "height": np.array([SIDE], dtype=np.int32),
            "width": np.array([SIDE], dtype=np.int32),
        }
        for image, labels in images
    ]
    cpu, wall = time_calls(
        lambda batch: augment_batch(batch, SIDE, True, elastic_probability), batches
    )
    return len(images) / cpu, len(images) / wall


def run(quick: bool = True) -> dict[str, float]:
    """Augmentation figures; ``quick`` times 64 images per setting instead of 512."""
    import cv2

    from unet_ray.core.config import DataConfig

    previous_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        count = QUICK_IMAGES if quick else FULL_IMAGES
        images = make_images(count)
        default_elastic = DataConfig().elastic_probability
        results: dict[str, float] = {"augment_images": count, "augment_side": SIDE}
        for name, elastic in (
            ("augment", 0.0),
            ("augment_elastic", 1.0),
            ("augment_default", default_elastic),
        ):
            per_cpu_second, per_wall_second = measure_augmentation(images, elastic)
            results[f"{name}_images_per_s_per_core"] = per_cpu_second
            results[f"{name}_images_per_s_wall"] = per_wall_second
        per_cpu_second, per_wall_second = measure_training_udf(images, default_elastic)
        results["augment_udf_images_per_s_per_core"] = per_cpu_second
        results["augment_udf_images_per_s_wall"] = per_wall_second
        results["augment_default_elastic_probability"] = default_elastic
    finally:
        cv2.setNumThreads(previous_threads)
    return results


def format_table(results: dict[str, float]) -> str:
    side, count = int(results["augment_side"]), int(results["augment_images"])
    elastic = results["augment_default_elastic_probability"]
    lines = [
        f"Augmentation of {side}x{side} images ({count} per row, one process, OpenCV 1 thread)",
        "",
        "| pipeline | images/s per core (CPU time) | images/s (wall) |",
        "| --- | --- | --- |",
    ]
    for name, title in (
        ("augment", "five transformations, no elastic"),
        ("augment_elastic", "five transformations + elastic (p=1)"),
        ("augment_default", f"five transformations + elastic (p={elastic:g}, default)"),
        ("augment_udf", f"training UDF: decode + augment (p={elastic:g}) + tensors"),
    ):
        lines.append(
            f"| {title} | {results[f'{name}_images_per_s_per_core']:.0f} "
            f"| {results[f'{name}_images_per_s_wall']:.0f} |"
        )
    slowdown = (
        results["augment_images_per_s_per_core"] / results["augment_elastic_images_per_s_per_core"]
    )
    lines += ["", f"Elastic deformation at p=1 costs {slowdown:.1f}x the time of the other five."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return standalone_main(
        __doc__.splitlines()[0], run, format_table, "64 images per setting, not 512", argv
    )


if __name__ == "__main__":
    sys.exit(main())
