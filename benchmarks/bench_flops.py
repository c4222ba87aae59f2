"""Model FLOPs per image and the achieved training and inference FLOP/s against a measured peak.

python benchmarks/bench_flops.py [--quick] [--json FILE]     # prints a markdown table

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no compute):
convolutions, transposed convolutions and matrix products, 2 FLOPs per multiply-add; a training
step counts the forward and the backward pass. The peak is the best rate of a large square
``torch.matmul`` timed in the same run, before and after the model (fp32 on a CPU, bf16 on a
GPU). Achieved rates time the model on in-memory random tensors (training: ``bench_train``'s
step and loop; inference: ``torch.inference_mode``): images/s from the fastest step (as the peak
is the fastest repetition: other load on the machine only slows steps down), times the counted
FLOPs per image. On a GPU the model runs under bf16 autocast with channels_last.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_train, when imported from tests

import bench_train  # noqa: E402
from bench_common import standalone_main  # noqa: E402

REFERENCE_SIDE = 256  # the reported FLOPs are per 256x256 image (the training tile side)
GIGA = 1e9
# Image side, batch, untimed and timed steps of the model; matrix side and timed repetitions.
SIZES = {
    ("cpu", "quick"): {"side": 128, "batch": 2, "warmup": 1, "steps": 3, "matmul": (2048, 5)},
    ("cpu", "full"): {"side": 256, "batch": 4, "warmup": 2, "steps": 5, "matmul": (2048, 10)},
    ("cuda", "quick"): {"side": 256, "batch": 32, "warmup": 10, "steps": 20, "matmul": (8192, 10)},
    ("cuda", "full"): {"side": 256, "batch": 32, "warmup": 20, "steps": 50, "matmul": (8192, 20)},
}
MATMUL_INNER = {"cpu": 1, "cuda": 10}  # products per timed repetition (GPU: amortise the launch)
MATMUL_WARMUP = 2
INFERENCE_STEP_FACTOR = 3  # an inference step costs about a third of a training step: time more


def count_flops(model, input_shape: tuple[int, ...], backward: bool = False) -> int:
    """FLOPs of one forward pass (plus the backward pass of a mean of the output when
    ``backward``) of ``model`` on a meta tensor of ``input_shape``; ``model`` must be on meta."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    inputs = torch.empty(input_shape, device="meta")
    with FlopCounterMode(display=False) as counter:
        outputs = model(inputs)
        if backward:
            outputs.float().mean().backward()
    return int(counter.get_total_flops())


def count_model_flops(side: int) -> tuple[int, int]:
    """(forward FLOPs, training-step FLOPs) of the U-Net for one ``side`` x ``side`` image."""
    import torch

    from unet_ray.core.model import UNetVGG16BN

    with torch.device("meta"):
        model = UNetVGG16BN()
    shape = (1, 3, side, side)
    return count_flops(model, shape), count_flops(model, shape, backward=True)


def matmul_flops(side: int) -> int:
    """FLOPs of one side x side by side x side matrix product."""
    return 2 * side**3


def measure_matmul_peak(device, side: int, reps: int, dtype) -> float:
    """Best FLOP/s of ``side`` x ``side`` matrix products over ``reps`` timed repetitions."""
    import torch

    generator = torch.Generator().manual_seed(0)
    left = torch.rand((side, side), generator=generator).to(device=device, dtype=dtype)
    right = torch.rand((side, side), generator=generator).to(device=device, dtype=dtype)
    inner = MATMUL_INNER[device.type]
    best_seconds = float("inf")
    for repetition in range(MATMUL_WARMUP + reps):
        bench_train.synchronise(device)
        started = time.perf_counter()
        for _ in range(inner):
            torch.matmul(left, right)
        bench_train.synchronise(device)
        if repetition >= MATMUL_WARMUP:
            best_seconds = min(best_seconds, time.perf_counter() - started)
    return inner * matmul_flops(side) / best_seconds


