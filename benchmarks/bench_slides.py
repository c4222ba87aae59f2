"""Whole slides: megapixels per second, background skipped, per-actor peak memory vs slide size.

python benchmarks/bench_slides.py [--quick]     # prints a markdown table

Two synthetic pyramidal OME-TIFFs (tiled 256 px, zlib, written tile by tile), 4k x 4k and
16k x 16k, carry the same tissue (synthetic H&E) on glass; each is segmented by its own
`run_segmentation` job (one inference actor and its post-processing workers, fresh, so their
peak RSS is that slide's), through the whole path: tissue mask, regions on Ray Data, outputs
assembled. Peak RSS is each process's ``ru_maxrss``: the inference actor's (model, torch, one
region's window and maps) and the post-processing workers' (one region's maps, labels and part);
neither must grow with the slide (target: the 16k slide's within 10 % of the 4k one's). The time
split sums the regions' reading and inference (stage 1, the actor) and post-processing (labels,
ownership, polygons, table) and part writing (stage 2, CPU workers); "beside" is the part of
stage 2 that ran while the actor was already reading or inferring its next region (hidden from the
wall time), so "other" = wall - plan - read - infer - (post + write - beside) - assemble: actor
start, model load, Ray Data, the last region's hand-off.
The model is the U-Net after ``TRAIN_STEPS`` SGD steps on synthetic H&E (random weights would
give the post-processing blobs instead of nuclei); on a GPU the actor runs there (bf16).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench_common import standalone_main  # noqa: E402

QUICK = {"region": 1024, "tissue": (1100, 1100, 900, 1800)}  # (top, left, height, width)
FULL = {"region": 4096, "tissue": (4200, 4200, 3600, 7200)}
SIDES = {"4k": 4096, "16k": 16384}
MODEL_SEED = 0
TRAIN_STEPS = 8  # SGD steps, batch 4 of 128^2 crops: nucleus-like maps within seconds
MEGA = 1e6
STEPS = ("plan_s", "read_s", "infer_s", "post_s", "write_s", "assemble_s")


def train_briefly():
    """The U-Net after a few SGD steps on synthetic H&E samples (BCE), in eval mode."""
    import numpy as np
    import torch

    from unet_ray.core.model import UNetVGG16BN
    from unet_ray.io.synth import generate_sample

    torch.manual_seed(MODEL_SEED)
    rng = np.random.default_rng(MODEL_SEED)
    samples = [generate_sample(rng, 128, 128, "he") for _ in range(8)]
    images = torch.tensor(np.stack([sample[0] for sample in samples])).permute(0, 3, 1, 2)
    images = images.float() / 255
    masks = torch.tensor(np.stack([sample[1] > 0 for sample in samples])).float()[:, None]
    model = UNetVGG16BN().train()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(TRAIN_STEPS):
        batch = torch.arange(4) + 4 * (step % 2)
        logits = model(images[batch])[:, :1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def write_slides(folder: Path, tissue: tuple[int, int, int, int]) -> dict[str, str]:
    from unet_ray.io.slide_synth import tissue_patches, write_synthetic_slide

    patches = tissue_patches([tissue], seed=1)
    paths = {}
    for name, side in SIDES.items():
        path = folder / name / f"slide_{name}.ome.tif"
        path.parent.mkdir(parents=True)
        write_synthetic_slide(str(path), side, side, patches, mpp=0.5)
        paths[name] = str(path)
    return paths


def measure_slide(checkpoint: str, path: str, output: str, region: int, use_gpu: bool) -> dict:
    """One job over one slide; its summary plus wall time. The actor gets the command's default
    CPUs (on CPU: the machine less the post-processing workers' share)."""
    from unet_ray.core.config import InstanceConfig, SegmentConfig, SlideConfig
    from unet_ray.pipelines.segment import run_segmentation

    segment = SegmentConfig(workers=1, use_gpu=use_gpu, overwrite=True)
    started = time.perf_counter()
    summary = run_segmentation(
        checkpoint, path, output, segment, InstanceConfig(), slide=SlideConfig(region=region)
    )
    seconds = time.perf_counter() - started
    if summary.ok != 1:
        raise RuntimeError(f"slide benchmark job failed: {summary.rows}")
    stem = Path(path).name.split(".")[0]
    document = json.loads(Path(output, f"{stem}.slide.json").read_text())
    document["wall_s"] = seconds
    return document


def run(quick: bool = True) -> dict:
    import ray
    import torch

    from unet_ray.core.config import Config
    from unet_ray.io.checkpoint import save_checkpoint

    settings = QUICK if quick else FULL
    use_gpu = torch.cuda.is_available()
    results: dict = {
        "slides_region": settings["region"],
        "slides_device": "gpu" if use_gpu else "cpu",
    }
    with tempfile.TemporaryDirectory(prefix="bench_slides_") as root:
        checkpoint = os.path.join(root, "checkpoint")
        save_checkpoint(checkpoint, train_briefly(), Config().to_dict(), {})
        started = time.perf_counter()
        paths = write_slides(Path(root), settings["tissue"])
        results["slides_write_inputs_s"] = round(time.perf_counter() - started, 1)
        started_ray = not ray.is_initialized()
        if started_ray:
            ray.init(
                address="local",  # a new instance, never another command's local Ray
                num_cpus=os.cpu_count(),
                include_dashboard=False,
                configure_logging=False,
                log_to_driver=False,
            )
        try:
            for name, path in paths.items():
                document = measure_slide(
                    checkpoint, path, os.path.join(root, f"out_{name}"), settings["region"], use_gpu
                )
                side = SIDES[name]
                region_seconds = sum(document["seconds"][key] for key in STEPS[1:5])
                segmented = document["regions_done"]
                results.update(
                    {
                        f"slides_{name}_wall_s": round(document["wall_s"], 1),
                        f"slides_{name}_mpix_per_s": side * side / MEGA / document["wall_s"],
                        f"slides_{name}_regions": document["regions"],
                        f"slides_{name}_regions_segmented": segmented,
                        f"slides_{name}_skipped_fraction": document["regions_skipped"]
                        / document["regions"],
                        f"slides_{name}_peak_rss_mb": max(
                            document["peak_rss_mb_by_actor"].values()
                        ),
                        f"slides_{name}_post_peak_rss_mb": max(
                            document["peak_rss_mb_by_post_worker"].values()
                        ),
                        f"slides_{name}_nuclei": document["nuclei"],
                        f"slides_{name}_beside_s": document["post_beside_inference_s"],
                        f"slides_{name}_other_s": round(
                            document["wall_s"]
                            - sum(document["seconds"].values())
                            + document["post_beside_inference_s"],
                            1,
                        ),
                        **{
                            f"slides_{name}_{key}": value
                            for key, value in document["seconds"].items()
                        },
                    }
                )
                core_pixels = segmented * settings["region"] ** 2
                results[f"slides_{name}_tissue_mpix_per_s"] = core_pixels / MEGA / region_seconds
        finally:
            if started_ray:
                ray.shutdown()
    results["slides_rss_ratio_16k_vs_4k"] = (
        results["slides_16k_peak_rss_mb"] / results["slides_4k_peak_rss_mb"]
    )
    results["slides_post_rss_ratio_16k_vs_4k"] = (
        results["slides_16k_post_peak_rss_mb"] / results["slides_4k_post_peak_rss_mb"]
    )
    results["slides_mpix_per_s_16k"] = results["slides_16k_mpix_per_s"]
    results["slides_skipped_fraction_16k"] = results["slides_16k_skipped_fraction"]
    results["slides_tissue_mpix_per_s"] = results["slides_16k_tissue_mpix_per_s"]
    return results


def format_table(results: dict) -> str:
    lines = [
        f"Whole slides on {results['slides_device']}, region {results['slides_region']} px, "
        "one inference actor per job, same tissue on both slides",
        "",
        "| slide | regions (segmented) | skipped | nuclei | wall s | slide MP/s "
        "| region MP/s (cores) | plan s | read s | infer s | post s | write s | beside s "
        "| assemble s | other s | actor peak RSS MB | post worker peak RSS MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
        "| --- | --- | --- |",
    ]
    for name in SIDES:
        lines.append(
            f"| {name} | {results[f'slides_{name}_regions']} "
            f"({results[f'slides_{name}_regions_segmented']}) "
            f"| {results[f'slides_{name}_skipped_fraction']:.1%} "
            f"| {results[f'slides_{name}_nuclei']} "
            f"| {results[f'slides_{name}_wall_s']:.1f} "
            f"| {results[f'slides_{name}_mpix_per_s']:.3f} "
            f"| {results[f'slides_{name}_tissue_mpix_per_s']:.3f} "
            + "".join(f"| {results[f'slides_{name}_{step}']:.1f} " for step in STEPS[:5])
            + f"| {results[f'slides_{name}_beside_s']:.1f} "
            f"| {results[f'slides_{name}_assemble_s']:.1f} "
            f"| {results[f'slides_{name}_other_s']:.1f} "
            f"| {results[f'slides_{name}_peak_rss_mb']:.0f} "
            f"| {results[f'slides_{name}_post_peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        f"Peak RSS, 16k / 4k: inference actor {results['slides_rss_ratio_16k_vs_4k']:.3f}, "
        f"post-processing worker {results['slides_post_rss_ratio_16k_vs_4k']:.3f} "
        "(target <= 1.10). Inputs written in "
        f"{results['slides_write_inputs_s']} s. Beside = post-processing and writing while the "
        "actor already read or inferred its next region. Other = actor start, model load, "
        "Ray Data.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return standalone_main(__doc__.splitlines()[0], run, format_table, "region 1024", argv)


if __name__ == "__main__":
    sys.exit(main())
