"""The one inference path: model -> logits -> probabilities -> instance labels -> scores.

Layer 3, under every job: training validation (``pipelines.train_loop.validate_images``),
``unet-ray evaluate`` (``pipelines.evaluate``), image collections (``pipelines.segment``) and
whole-slide regions (``pipelines.slides``) all predict through ``predict_logits`` (the one call of
``core.tiling.predict_tiled``) and label through ``labels_from_maps``, so what validation
measures is what deployment writes. As in MONAI's ``sliding_window_inference``, the model comes in
as a callable (``make_batch_predictor``: uint8 windows -> float32 logits, on the CPU or a GPU);
this module knows no files, no Ray and no job.

Tiled versus whole-image inference, ``default`` scheme (tile 512, margin 32), measured on CPU in
float32 with random-weight models (two seeds, eval mode) on synthetic images up to 960 x 960 whose
seams keep exactly 32 px of context: probabilities differ by at most 0.011 (mean 0.0002) and the
thresholded masks agree on 99.66-99.81 % of the pixels (random weights leave 15-20 % of pixels
within 0.01 of the 0.5 threshold, where such a difference flips the mask). The tests assert the
bounds ``TILED_MAX_PROBABILITY_DIFFERENCE`` and ``TILED_MASK_AGREEMENT``. The reference scheme pads
each 128-px core from itself and differs from whole-image inference by up to 0.18 (98.5 %
agreement). With a briefly trained model (``benchmarks/bench_segment.py``: 120 SGD steps on other
synthetic mosaics) the default's masks agree on 99.95 % of the pixels of an 896^2 mosaic and
99.97 % of a 1344^2 one (largest probability difference 0.030 and 0.024), the reference scheme's
on 99.6 % (0.63 and 0.69).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from unet_ray.core.config import HEAD_MASK, HEAD_MASK_CONTOUR, InstanceConfig, SegmentConfig
from unet_ray.core.instances import contour_target, instance_labels
from unet_ray.core.metrics import (
    dsb_image_score,
    f1_from_counts,
    instance_counts,
    iou_from_counts,
    pixel_counts,
)
from unet_ray.core.tiling import TilePlan, plan_for_scheme, predict_tiled

logger = logging.getLogger(__name__)

PIXEL_SCALE = 255.0  # uint8 image -> network input in [0, 1]
TILED_MAX_PROBABILITY_DIFFERENCE = 0.02  # measured bound, tiled default vs whole image (see above)
TILED_MASK_AGREEMENT = 0.995  # measured bound: fraction of equal thresholded mask pixels


class GpuUnavailableError(ValueError):
    """``--gpu`` was given where torch sees no CUDA device (a usage error: exit 2 on local Ray,
    a failed row or a failed run on a cluster; never a silent fall-back to the CPU)."""


def cuda_problem() -> str:
    """Why this process cannot run on a GPU (torch has no CUDA build, or sees no device); "" when
    it can."""
    import torch

    if torch.cuda.is_available():
        return ""
    build = torch.version.cuda
    why = (
        f"torch {torch.__version__} was built without CUDA"
        if not build
        else f"torch {torch.__version__} (CUDA {build}) sees no CUDA device"
    )
    return f"--gpu was given but {why} on {socket.gethostname()}"


def select_device(use_gpu: bool) -> str:
    """``cuda`` when asked for (``--gpu``), ``cpu`` otherwise. Strict: asked for a GPU where torch
    sees no CUDA device raises ``GpuUnavailableError`` (never a silent CPU fall-back, which is
    ~100x slower)."""
    if not use_gpu:
        return "cpu"
    problem = cuda_problem()
    if problem:
        raise GpuUnavailableError(
            f"{problem}: install a CUDA build of torch (make venv SYSTEM_TORCH=1 on a CUDA "
            "image), check nvidia-smi and CUDA_VISIBLE_DEVICES, or drop --gpu"
        )
    return "cuda"


def normalise_images(images):
    """Network input from uint8 images (a torch tensor N x 3 x H x W, on any device): float32 in
    [0, 1]. Training and inference both normalise here, on the device the batch already sits
    on, so a uint8 batch (a quarter of the bytes) is what crosses to the GPU."""
    return images.float().div_(PIXEL_SCALE)


def serialised(predict_batch: Callable[[np.ndarray], np.ndarray]) -> Callable:
    """``predict_batch`` behind a lock: an actor that runs two calls at once (one reading and
    tiling its image while the other's batches are on the device) runs one forward pass at a
    time, so the device holds one batch's activations and the results are those of a serial
    actor."""
    lock = threading.Lock()

    def predict_serially(windows: np.ndarray) -> np.ndarray:
        with lock:
            return predict_batch(windows)

    return predict_serially


def make_batch_predictor(
    model,
    device: str,
    channels_last: bool = True,
    tta: bool = False,
    probabilities: bool = False,
    maps_on_device: bool | None = None,
) -> Callable[[np.ndarray], np.ndarray]:
    """A function from uint8 windows (N x h x w x 3) to float32 logits (N x C x h x w, one
    channel per output of the model's head), or with ``probabilities`` to float16 probabilities.

    The uint8 windows go to the device and are normalised there (``normalise_images``). On a GPU
    the batch runs under bfloat16 autocast, channels-last unless ``channels_last`` is False
    (validation during training leaves the memory format of the trained model alone); on the
    CPU in float32. ``tta``: test-time augmentation (``dihedral_average``), 8 passes.

    ``probabilities``: on a GPU (``maps_on_device``, default: when on a GPU) the sigmoid and the
    cast to float16 run on the device before the copy back (half the bytes of float32 logits,
    no CPU sigmoid); on the CPU they run in numpy as ``sigmoid_in_place`` does. With TTA the
    logits are averaged first, so the sigmoid follows on the CPU.
    """
    import torch

    on_gpu = device.startswith("cuda")
    channels_last = channels_last and on_gpu
    if maps_on_device is None:
        maps_on_device = on_gpu
    if channels_last:
        model = model.to(device, memory_format=torch.channels_last)
    model.eval()

    def forward(windows: np.ndarray):
        batch = torch.from_numpy(np.ascontiguousarray(windows)).to(device, non_blocking=True)
        batch = normalise_images(batch.permute(0, 3, 1, 2))
        with torch.inference_mode():
            if on_gpu:
                if channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return model(batch)
            return model(batch)

    def predict_batch(windows: np.ndarray) -> np.ndarray:
        return forward(windows).float().cpu().numpy()

    def predict_maps_on_device(windows: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            maps = torch.sigmoid(forward(windows).float()).half()
        return maps.cpu().numpy()

    if probabilities and maps_on_device and not tta:
        return predict_maps_on_device
    logits_predictor = dihedral_average(predict_batch) if tta else predict_batch
    if not probabilities:
        return logits_predictor

    def predict_maps_on_cpu(windows: np.ndarray) -> np.ndarray:
        return sigmoid_in_place(logits_predictor(windows)).astype(np.float16)

    return predict_maps_on_cpu


DIHEDRAL_TRANSFORMS = 8  # the square's symmetries: 4 rotations by 90 degrees, each also mirrored


def dihedral(array: np.ndarray, transform: int, axes: tuple[int, int]) -> np.ndarray:
    """``array`` under symmetry ``transform`` (0-7) of the square, in the plane of ``axes``:
    mirrored along the second axis when ``transform`` >= 4, then rotated ``transform % 4``
    quarter turns. Windows are N x h x w x 3 (axes 1, 2); logits N x C x h x w (axes 2, 3)."""
    if transform >= DIHEDRAL_TRANSFORMS // 2:
        array = np.flip(array, axis=axes[1])
    return np.rot90(array, transform % 4, axes=axes)


def undo_dihedral(array: np.ndarray, transform: int, axes: tuple[int, int]) -> np.ndarray:
    """The inverse of ``dihedral``: rotate back, then undo the mirror."""
    array = np.rot90(array, -(transform % 4), axes=axes)
    if transform >= DIHEDRAL_TRANSFORMS // 2:
        array = np.flip(array, axis=axes[1])
    return array


def dihedral_average(
    predict_batch: Callable[[np.ndarray], np.ndarray],
) -> Callable[[np.ndarray], np.ndarray]:
    """Test-time augmentation: a batch predictor whose logits are the mean, over the 8 flips and
    quarter turns of each window, of ``predict_batch``'s logits mapped back (as cellpose's
    ``augment`` and many DSB2018 solutions do). It wraps the batch predictor, so tiling and
    stitching stay those of ``predict_logits``, and costs 8 forward passes per window. A
    non-square window turns into its transpose, which the network takes as well."""

    def predict_augmented(windows: np.ndarray) -> np.ndarray:
        total = None
        for transform in range(DIHEDRAL_TRANSFORMS):
            view = np.ascontiguousarray(dihedral(windows, transform, (1, 2)))
            logits = undo_dihedral(predict_batch(view), transform, (2, 3))
            total = logits.astype(np.float32, copy=True) if total is None else total + logits
        total /= DIHEDRAL_TRANSFORMS
        return total

    return predict_augmented


def sigmoid_in_place(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits, reusing the logits' memory (a big image has one such map)."""
    from scipy.special import expit

    return expit(logits, out=logits)


def predict_logits(
    image: np.ndarray,
    plan: TilePlan,
    predict_batch: Callable[[np.ndarray], np.ndarray],
    batch_size: int,
) -> np.ndarray:
    """Logits (C x H x W float32, one channel per output of the model's head) of an RGB uint8
    image, tile batch by tile batch, stitched. The one place the package runs a model over an
    image: training validation, ``evaluate``, image collections and slide regions all come here."""
    return predict_tiled(image, plan, predict_batch, batch_size)


def predict_probabilities(
    image: np.ndarray,
    plan: TilePlan,
    predict_batch: Callable[[np.ndarray], np.ndarray],
    batch_size: int,
) -> np.ndarray:
    """Probabilities (C x H x W float32: nucleus, and contour for a ``mask+contour`` model) of an
    RGB uint8 image: ``predict_logits`` through the sigmoid, in place."""
    return sigmoid_in_place(predict_logits(image, plan, predict_batch, batch_size))


def image_logits(
    image: np.ndarray, predict_batch: Callable[[np.ndarray], np.ndarray], segment: SegmentConfig
) -> np.ndarray:
    """Whole-image (or slide-window) logits, tiled as ``segment`` says (``plan_image``)."""
    plan = plan_image(image.shape[0], image.shape[1], segment)
    return predict_logits(image, plan, predict_batch, segment.batch_size)


def image_probabilities(
    image: np.ndarray, predict_batch: Callable[[np.ndarray], np.ndarray], segment: SegmentConfig
) -> np.ndarray:
    """Whole-image (or slide-window) probabilities, tiled as ``segment`` says."""
    return sigmoid_in_place(image_logits(image, predict_batch, segment))


def image_maps(
    image: np.ndarray, predict_maps: Callable[[np.ndarray], np.ndarray], segment: SegmentConfig
) -> np.ndarray:
    """Whole-image (or slide-window) probabilities from a predictor that returns probabilities
    (``make_batch_predictor(probabilities=True)``: sigmoid and float16 on the device), tiled as
    ``segment`` says; float32 C x H x W holding float16 values."""
    plan = plan_image(image.shape[0], image.shape[1], segment)
    return predict_logits(image, plan, predict_maps, segment.batch_size)


def plan_image(height: int, width: int, segment: SegmentConfig) -> TilePlan:
    return plan_for_scheme(height, width, segment.scheme, segment.tile, segment.overlap)


def labels_from_maps(probabilities: np.ndarray, instances: InstanceConfig) -> np.ndarray:
    """Instance labels from the C x H x W probabilities of either head (channel 0: nucleus,
    channel 1 when present: contour)."""
    contour = probabilities[1] if len(probabilities) > 1 else None
    return instance_labels(probabilities[0], contour, instances)


COUNT_KEYS = ("tp", "fp", "fn", "inst_tp", "inst_fp", "inst_fn")


def score_image(
    name: str, probabilities: np.ndarray, truth: np.ndarray, instances: InstanceConfig
) -> dict[str, Any]:
    """One image's row: pixel and instance counts, pixel F1, instance F1 at IoU 0.5, DSB score,
    from its C x H x W probabilities; the predicted mask is the union of the predicted nuclei,
    as `unet-ray segment` writes it."""
    predicted = labels_from_maps(probabilities, instances)
    tp, fp, fn = pixel_counts(predicted > 0, truth > 0)
    inst_tp, inst_fp, inst_fn = instance_counts(truth, predicted, 0.5)
    return {
        "image": name,
        "pixel_f1": f1_from_counts(tp, fp, fn),
        "dsb_score": dsb_image_score(truth, predicted),
        "f1_50": f1_from_counts(inst_tp, inst_fp, inst_fn),
        "nuclei_true": int(len(np.unique(truth[truth > 0]))),
        "nuclei_pred": int(predicted.max()) if predicted.size else 0,
        **dict(zip(COUNT_KEYS, (tp, fp, fn, inst_tp, inst_fp, inst_fn), strict=True)),
    }


def summarise_scores(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Pixel F1 / IoU from counts summed over all images, ``dsb_score`` the mean of the images'
    DSB2018 scores, ``f1_50`` from instance counts summed over all images, ``n_images``."""
    if not rows:
        raise ValueError("no images were scored")
    totals = {key: sum(row[key] for row in rows) for key in COUNT_KEYS}
    return {
        "pixel_f1": f1_from_counts(totals["tp"], totals["fp"], totals["fn"]),
        "pixel_iou": iou_from_counts(totals["tp"], totals["fp"], totals["fn"]),
        "dsb_score": float(np.mean([row["dsb_score"] for row in rows])),
        "f1_50": f1_from_counts(totals["inst_tp"], totals["inst_fp"], totals["inst_fn"]),
        "n_images": len(rows),
    }


def validation_loss(loss_function, logits: np.ndarray, truth: np.ndarray, device="cpu") -> float:
    """The training loss of one whole image's C x H x W logits against the targets derived
    from its labels as in training (``image_targets``), computed on ``device`` (validation on a
    GPU: the loss there, not on the worker's CPU)."""
    import torch

    with torch.inference_mode():
        return float(
            loss_function(
                torch.from_numpy(logits)[None].to(device, non_blocking=True),
                torch.from_numpy(image_targets(truth, len(logits)))[None].to(device),
            )
        )


def image_targets(labels: np.ndarray, channels: int) -> np.ndarray:
    """float32 C x H x W targets of an instance label image: the nucleus mask, then (two
    channels) the nucleus contour."""
    targets = [labels > 0]
    if channels > 1:
        targets.append(contour_target(labels))
    return np.stack(targets).astype(np.float32)


# The instance settings the search tries (``search_instance_settings``): the probability threshold
# and minimum size for both heads, and each head's own splitting parameter.
SEARCH_GRID: dict[str, tuple[float, ...]] = {
    "threshold": (0.3, 0.4, 0.5, 0.6, 0.7),
    "core_ratio": (0.6, 0.7, 0.8, 0.85, 0.9, 0.95),
    "contour_threshold": (0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
    "min_size": (0, 8, 16, 32, 64),
}
SEARCHED = {
    HEAD_MASK: ("threshold", "core_ratio", "min_size"),
    HEAD_MASK_CONTOUR: ("threshold", "contour_threshold", "min_size"),
}
SEARCH_ROUNDS = 3  # coordinate ascent passes over the parameters at most


@dataclasses.dataclass
class SearchResult:
    instances: InstanceConfig  # the chosen settings
    metric: str  # what was maximised: a key of ``summarise_scores`` (dsb_score, f1_50, pixel_f1)
    before: dict[str, Any]  # summarise_scores of the starting settings
    after: dict[str, Any]  # summarise_scores of the chosen settings
    evaluated: int  # settings scored

    def record(self) -> dict[str, Any]:
        """What the checkpoint keeps of the search (``config.json``'s ``threshold_search``)."""
        keep = ("pixel_f1", "dsb_score", "f1_50", "n_images")
        return {
            "metric": self.metric,
            "chosen": dataclasses.asdict(self.instances),
            "before": {key: self.before[key] for key in keep},
            "after": {key: self.after[key] for key in keep},
            "settings_scored": self.evaluated,
        }


def search_instance_settings(
    maps: Sequence[tuple[str, np.ndarray, np.ndarray]],
    start: InstanceConfig,
    metric: str,
    grid: dict[str, tuple[float, ...]] | None = None,
) -> SearchResult:
    """The instance settings that maximise ``metric`` over annotated images, from their
    probability maps: ``maps`` holds (name, C x H x W probabilities, instance labels) of whole
    images, predicted once (``image_probabilities``, with or without TTA); each setting is scored
    as ``score_image`` scores validation, so the search measures what deployment will write.

    Coordinate ascent from ``start`` over the parameters the head uses (``SEARCHED``): each
    parameter in turn takes the grid value that scores best with the others held, until a pass
    changes nothing (at most ``SEARCH_ROUNDS``). A tie keeps the current value, so the defaults
    change only for a real gain. StarDist's ``optimize_thresholds`` does the same job for its
    probability and NMS thresholds.
    """
    if not maps:
        raise ValueError("no annotated images to search the instance settings on")
    grid = grid or SEARCH_GRID
    head = HEAD_MASK_CONTOUR if len(maps[0][1]) > 1 else HEAD_MASK
    scored: dict[tuple, dict[str, Any]] = {}

    def score(instances: InstanceConfig) -> dict[str, Any]:
        key = tuple(sorted(dataclasses.asdict(instances).items()))
        if key not in scored:
            rows = [score_image(name, maps_, truth, instances) for name, maps_, truth in maps]
            scored[key] = summarise_scores(rows)
        return scored[key]

    current = start
    before = score(start)
    for _ in range(SEARCH_ROUNDS):
        changed = False
        for name in SEARCHED[head]:
            best_value, best_score = getattr(current, name), score(current)[metric]
            for value in grid[name]:
                candidate = dataclasses.replace(current, **{name: type(best_value)(value)})
                candidate_score = score(candidate)[metric]
                if candidate_score > best_score:
                    best_value, best_score = getattr(candidate, name), candidate_score
            if best_value != getattr(current, name):
                current, changed = dataclasses.replace(current, **{name: best_value}), True
        if not changed:
            break
    return SearchResult(current, metric, before, score(current), len(scored))