def measure_inference_throughput(settings: dict, device) -> float:
    """Inference images/s (fastest step) on in-memory random tensors."""
    import torch

    model, _, _ = bench_train.build_training_objects(settings, device)
    model.eval()
    batches = bench_train.make_random_batches(settings, device)
    step_seconds = []
    with torch.inference_mode():
        for step in range(settings["warmup"] + INFERENCE_STEP_FACTOR * settings["steps"]):
            images = batches[step % len(batches)][0]
            if settings["channels_last"]:
                images = images.contiguous(memory_format=torch.channels_last)
            bench_train.synchronise(device)
            started = time.perf_counter()
            with bench_train.autocast_context(device, settings["bf16"]):
                model(images)
            bench_train.synchronise(device)
            if step >= settings["warmup"]:
                step_seconds.append(time.perf_counter() - started)
    return bench_train.images_per_second(step_seconds, settings["batch"])


def flops_settings(quick: bool, use_gpu: bool) -> dict:
    """bench_train's settings (precision, threads, optimiser) with this benchmark's sizes."""
    sizes = SIZES[bench_train.size_key(quick, use_gpu)]
    return {**bench_train.benchmark_settings(quick, use_gpu), **sizes}


def run(quick: bool = True) -> dict[str, float]:
    """All FLOP figures; ``quick`` times 3 steps at 128 px on a CPU."""
    import torch

    device = bench_train.select_device()
    settings = flops_settings(quick, device.type == "cuda")
    peak_dtype = torch.bfloat16 if settings["bf16"] else torch.float32
    forward_256, training_256 = count_model_flops(REFERENCE_SIDE)
    forward, training = count_model_flops(settings["side"])
    previous_threads = bench_train.configure_threads(settings)
    try:
        matmul_side, matmul_reps = settings["matmul"]
        peak = measure_matmul_peak(device, matmul_side, matmul_reps, peak_dtype)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        inference_rate = measure_inference_throughput(settings, device)
        training_rate = bench_train.measure_in_memory_throughput(settings, device)["images_per_s"]
        # the peak is timed again after the model: the best of both (a busy machine)
        peak = max(peak, measure_matmul_peak(device, matmul_side, matmul_reps, peak_dtype))
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "model_gflops_per_image_256": forward_256 / GIGA,
        "model_train_gflops_per_image_256": training_256 / GIGA,
        "matmul_peak_gflops": peak / GIGA,
        "matmul_peak_dtype": str(peak_dtype).removeprefix("torch."),
        "train_gflops_per_s": training * training_rate / GIGA,
        "infer_gflops_per_s": forward * inference_rate / GIGA,
        "train_flops_fraction_of_peak": training * training_rate / peak,
        "infer_flops_fraction_of_peak": forward * inference_rate / peak,
        "flops_train_images_per_s": training_rate,
        "flops_infer_images_per_s": inference_rate,
        "flops_side": settings["side"],
        "flops_batch": settings["batch"],
        "flops_device": str(device),
        "flops_precision": "bf16 autocast, channels_last" if settings["bf16"] else "fp32",
    }


def format_table(results: dict) -> str:
    side, batch = results["flops_side"], results["flops_batch"]
    return "\n".join(
        [
            f"U-Net FLOPs: {results['model_gflops_per_image_256']:.1f} GFLOP forward and "
            f"{results['model_train_gflops_per_image_256']:.1f} GFLOP per training step "
            f"per {REFERENCE_SIDE}x{REFERENCE_SIDE} image",
            f"Timed at {side}x{side}, batch {batch}, on {results['flops_device']} "
            f"({results['flops_precision']}); peak: {results['matmul_peak_dtype']} matmul",
            "",
            "| measurement | GFLOP/s | fraction of peak | images/s |",
            "| --- | --- | --- | --- |",
            f"| matmul peak | {results['matmul_peak_gflops']:.1f} | 1 | |",
            f"| training | {results['train_gflops_per_s']:.1f} "
            f"| {results['train_flops_fraction_of_peak']:.3f} "
            f"| {results['flops_train_images_per_s']:.3f} |",
            f"| inference | {results['infer_gflops_per_s']:.1f} "
            f"| {results['infer_flops_fraction_of_peak']:.3f} "
            f"| {results['flops_infer_images_per_s']:.3f} |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    return standalone_main(
        __doc__.splitlines()[0], run, format_table, "128 px, a few steps (CPU)", argv
    )


if __name__ == "__main__":
    sys.exit(main())
