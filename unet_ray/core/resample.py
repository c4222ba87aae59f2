"""Whole images at the model's pixel size: the scale between two pixel sizes, the image resized
to the model's, and the probability maps resized back to the image's. Arrays only, no I/O."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

# pixel sizes this close (relative) count as equal: the image is not resampled
MPP_TOLERANCE = 0.02


def model_scale(image_mpp: float | None, model_mpp: float | None) -> float:
    """Model pixels per image pixel (image_mpp / model_mpp): 0.5 for a 0.25 µm/px image and a
    0.5 µm/px model. 1.0 when either is unknown or they agree within ``MPP_TOLERANCE``."""
    if not image_mpp or not model_mpp:
        return 1.0
    scale = float(image_mpp) / float(model_mpp)
    return 1.0 if abs(scale - 1.0) <= MPP_TOLERANCE else scale


def scaled_shape(height: int, width: int, scale: float) -> tuple[int, int]:
    """The (height, width) of an image resized by ``scale``, at least 1 x 1."""
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An H x W (x C) image resized to ``shape`` (height, width): area-averaged when shrinking
    (no aliasing), bilinear when enlarging; same dtype."""
    height, width = shape
    shrinking = height * width < image.shape[0] * image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    resized = cv2.resize(image, (width, height), interpolation=interpolation)
    if image.ndim == 3 and resized.ndim == 2:  # cv2 drops a single channel axis
        resized = resized[:, :, None]
    return resized


def resize_maps(maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """C x h x w probability maps resized (bilinear) to C x height x width, float32."""
    height, width = shape
    return np.stack(
        [
            cv2.resize(
                np.asarray(channel, dtype=np.float32),
                (width, height),
                interpolation=cv2.INTER_LINEAR,
            )
            for channel in maps
        ]
    )


def probabilities_at_scale(
    image: np.ndarray, scale: float, infer: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """``infer`` (an H x W x 3 image -> C x H x W maps) run on the image resized by ``scale``
    (the model's pixel size), its maps resized back to the image's H x W; ``infer(image)`` as it
    is when ``scale`` is 1."""
    if scale == 1.0:
        return infer(image)
    height, width = image.shape[:2]
    maps = infer(resize_image(image, scaled_shape(height, width, scale)))
    return resize_maps(maps, (height, width))
