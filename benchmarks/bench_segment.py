"""Segmentation throughput: the reference report's tiling against the default, and 1 vs 2 actors.

python benchmarks/bench_segment.py [--quick]     # prints a markdown table

Same model (seed 0, eval mode), same machine. Tiling figures time tile extraction, inference,
stitching and the sigmoid for one image in this process (after a warm-up pass; the schemes
alternate and each keeps its best of a few repeats, so a busy machine hurts both alike).
Agreement compares each scheme's thresholded mask (0.5) with one whole-image pass of the model,
for two models: the model as trained briefly here (``train_briefly``: SGD on random crops of other
synthetic mosaics, the project's BCE loss, a few minutes on 2 CPU cores), which is what a user's
checkpoint behaves like, and the random-weight model, whose many probabilities sit right at the
threshold (the worst case; reported, not the target). ``segment_agreement`` is the trained model's.
Actor figures time the whole Ray Data job (reading, inference, instance labels, five outputs per
image, actor start and model loading included) on a folder of images.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import standalone_main  # noqa: E402

PATCH_SIDE = 448  # synthetic images are mosaics of distinct patches of this side
QUICK = {"side": 896, "repeats": 2, "actor_images": 4, "actor_side": 448}
FULL = {"side": 1792, "repeats": 3, "actor_images": 8, "actor_side": 896}
# brief training for the agreement figure: steps of `batch` random `crop`^2 crops, constant lr
TRAIN_QUICK = {"steps": 120, "batch": 4, "crop": 128, "lr": 0.02, "mosaics": 3}
TRAIN_FULL = {"steps": 600, "batch": 8, "crop": 256, "lr": 0.02, "mosaics": 6}
TRAIN_SEED = 1000  # training mosaics use seeds from here; the measured image uses seed 1
STYLES = ("fluorescence", "he", "brightfield")
MODEL_SEED = 0
MASK_THRESHOLD = 0.5
NEAR_THRESHOLD = 0.01  # probabilities this close to the threshold are reported as a fraction
MEGA = 1e6
STABILITY_TILES = (512, 384)  # the same image segmented with both tile sides
STABILITY_IOU = 0.8  # nuclei matched one to one above this IoU count as the same


def make_mosaic(side: int, seed: int) -> np.ndarray:
    """A side x side RGB image of distinct synthetic patches (styles cycle patch by patch)."""
    return make_labelled_mosaic(side, seed)[0]


def build_random_model():
    import torch

    from unet_ray.core.model import UNetVGG16BN

    torch.manual_seed(MODEL_SEED)
    return UNetVGG16BN().eval()


def make_labelled_mosaic(side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Like ``make_mosaic``, with the foreground mask (float32 0/1) of its nuclei."""
    from unet_ray.io.synth import generate_sample

    rng = np.random.default_rng(seed)
    patches_per_side = -(-side // PATCH_SIDE)
    image_rows, mask_rows = [], []
    for row in range(patches_per_side):
        samples = [
            generate_sample(rng, PATCH_SIDE, PATCH_SIDE, STYLES[(row + column) % len(STYLES)])
            for column in range(patches_per_side)
        ]
        image_rows.append(np.concatenate([image for image, _ in samples], axis=1))
        mask_rows.append(np.concatenate([labels > 0 for _, labels in samples], axis=1))
    image = np.concatenate(image_rows, axis=0)[:side, :side]
    mask = np.concatenate(mask_rows, axis=0)[:side, :side]
    return np.ascontiguousarray(image), mask.astype(np.float32)


def train_briefly(settings: dict, device: str):
    """The random-weight model after ``steps`` SGD steps (momentum 0.9, BCE with logits) on random
    crops of synthetic mosaics that do not include the measured image; returned in eval mode."""
    import torch

    from unet_ray.core.losses import build_loss

    model = build_random_model().to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=settings["lr"], momentum=0.9)
    loss_function = build_loss("bce")
    mosaics = [
        make_labelled_mosaic(2 * PATCH_SIDE, TRAIN_SEED + index)
        for index in range(settings["mosaics"])
    ]
    rng = np.random.default_rng(TRAIN_SEED)
    crop = settings["crop"]
    for _ in range(settings["steps"]):
        images, masks = [], []
        for _ in range(settings["batch"]):
            image, mask = mosaics[rng.integers(len(mosaics))]
            top, left = rng.integers(0, image.shape[0] - crop + 1, size=2)
            images.append(image[top : top + crop, left : left + crop])
            masks.append(mask[top : top + crop, left : left + crop])
        inputs = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255)
        targets = torch.from_numpy(np.stack(masks))[:, None]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_function(model(inputs.to(device)), targets.to(device))
        loss.backward()
        optimizer.step()
    return model.eval()


