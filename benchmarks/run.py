"""The benchmark entry point: runs every part, prints one markdown table, writes results.json.

python benchmarks/run.py [--quick] [--only augment flops train segment] [--json FILE]

Parts (each a ``benchmarks/bench_<part>.py`` with ``run(quick) -> dict``): augmentation images/s
per core, model FLOPs and FLOP/s against a measured matmul peak, training throughput (Ray Train
against plain PyTorch, time waiting for data), segmentation tiling speed and agreement, whole-slide
throughput and per-actor memory (slides). A part
that fails becomes an error row; the others still run. ``--quick`` finishes in minutes on a
2-core CPU; the full mode is meant for a GPU (bf16 autocast, channels_last), same keys.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
DEFAULT_JSON = BENCHMARKS_DIR / "results.json"
PARTS = ("augment", "flops", "train", "segment", "instances", "slides")
ERROR_MESSAGE_CHARS = 300

# (key, description, comparison, target, applies only on a GPU); the table lists them in order.
METRICS = (
    ("train_ray_vs_plain", "Ray Train worker / plain PyTorch, images/s", ">=", 0.95, False),
    ("train_data_wait_fraction", "step time waiting for data (real pipeline)", "<=", 0.05, False),
    ("train_images_per_s_plain", "training images/s, plain PyTorch", None, None, False),
    ("train_images_per_s_ray", "training images/s, one Ray Train worker", None, None, False),
    ("model_gflops_per_image_256", "model GFLOP per 256x256 image (forward)", None, None, False),
    ("matmul_peak_gflops", "measured matmul peak, GFLOP/s", None, None, False),
    ("train_flops_fraction_of_peak", "training FLOP/s / matmul peak", ">=", 0.40, True),
    ("infer_flops_fraction_of_peak", "inference FLOP/s / matmul peak", None, None, False),
    ("segment_mpix_per_s_reference", "segmentation MP/s, reference tiling", None, None, False),
    ("segment_mpix_per_s_default", "segmentation MP/s, default tiling", None, None, False),
    ("segment_speedup_vs_reference_tiling", "default / reference tiling speed", ">=", 3.0, False),
    ("segment_agreement", "pixels equal to whole-image inference", ">=", 0.999, False),
    ("segment_tile_stability", "nuclei equal at tiles 512 / 384 (IoU 0.8)", ">=", 0.97, False),
    (
        "segment_post_overlap_fraction_1_actor",
        "post-processing overlapped by inference",
        None,
        None,
        False,
    ),
    (
        "instances_mp_per_s_per_core",
        "instance labels MP/s per core, mask+contour",
        ">=",
        4.0,
        False,
    ),
    (
        "instances_mp_per_s_per_core_mask",
        "instance labels MP/s per core, mask head",
        ">=",
        4.0,
        False,
    ),
    ("instances_mp_per_s_per_core_before", "... previous post-processing", None, None, False),
    ("instances_peak_bytes_per_pixel", "peak extra bytes/pixel, mask+contour", "<=", 24.0, False),
    ("instances_peak_bytes_per_pixel_mask", "peak extra bytes/pixel, mask head", "<=", 24.0, False),
    ("instances_peak_bytes_per_pixel_before", "... previous post-processing", None, None, False),
    ("augment_images_per_s_per_core", "augmentation images/s per core", None, None, False),
    ("augment_elastic_images_per_s_per_core", "... with elastic, per core", None, None, False),
    ("slides_mpix_per_s_16k", "16k x 16k slide MP/s, background skipped", None, None, False),
    ("slides_tissue_mpix_per_s", "slide MP/s of segmented regions", None, None, False),
    ("slides_skipped_fraction_16k", "16k slide regions skipped as background", None, None, False),
    ("slides_rss_ratio_16k_vs_4k", "actor peak RSS, 16k / 4k slide", "<=", 1.10, False),
)
METRICS_BY_KEY = {row[0]: row for row in METRICS}
PART_OF_PREFIX = {
    "train_": "train",
    "model_": "flops",
    "matmul_": "flops",
    "infer_": "flops",
    "segment_": "segment",
    "augment_": "augment",
    "instances_": "instances",
    "slides_": "slides",
}
FLOPS_KEYS = ("train_flops_fraction_of_peak",)  # starts with train_ but belongs to flops


def part_of_metric(key: str) -> str:
    """The part that produces metric ``key``."""
    if key in FLOPS_KEYS:
        return "flops"
    for prefix, part in PART_OF_PREFIX.items():
        if key.startswith(prefix):
            return part
    raise ValueError(f"metric {key!r} belongs to no benchmark part")


# ----------------------------------------------------------------------------- machine


def read_cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The first "model name" in /proc/cpuinfo, else what platform reports."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> dict:
    """CPU, cores, GPU, versions and the load average: what the figures depend on."""
    import ray
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": read_cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "gpu": gpu,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_start": list(os.getloadavg()),
    }


# ----------------------------------------------------------------------------- running


def load_part(part: str):
    """The module ``bench_<part>`` from this folder; FileNotFoundError if it is not written."""
    path = BENCHMARKS_DIR / f"bench_{part}.py"
    if not path.is_file():
        raise FileNotFoundError(f"TODO: {path.name} is not written yet")
    if str(BENCHMARKS_DIR) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS_DIR))
    return importlib.import_module(f"bench_{part}")


def run_parts(parts: list[str], quick: bool) -> tuple[dict, dict, dict]:
    """Run each part; returns (metrics, errors by part, seconds by part). Never raises."""
    metrics, errors, seconds = {}, {}, {}
    for part in parts:
        print(f"[benchmarks] running {part} ({'quick' if quick else 'full'})", flush=True)
        started = time.perf_counter()
        try:
            metrics.update(load_part(part).run(quick=quick))
        except Exception as error:  # one part failing must not lose the others' figures
            traceback.print_exc()
            errors[part] = one_line(f"{type(error).__name__}: {error}")
        seconds[part] = round(time.perf_counter() - started, 1)
        print(f"[benchmarks] {part} done in {seconds[part]} s", flush=True)
    return metrics, errors, seconds


def one_line(message: str) -> str:
    first = message.strip().splitlines()[0] if message.strip() else message
    return first[:ERROR_MESSAGE_CHARS]


# ----------------------------------------------------------------------------- the table


def check_target(value: float, comparison: str, target: float) -> bool:
    if comparison == ">=":
        return value >= target
    if comparison == "<=":
        return value <= target
    raise ValueError(f"unknown comparison {comparison!r}; use '>=' or '<='")


def target_met(key: str, value, has_gpu: bool) -> bool | None:
    """Whether ``value`` meets ``key``'s target; None without a target, without a number, or
    for a GPU-only target on a machine without a GPU."""
    _, _, comparison, target, gpu_only = METRICS_BY_KEY[key]
    if comparison is None or (gpu_only and not has_gpu):
        return None
    if not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return check_target(value, comparison, target)


def target_status(key: str, value, has_gpu: bool) -> tuple[str, str]:
    """(target text, met text) for one metric row."""
    _, _, comparison, target, gpu_only = METRICS_BY_KEY[key]
    if comparison is None:
        return "", ""
    symbol = "≥" if comparison == ">=" else "≤"
    text = f"{symbol} {target:g}" + (" (GPU)" if gpu_only else "")
    if gpu_only and not has_gpu:
        return text, "n/a (no GPU)"
    met = target_met(key, value, has_gpu)
    return text, {True: "yes", False: "**no**", None: "?"}[met]


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


def format_table(metrics: dict, errors: dict, parts: list[str], has_gpu: bool) -> str:
    """The markdown table: metric | value | target | met?, then one error row per failed part."""
    lines = ["| metric | value | target | met? |", "| --- | --- | --- | --- |"]
    for key, description, *_ in METRICS:
        part = part_of_metric(key)
        if part not in parts or part in errors:
            continue
        value = metrics.get(key)
        target, met = target_status(key, value, has_gpu)
        shown = "missing" if value is None else format_value(value)
        lines.append(f"| `{key}` ({description}) | {shown} | {target} | {met} |")
    for part, message in errors.items():
        lines.append(f"| {part}: error | {one_line(message).replace('|', '/')} | | |")
    return "\n".join(lines)


def format_machine(machine: dict, mode: str) -> str:
    gpu = machine["gpu"] or "no GPU"
    load = ", ".join(f"{value:.2f}" for value in machine["load_average_start"])
    return (
        f"Mode {mode}; {machine['cpu']}, {machine['usable_cpus']} usable CPUs; {gpu}; "
        f"torch {machine['torch']}, ray {machine['ray']}, Python {machine['python']}; "
        f"load average at start {load}"
    )


def build_report(metrics: dict, errors: dict, seconds: dict, machine: dict, mode: str) -> dict:
    """The results.json object: every figure at top level, plus machine, mode and errors."""
    has_gpu = machine["gpu"] is not None
    targets = {
        key: {
            "target": f"{comparison} {target:g}" + (" on a GPU" if gpu_only else ""),
            "met": target_met(key, metrics[key], has_gpu),
        }
        for key, _, comparison, target, gpu_only in METRICS
        if comparison is not None and key in metrics
    }
    return {
        "mode": mode,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "parts": list(seconds),
        "part_seconds": seconds,
        "errors": errors,
        "targets": targets,
        **metrics,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a 2-core CPU")
    parser.add_argument("--only", nargs="+", choices=PARTS, metavar="PART", help=f"of {PARTS}")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="results file to write")
    args = parser.parse_args(argv)
    parts = [part for part in PARTS if part in (args.only or PARTS)]
    mode = "quick" if args.quick else "full"
    machine = describe_machine()
    metrics, errors, seconds = run_parts(parts, args.quick)
    machine["load_average_end"] = list(os.getloadavg())
    report = build_report(metrics, errors, seconds, machine, mode)
    Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print()
    print(format_machine(machine, mode))
    print()
    print(format_table(metrics, errors, parts, machine["gpu"] is not None))
    print(f"\nwrote {args.json}; parts took {seconds} s")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
