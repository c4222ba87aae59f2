"""Instance post-processing: speed per core, peak memory, and accuracy from ground-truth maps.

A synthetic 2048 x 2048 fluorescence field (``--quick``: 1024 x 1024) of touching and overlapping
nuclei (``synth.place_nuclei``, mean radius ~10 px: about 2,000 nuclei on 2048^2) is turned into
the maps a well-trained model of each head outputs (blurred mask; blurred contour). Each head's
``instances.instance_labels`` runs in a fresh child process with one thread (OpenCV, BLAS), which
reports the seconds of the best of three runs and its peak resident memory (Linux VmHWM, reset
before the runs) above what it held before them. ``before`` is the previous post-processing (distance-transform watershed seeded at
1-px h-maxima, ``min_distance`` 4; kept here as the baseline) on the mask head's map.

python benchmarks/bench_instances.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SIDE, QUICK_SIDE = 2048, 1024
NUCLEUS_RADIUS = 10.0  # mean radius: ~2,000 nuclei on 2048^2 at the synth's coverage
SEED = 3
REPEATS = 3
CHILD = """
import json, sys, time
import cv2, numpy as np
cv2.setNumThreads(1)
sys.path.insert(0, {benchmarks!r})
from unet_ray.instances import instance_labels
import bench_instances
nucleus = np.load({nucleus!r})
contour = np.load({contour!r}) if {contour!r} else None
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
times = []
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # reset the peak resident size (VmHWM) to the current one
before = status("VmRSS:")
for _ in range({repeats}):
    started = time.perf_counter()
    labels = bench_instances.previous_labels(nucleus) if {previous} else instance_labels(nucleus, contour)
    times.append(time.perf_counter() - started)
    del labels
print(json.dumps({{"seconds": min(times), "extra_bytes": max(0, status("VmHWM:") - before)}}))
"""


def make_maps(side: int, seed: int = SEED):
    """Ground-truth labels and the blurred nucleus and contour maps of one synthetic field."""
    from scipy import ndimage

    from unet_ray.core.instances import contour_target
    from unet_ray.io import synth

    rng = np.random.default_rng(seed)
    saved = synth.MEAN_RADIUS["fluorescence"]
    synth.MEAN_RADIUS["fluorescence"] = (NUCLEUS_RADIUS, NUCLEUS_RADIUS)
    try:
        truth, _ = synth.place_nuclei(rng, side, side, "fluorescence")
    finally:
        synth.MEAN_RADIUS["fluorescence"] = saved
    nucleus = ndimage.gaussian_filter((truth > 0).astype(np.float32), 1.0)
    contour = ndimage.gaussian_filter(contour_target(truth).astype(np.float32), 0.7)
    return truth, nucleus.astype(np.float32), contour.astype(np.float32)


def previous_labels(probabilities: np.ndarray) -> np.ndarray:
    """The post-processing before issue 13, as the speed baseline: threshold 0.5, specks under
    16 px dropped, watershed on the negative float64 distance transform seeded at its 1-px
    h-maxima, peaks at least 4 px apart."""
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.morphology import h_maxima
    from skimage.segmentation import relabel_sequential, watershed

    connectivity = np.ones((3, 3), dtype=bool)
    foreground = probabilities > 0.5
    components, count = ndimage.label(foreground, structure=connectivity)
    sizes = np.bincount(components.ravel())
    keep = sizes >= 16
    keep[0] = False
    foreground = keep[components]
    components, _ = ndimage.label(foreground, structure=connectivity)
    distance = ndimage.distance_transform_edt(foreground)
    maxima = h_maxima(distance, 1.0).astype(bool) & (components > 0)
    regions, region_count = ndimage.label(maxima, structure=connectivity)
    positions = np.array(
        ndimage.maximum_position(distance, labels=regions, index=np.arange(1, region_count + 1))
    )
    heights = np.zeros(distance.shape)
    heights[tuple(positions.T)] = distance[tuple(positions.T)]
    kept = peak_local_max(heights, min_distance=4, labels=components, exclude_border=False)
    seeds = np.where(np.isin(regions, regions[tuple(kept.T)]), regions, 0).astype(np.int32)
    labels = watershed(-distance, seeds, mask=foreground)
    return relabel_sequential(labels)[0].astype(np.int32)


def measure_in_child(folder: Path, nucleus: Path, contour: Path | None, previous: bool) -> dict:
    code = CHILD.format(
        benchmarks=str(Path(__file__).resolve().parent),
        nucleus=str(nucleus),
        contour=str(contour) if contour else "",
        repeats=1 if previous else REPEATS,
        previous=previous,
    )
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    from unet_ray.core.instances import instance_labels
    from unet_ray.core.metrics import dsb_image_score, f1_from_counts, instance_counts

    side = QUICK_SIDE if quick else SIDE
    truth, nucleus, contour = make_maps(side)
    pixels = nucleus.size
    results = {"instances_image_side": side, "instances_true_nuclei": int(truth.max())}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        nucleus_file, contour_file = folder / "nucleus.npy", folder / "contour.npy"
        np.save(nucleus_file, nucleus)
        np.save(contour_file, contour)
        runs = {
            "mask": measure_in_child(folder, nucleus_file, None, previous=False),
            "contour": measure_in_child(folder, nucleus_file, contour_file, previous=False),
            "before": measure_in_child(folder, nucleus_file, None, previous=True),
        }
    for name, measured in runs.items():
        suffix = "" if name == "contour" else f"_{name}"
        results[f"instances_mp_per_s_per_core{suffix}"] = round(
            pixels / measured["seconds"] / 1e6, 2
        )
        results[f"instances_peak_bytes_per_pixel{suffix}"] = round(
            measured["extra_bytes"] / pixels, 1
        )
    for name, labels in (
        ("mask", instance_labels(nucleus)),
        ("contour", instance_labels(nucleus, contour)),
        ("before", previous_labels(nucleus)),
    ):
        suffix = "" if name == "contour" else f"_{name}"
        results[f"instances_truth_dsb{suffix}"] = round(dsb_image_score(truth, labels), 3)
        results[f"instances_truth_f1_50{suffix}"] = round(
            f1_from_counts(*instance_counts(truth, labels, 0.5)), 3
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    results = run(args.quick)
    width = max(len(key) for key in results)
    print(f"| {'metric':<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for key, value in results.items():
        print(f"| {key:<{width}} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