def time_prediction(image, plan, predict_batch, batch_size) -> tuple[float, np.ndarray]:
    from unet_ray.inference import predict_probabilities

    started = time.perf_counter()
    probabilities = predict_probabilities(image, plan, predict_batch, batch_size)
    return time.perf_counter() - started, probabilities


def compare_with_whole_image(image, plans, predict_batch, batch_size) -> dict[str, float]:
    """Per scheme: the fraction of mask pixels equal to whole-image inference's, the largest
    probability difference; and the share of whole-image probabilities near the threshold."""
    from unet_ray.core.tiling import plan_whole_image
    from unet_ray.inference import predict_probabilities

    whole = predict_probabilities(image, plan_whole_image(*image.shape[:2]), predict_batch, 1)
    whole_mask = whole > MASK_THRESHOLD
    results = {
        "foreground_fraction": float(whole_mask.mean()),
        "near_threshold_fraction": float(np.mean(np.abs(whole - MASK_THRESHOLD) < NEAR_THRESHOLD)),
    }
    for scheme, plan in plans.items():
        probabilities = predict_probabilities(image, plan, predict_batch, batch_size)
        results[f"agreement_{scheme}"] = float(
            np.mean((probabilities > MASK_THRESHOLD) == whole_mask)
        )
        results[f"max_probability_difference_{scheme}"] = float(np.abs(probabilities - whole).max())
    return results


def measure_tiling(side: int, repeats: int, train_settings: dict) -> dict[str, float]:
    """Megapixels per second of both schemes, and their agreement with whole-image inference for
    the briefly trained and for the random-weight model."""
    import torch

    from unet_ray.core.config import SegmentConfig
    from unet_ray.core.tiling import plan_for_scheme, plan_whole_image
    from unet_ray.inference import make_batch_predictor, select_device

    segment = SegmentConfig()
    device = select_device(use_gpu=torch.cuda.is_available())
    predict_random = make_batch_predictor(build_random_model(), device)
    image = make_mosaic(side, seed=1)
    megapixels = image.shape[0] * image.shape[1] / MEGA
    time_prediction(image[:256, :256], plan_whole_image(256, 256), predict_random, 1)  # warm-up
    results = {"segment_image_side": side, "segment_device": device}
    schemes = ("reference", "default")
    plans = {
        scheme: plan_for_scheme(side, side, scheme, segment.tile, segment.overlap)
        for scheme in schemes
    }
    best_seconds = dict.fromkeys(schemes, float("inf"))
    for _ in range(repeats):
        for scheme in schemes:
            seconds, _ = time_prediction(image, plans[scheme], predict_random, segment.batch_size)
            best_seconds[scheme] = min(best_seconds[scheme], seconds)
    for scheme in schemes:
        results[f"segment_mpix_per_s_{scheme}"] = megapixels / best_seconds[scheme]
        results[f"segment_cost_{scheme}"] = plans[scheme].computed_pixels_per_output_pixel
    results["segment_speedup_vs_reference_tiling"] = (
        results["segment_mpix_per_s_default"] / results["segment_mpix_per_s_reference"]
    )
    for key, value in compare_with_whole_image(
        image, plans, predict_random, segment.batch_size
    ).items():
        results[f"segment_{key}_random"] = value
    started = time.perf_counter()
    trained = train_briefly(train_settings, device)
    results["segment_train_seconds"] = time.perf_counter() - started
    results["segment_train_steps"] = train_settings["steps"]
    predict_trained = make_batch_predictor(trained, device)
    for key, value in compare_with_whole_image(
        image, plans, predict_trained, segment.batch_size
    ).items():
        results[f"segment_{key}"] = value
    results["segment_agreement"] = results["segment_agreement_default"]
    results.update(measure_stability(image, predict_trained, segment.batch_size))
    return results


