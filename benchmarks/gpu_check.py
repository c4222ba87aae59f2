"""`make gpu-check`: what one GPU gives, in one command (at most ~8 minutes, no network).

Prints the environment (nvidia-smi, torch and CUDA versions, Ray's GPU count, /dev/shm size),
then measures, sampling GPU utilisation and memory (nvidia-smi, or pynvml when installed) during
each step:

1. ``unet-ray train --gpu`` for 2 epochs on synthetic data (a subprocess, as a user runs it):
   training images/s of the second epoch (its steps x batch over its seconds, validation and
   checkpoint included);
2. a plain-PyTorch bf16 training step (channels-last, cuDNN benchmark) at batch 16 and 64: the
   ceiling the Ray run is compared with;
3. segmentation with ``--gpu`` of a synthetic image collection and of a synthetic 16k x 16k
   pyramidal slide (``pipelines.segment.run_segmentation`` on one local Ray): megapixels/s from
   the job's start (actors, model loading) to its manifest.

One table goes to the console; the figures go to ``GPU_CHECK_OUT/gpu_check.json`` (default
``gpu_check/``). ``--dry-run`` (``make gpu-check DRY_RUN=1``) runs the same steps on the CPU at
tiny sizes in a few minutes: it checks the machinery, its figures mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

OUT_ENV = "GPU_CHECK_OUT"
DEFAULT_OUT = "gpu_check"
SAMPLE_INTERVAL_S = 0.5  # GPU utilisation sampling period
SMI_QUERY = "utilization.gpu,memory.used"
DRY_RUN_REGION = 512  # slide region side of the dry run: its 768-px slide is still 4 regions

# (GPU run, dry run) sizes of every step
SIZES = {
    "gpu": {
        "train": {"synth": 64, "image": 256, "tile": 256, "batch": 16, "steps": 60, "workers": 1},
        "plain_batches": (16, 64),
        "plain_side": 256,
        "plain_steps": (5, 20),  # warm-up, timed
        "collection": {"count": 96, "side": 1024},
        "slide_side": 16384,
        "segment": {"workers": 2, "actors_per_gpu": 2, "batch_size": 16},
    },
    "dry": {
        "train": {"synth": 6, "image": 64, "tile": 64, "batch": 2, "steps": 2, "workers": 1},
        "plain_batches": (2, 4),
        "plain_side": 64,
        "plain_steps": (1, 2),
        "collection": {"count": 2, "side": 128},
        "slide_side": 768,
        "segment": {"workers": 1, "actors_per_gpu": 1, "batch_size": 4},
    },
}


# ----------------------------------------------------------------------------- GPU sampling


class GpuSampler:
    """Samples GPU utilisation (%) and memory used (MiB) of every GPU in a thread while the
    ``with`` block runs; no samples where there is neither pynvml nor nvidia-smi."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S):
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []  # (busy %, memory MiB), max over GPUs
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.read = gpu_reader()

    def __enter__(self):
        if self.read is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            sample = self.read()
            if sample:
                self.samples.append(sample)

    def summary(self) -> dict[str, float | None]:
        if not self.samples:
            return {"gpu_busy_pct": None, "gpu_memory_peak_mib": None}
        busy = [sample[0] for sample in self.samples]
        return {
            "gpu_busy_pct": round(float(np.mean(busy)), 1),
            "gpu_memory_peak_mib": max(sample[1] for sample in self.samples),
        }