def measure_stability(image, predict_batch, batch_size) -> dict[str, float]:
    """The same image through the trained model with tiles of 512 and of 384 px: the fraction of
    nuclei matched one to one at IoU > 0.8 between the two label images, for today's
    post-processing and for the previous one (``bench_instances.previous_labels``)."""
    from bench_instances import previous_labels

    from unet_ray.core.config import InstanceConfig
    from unet_ray.core.metrics import compute_overlaps
    from unet_ray.core.tiling import plan_for_scheme
    from unet_ray.inference import labels_from_maps, predict_probabilities

    maps = [
        predict_probabilities(image, plan_for_scheme(*image.shape[:2], "default", tile, 32),
                              predict_batch, batch_size)
        for tile in STABILITY_TILES
    ]  # fmt: skip
    results = {}
    for name, label in (
        ("", lambda probabilities: labels_from_maps(probabilities, InstanceConfig())),
        ("_before", lambda probabilities: previous_labels(probabilities[0])),
    ):
        first, second = (label(probabilities) for probabilities in maps)
        matched = np.count_nonzero(compute_overlaps(first, second).pair_iou > STABILITY_IOU)
        results[f"segment_tile_stability{name}"] = matched / max(1, first.max(), second.max())
        results[f"segment_tile_stability_nuclei{name}"] = int(max(first.max(), second.max()))
    return results


def write_actor_inputs(folder: Path, count: int, side: int) -> float:
    """``count`` PNG mosaics in ``folder``; their total megapixels."""
    from unet_ray.io.images import encode_png

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (folder / f"image_{index:02d}.png").write_bytes(
            encode_png(make_mosaic(side, seed=100 + index))
        )
    return count * side * side / MEGA


def measure_actors(count: int, side: int) -> dict[str, float]:
    """Megapixels per second of the whole Ray Data job with 1 and with 2 actors."""
    import ray
    import torch

    from unet_ray.core.config import Config, InstanceConfig, SegmentConfig
    from unet_ray.core.model import UNetVGG16BN
    from unet_ray.io.checkpoint import save_checkpoint
    from unet_ray.pipelines.segment import run_segmentation

    use_gpu = torch.cuda.is_available()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_segment_") as root:
        torch.manual_seed(MODEL_SEED)
        checkpoint = os.path.join(root, "checkpoint")
        save_checkpoint(checkpoint, UNetVGG16BN(), Config().to_dict(), {})
        megapixels = write_actor_inputs(Path(root) / "images", count, side)
        started_ray = not ray.is_initialized()
        if started_ray:
            ray.init(include_dashboard=False, configure_logging=False)
        try:
            for workers in (1, 2):
                segment = SegmentConfig(workers=workers, use_gpu=use_gpu, overwrite=True)
                started = time.perf_counter()
                summary = run_segmentation(
                    checkpoint,
                    os.path.join(root, "images"),
                    os.path.join(root, f"output_{workers}"),
                    segment,
                    InstanceConfig(),
                )
                seconds = time.perf_counter() - started
                if summary.ok != count:
                    raise RuntimeError(f"benchmark job failed: {summary.rows}")
                name = "1_actor" if workers == 1 else f"{workers}_actors"
                results[f"segment_mpix_per_s_{name}"] = megapixels / seconds
                results[f"segment_job_seconds_{name}"] = seconds
                results[f"segment_post_overlap_fraction_{name}"] = overlap_fraction(summary.rows)
        finally:
            if started_ray:
                ray.shutdown()
    results["segment_job_megapixels"] = megapixels
    return results