def gpu_reader():
    """A function returning (utilisation %, memory used MiB) of the busiest GPU, or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [
            pynvml.nvmlDeviceGetHandleByIndex(index) for index in range(pynvml.nvmlDeviceGetCount())
        ]

        def read_nvml():
            rates = [pynvml.nvmlDeviceGetUtilizationRates(handle).gpu for handle in handles]
            memory = [pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20 for handle in handles]
            return (max(rates), max(memory)) if handles else None

        return read_nvml
    except Exception:  # no pynvml, or no driver: try nvidia-smi
        pass
    if shutil.which("nvidia-smi") is None:
        return None

    def read_smi():
        try:
            text = subprocess.run(
                ["nvidia-smi", f"--query-gpu={SMI_QUERY}", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout
            rows = [[float(value) for value in line.split(",")] for line in text.splitlines()]
            return (max(row[0] for row in rows), max(row[1] for row in rows)) if rows else None
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    return read_smi


# ----------------------------------------------------------------------------- environment


def describe_environment() -> dict:
    import torch

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "ray_gpus": ray_gpu_count(),
        "shm_gib": round(shutil.disk_usage("/dev/shm").total / 2**30, 1)
        if os.path.isdir("/dev/shm")
        else None,
        "cpus": os.cpu_count(),
    }
    smi = shutil.which("nvidia-smi")
    info["nvidia_smi"] = (
        subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout.strip()
        if smi
        else "nvidia-smi not found"
    )
    return info


def ray_gpu_count() -> float | None:
    """The GPUs Ray would give a local Ray on this machine (its own detection), without
    starting Ray."""
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        manager = get_accelerator_manager_for_resource("GPU")
        return manager.get_current_node_num_accelerators()
    except Exception:  # a private API that moved: say so rather than guess
        return None


# ----------------------------------------------------------------------------- 1. Ray training


def run_ray_training(out: Path, sizes: dict, use_gpu: bool) -> dict:
    """``unet-ray train`` for 2 epochs on synthetic data; the second epoch's images/s."""
    train = sizes["train"]
    output = out / "train"
    shutil.rmtree(output, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "unet_ray.cli",
        "train",
        "--output",
        str(output),
        "--epochs",
        "2",
        "--synth-count",
        str(train["synth"]),
        "--image-size",
        str(train["image"]),
        "--tile-size",
        str(train["tile"]),
        "--batch-size",
        str(train["batch"]),
        "--min-steps-per-epoch",
        str(train["steps"]),
        "--workers",
        str(train["workers"]),
        "--encoder-weights",
        "none",
        "--no-instance-search",
        *(["--gpu"] if use_gpu else []),
    ]
    started = time.perf_counter()
    with GpuSampler() as sampler:
        finished = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise RuntimeError(f"unet-ray train failed ({finished.returncode}):\n{finished.stderr}")
    history = list(csv.DictReader((output / "metrics.csv").open()))
    steps = training_steps(output, train)
    last = float(history[-1]["seconds"])
    return {
        "command": " ".join(command[2:]),
        "wall_s": round(seconds, 1),
        "epoch_s": [float(row["seconds"]) for row in history],
        "steps_per_epoch": steps,
        "images_per_s": significant(steps * train["batch"] / last),
        "checkpoint": str(output / "best"),
        **sampler.summary(),
    }


def training_steps(output: Path, train: dict) -> int:
    """Steps of one epoch, computed as the run computed them (its prepared tiles)."""
    from unet_ray.pipelines.data import tile_copies
    from unet_ray.pipelines.train_loop import per_worker_batch_size, steps_per_worker_epoch

    info_files = sorted(output.rglob("dataset.json"))
    info = json.loads(info_files[0].read_text())
    tiles, workers = info["train"]["tiles"], train["workers"]
    batch = per_worker_batch_size(train["batch"], workers)
    copies = tile_copies(tiles, workers, batch, train["steps"])
    return steps_per_worker_epoch(tiles * copies, workers, batch)


# ----------------------------------------------------------------------------- 2. plain step


def run_plain_steps(sizes: dict, use_gpu: bool) -> dict:
    """Images/s of a plain-PyTorch training step (bf16 autocast, channels-last, cuDNN benchmark
    on a GPU; float32 on the CPU) at each batch size, with peak GPU memory."""
    import torch

    from unet_ray.core.losses import build_loss
    from unet_ray.core.model import UNetVGG16BN

    device = torch.device("cuda" if use_gpu else "cpu")
    torch.backends.cudnn.benchmark = use_gpu
    warmup, timed = sizes["plain_steps"]
    side = sizes["plain_side"]
    results = {}
    for batch in sizes["plain_batches"]:
        torch.manual_seed(0)
        model = UNetVGG16BN().to(device, memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_function = build_loss("bce")
        images = torch.rand(batch, 3, side, side, device=device)
        images = images.contiguous(memory_format=torch.channels_last)
        masks = (torch.rand(batch, 1, side, side, device=device) > 0.7).float()
        if use_gpu:
            torch.cuda.reset_peak_memory_stats()
        with GpuSampler() as sampler:
            for step in range(warmup + timed):
                if step == warmup:
                    synchronise(device)
                    started = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_gpu):
                    loss = loss_function(model(images).float(), masks)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            synchronise(device)
            seconds = time.perf_counter() - started
        results[str(batch)] = {
            "images_per_s": significant(batch * timed / seconds),
            "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20)
            if use_gpu
            else None,
            **sampler.summary(),
        }
        del model, optimizer, images, masks
    return results