def overlap_fraction(rows: list[dict]) -> float:
    """The share of the post-processing seconds (labels and writing, stage 2) during which the
    inference stage was running on some other image: 0 when the stages take turns."""
    from unet_ray.pipelines.slides import union_length

    inference = [(row["infer_start"], row["infer_end"]) for row in rows]
    total = overlapped = 0.0
    for row in rows:
        start, end = row["post_start"], row["post_end"]
        total += end - start
        busy = [
            (max(start, first), min(end, last))
            for first, last in inference
            if (first, last) != (row["infer_start"], row["infer_end"])
        ]
        overlapped += union_length([(a, b) for a, b in busy if b > a])
    return overlapped / total if total else 0.0


def run(quick: bool = True) -> dict[str, float]:
    """All segmentation figures; ``quick`` uses smaller images (a few minutes on 2 CPU cores)."""
    sizes = QUICK if quick else FULL
    results = measure_tiling(sizes["side"], sizes["repeats"], TRAIN_QUICK if quick else TRAIN_FULL)
    results.update(measure_actors(sizes["actor_images"], sizes["actor_side"]))
    return results


def format_table(results: dict[str, float]) -> str:
    side = results["segment_image_side"]
    lines = [
        f"Segmentation of a {side}x{side} image on {results['segment_device']} "
        "(agreement = equal mask pixels vs whole-image inference; trained = "
        f"{results['segment_train_steps']} SGD steps here, random = random weights)",
        "",
        "| tiling | computed px / output px | megapixels/s | agreement (trained) "
        "| max prob. diff (trained) | agreement (random) | max prob. diff (random) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for scheme, title in (
        ("reference", "reference (128 in 256)"),
        ("default", "default (512, 32)"),
    ):
        lines.append(
            f"| {title} | {results[f'segment_cost_{scheme}']:.2f} "
            f"| {results[f'segment_mpix_per_s_{scheme}']:.3f} "
            f"| {results[f'segment_agreement_{scheme}']:.5f} "
            f"| {results[f'segment_max_probability_difference_{scheme}']:.4f} "
            f"| {results[f'segment_agreement_{scheme}_random']:.5f} "
            f"| {results[f'segment_max_probability_difference_{scheme}_random']:.4f} |"
        )
    lines += [
        "",
        f"Default vs reference speed-up: {results['segment_speedup_vs_reference_tiling']:.2f}x. "
        f"Pixels within {NEAR_THRESHOLD} of the mask threshold: "
        f"{results['segment_near_threshold_fraction']:.2%} (trained, "
        f"foreground {results['segment_foreground_fraction']:.1%}), "
        f"{results['segment_near_threshold_fraction_random']:.1%} (random weights). "
        f"Brief training took {results['segment_train_seconds']:.0f} s.",
        "",
        f"| Ray Data job ({results['segment_job_megapixels']:.1f} MP) | megapixels/s | seconds |",
        "| --- | --- | --- |",
        f"| 1 actor | {results['segment_mpix_per_s_1_actor']:.3f} "
        f"| {results['segment_job_seconds_1_actor']:.1f} |",
        f"| 2 actors | {results['segment_mpix_per_s_2_actors']:.3f} "
        f"| {results['segment_job_seconds_2_actors']:.1f} |",
        "",
        "Post-processing seconds that ran while the inference stage worked on another image: "
        f"{results['segment_post_overlap_fraction_1_actor']:.0%} (1 actor), "
        f"{results['segment_post_overlap_fraction_2_actors']:.0%} (2 actors).",
        f"Same image, tiles {STABILITY_TILES[0]} vs {STABILITY_TILES[1]}: "
        f"{results['segment_tile_stability']:.1%} of "
        f"{results['segment_tile_stability_nuclei']} nuclei matched one to one at IoU > "
        f"{STABILITY_IOU} (previous post-processing: "
        f"{results['segment_tile_stability_before']:.1%} of "
        f"{results['segment_tile_stability_nuclei_before']}).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return standalone_main(__doc__.splitlines()[0], run, format_table, "smaller images", argv)


if __name__ == "__main__":
    sys.exit(main())