def synchronise(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- 3. segmentation


def write_collection(folder: Path, count: int, side: int) -> float:
    """``count`` synthetic side x side PNGs, mosaics of a few generated samples; megapixels."""
    from PIL import Image

    from unet_ray.io.synth import generate_sample

    folder.mkdir(parents=True, exist_ok=True)
    piece = min(side, 512)
    pieces = [
        generate_sample(np.random.default_rng(seed), piece, piece, style)[0]
        for seed, style in enumerate(("he", "fluorescence", "brightfield", "he"))
    ]
    repeats = -(-side // piece)
    for index in range(count):
        rows = [
            np.concatenate(
                [pieces[(index + row + column) % len(pieces)] for column in range(repeats)], axis=1
            )
            for row in range(repeats)
        ]
        image = np.concatenate(rows, axis=0)[:side, :side]
        Image.fromarray(np.rot90(image, index % 4).copy()).save(folder / f"image{index:04d}.png")
    return count * side * side / 1e6


def write_slide(folder: Path, side: int) -> float:
    """A synthetic side x side pyramidal OME-TIFF (tissue on three quarters, background
    elsewhere; a few distinct tissue samples repeated, uncompressed so that writing it is quick);
    megapixels."""
    from unet_ray.io.slide_synth import PATCH_SIDE, Patch, write_synthetic_slide
    from unet_ray.io.synth import generate_sample

    folder.mkdir(parents=True, exist_ok=True)
    pool = [
        generate_sample(np.random.default_rng(seed), PATCH_SIDE, PATCH_SIDE, "he")[0]
        for seed in range(4)
    ]
    tissue_rows = side * 3 // 4
    patches = [
        Patch(top, left, pool[(top // PATCH_SIDE + left // PATCH_SIDE) % len(pool)])
        for top in range(0, tissue_rows - PATCH_SIDE + 1, PATCH_SIDE)
        for left in range(0, side - PATCH_SIDE + 1, PATCH_SIDE)
    ]
    write_synthetic_slide(str(folder / "slide.ome.tif"), side, side, patches, compression=None)
    return side * side / 1e6


def run_segmentation_step(checkpoint: str, source: Path, output: Path, sizes: dict, use_gpu: bool):
    from unet_ray.core.config import InstanceConfig, SegmentConfig, SlideConfig
    from unet_ray.pipelines.segment import run_segmentation

    segment = SegmentConfig(
        use_gpu=use_gpu,
        overwrite=True,
        workers=sizes["segment"]["workers"],
        actors_per_gpu=sizes["segment"]["actors_per_gpu"] if use_gpu else 1,
        batch_size=sizes["segment"]["batch_size"],
    )
    slide = SlideConfig() if use_gpu else SlideConfig(region=DRY_RUN_REGION)
    shutil.rmtree(output, ignore_errors=True)
    started = time.perf_counter()
    with GpuSampler() as sampler:
        summary = run_segmentation(
            checkpoint, str(source), str(output), segment, InstanceConfig(), slide=slide
        )
    seconds = time.perf_counter() - started
    if summary.error:
        failed = [row for row in summary.rows if row["status"] != "ok"]
        raise RuntimeError(f"segmentation of {source} failed: {failed[:3]}")
    return seconds, sampler.summary()


def run_segmentations(out: Path, checkpoint: str, sizes: dict, use_gpu: bool) -> dict:
    from unet_ray.runtime.cluster import init_ray

    collection = sizes["collection"]
    megapixels = write_collection(out / "collection", collection["count"], collection["side"])
    slide_megapixels = write_slide(out / "slide", sizes["slide_side"])
    init_ray()
    results = {}
    for name, source, pixels in (
        ("collection", out / "collection", megapixels),
        ("slide", out / "slide", slide_megapixels),
    ):
        seconds, gpu = run_segmentation_step(
            checkpoint, source, out / f"{name}_out", sizes, use_gpu
        )
        results[name] = {
            "megapixels": round(pixels, 1),
            "seconds": round(seconds, 1),
            "megapixels_per_s": significant(pixels / seconds),
            **gpu,
        }
    return results


# ----------------------------------------------------------------------------- the table


def significant(value: float, digits: int = 3) -> float:
    """``value`` to ``digits`` significant digits (a dry run's 0.004 MP/s is not 0.0)."""
    return float(f"{value:.{digits}g}")


def format_table(results: dict) -> str:
    def cell(value, unit=""):
        return "n/a" if value is None else f"{value:g}{unit}"

    train, plain, segment = results["train"], results["plain"], results["segmentation"]
    lines = [
        f"gpu-check on {results['environment']['device']}"
        + (" (DRY RUN on the CPU: figures mean nothing)" if results["dry_run"] else ""),
        f"{'measure':44} {'value':>12} {'GPU busy':>9} {'peak GPU MiB':>13}",
    ]

    def row(name, value, unit, gpu):
        peak = gpu.get("gpu_memory_peak_mib")
        if gpu.get("peak_memory_mib") is not None:
            peak = gpu["peak_memory_mib"]
        lines.append(
            f"{name:44} {cell(value, unit):>12} {cell(gpu.get('gpu_busy_pct'), '%'):>9} "
            f"{cell(None if peak is None else round(peak)):>13}"
        )

    batch = results["sizes"]["train"]["batch"]
    row(f"train img/s, Ray (batch {batch}, epoch 2 with val.)", train["images_per_s"], "", train)
    for size, figures in plain.items():
        row(f"train img/s, plain PyTorch step, batch {size}", figures["images_per_s"], "", figures)
    ratio = (
        train["images_per_s"] / max(plain[str(batch)]["images_per_s"], 1e-9)
        if str(batch) in plain
        else None
    )
    lines.append(f"{'Ray / plain at the same batch':44} {cell(ratio and round(ratio, 2)):>12}")
    row(
        "segment MP/s, collection",
        segment["collection"]["megapixels_per_s"],
        "",
        segment["collection"],
    )
    row("segment MP/s, slide", segment["slide"]["megapixels_per_s"], "", segment["slide"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (minutes)")
    parser.add_argument("--out", default=os.environ.get(OUT_ENV) or DEFAULT_OUT)
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    use_gpu = not args.dry_run
    sizes = SIZES["dry" if args.dry_run else "gpu"]

    environment = describe_environment()
    print(environment.pop("nvidia_smi"))
    print(json.dumps(environment, indent=2))
    if use_gpu and not environment["cuda_available"]:
        print("gpu-check: torch sees no CUDA device (make gpu-check DRY_RUN=1 runs on the CPU)")
        return 2
    started = time.perf_counter()
    results = {"dry_run": args.dry_run, "environment": environment, "sizes": sizes}
    steps = (
        ("train", "unet-ray train, 2 epochs", lambda: run_ray_training(out, sizes, use_gpu)),
        ("plain", "plain PyTorch training steps", lambda: run_plain_steps(sizes, use_gpu)),
        (
            "segmentation",
            "segmentation: collection and slide",
            lambda: run_segmentations(out, results["train"]["checkpoint"], sizes, use_gpu),
        ),
    )
    results["step_s"] = {}
    for number, (key, title, run) in enumerate(steps, start=1):
        print(f"[gpu-check] {number}/{len(steps)} {title}", flush=True)
        step_started = time.perf_counter()
        results[key] = run()
        results["step_s"][key] = round(time.perf_counter() - step_started, 1)
    results["total_s"] = round(time.perf_counter() - started, 1)
    table = format_table(results)
    print(table)
    steps_line = ", ".join(f"{key} {value} s" for key, value in results["step_s"].items())
    print(f"total {results['total_s']} s ({steps_line}); figures in {out / 'gpu_check.json'}")
    (out / "gpu_check.json").write_text(json.dumps({**results, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
