"""The one inference path (unet_ray.inference): the merged duplicates behave as the copies did.

Before the layers, the slide job had its own ``predict_window`` (tiling + sigmoid) and
``label_nuclei`` (maps -> labels); both are gone, and every job calls ``image_probabilities`` /
``labels_from_maps``. These tests hold the survivors to the removed copies' formulas, on a real
(random-weight) model, so a later change to the one path cannot silently part the jobs again.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import expit

from unet_ray.core.config import InstanceConfig, SegmentConfig
from unet_ray.core.instances import instance_labels
from unet_ray.core.model import UNetVGG16BN
from unet_ray.core.tiling import plan_for_scheme, predict_tiled
from unet_ray.inference import (
    image_logits,
    image_probabilities,
    labels_from_maps,
    make_batch_predictor,
    predict_probabilities,
    sigmoid_in_place,
)
from unet_ray.io.synth import generate_sample

SEGMENT = SegmentConfig(tile=64, overlap=16, batch_size=3)  # several tiles on a 96 x 160 image


@pytest.fixture(scope="module")
def predict_batch():
    torch.manual_seed(0)
    return make_batch_predictor(UNetVGG16BN(head_channels=2), "cpu")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    image, _ = generate_sample(np.random.default_rng(3), 96, 160, "he")
    return image


def test_image_probabilities_equal_the_slide_jobs_old_window_formula(predict_batch, image):
    """The removed ``slides.predict_window`` computed sigmoid(predict_tiled(image, plan, ...))."""
    plan = plan_for_scheme(*image.shape[:2], SEGMENT.scheme, SEGMENT.tile, SEGMENT.overlap)
    assert len(plan.tiles) > 1  # the tiling is exercised
    old = expit(predict_tiled(image, plan, predict_batch, SEGMENT.batch_size))
    survivor = image_probabilities(image, predict_batch, SEGMENT)
    assert survivor.shape == (2, 96, 160)
    np.testing.assert_array_equal(survivor, old)
    np.testing.assert_array_equal(
        predict_probabilities(image, plan, predict_batch, SEGMENT.batch_size), old
    )


def test_validation_logits_and_segmentation_probabilities_are_one_path(predict_batch, image):
    """Validation scores sigmoid(image_logits); segment writes image_probabilities: the same."""
    logits = image_logits(image, predict_batch, SEGMENT)
    assert float(np.abs(logits).max()) > 0  # a real forward pass, not zeros
    np.testing.assert_array_equal(
        sigmoid_in_place(logits.copy()), image_probabilities(image, predict_batch, SEGMENT)
    )


@pytest.mark.parametrize("channels", [1, 2])
def test_labels_from_maps_is_instance_labels_on_the_head_channels(channels):
    """The removed ``slides.label_nuclei`` and ``labels_from_maps`` both meant: channel 0 the
    nucleus, channel 1 (when present) the contour, through ``instance_labels``."""
    _, truth = generate_sample(np.random.default_rng(5), 128, 128, "fluorescence")
    nucleus = (truth > 0).astype(np.float32)
    contour = np.zeros_like(nucleus)
    contour[:, ::9] = 1.0  # a contour that cuts nuclei, so the two heads' labels differ
    maps = np.stack([nucleus, contour][:channels])
    instances = InstanceConfig()
    expected = instance_labels(maps[0], maps[1] if channels > 1 else None, instances)
    labels = labels_from_maps(maps, instances)
    assert labels.dtype == np.uint32 and labels.max() > 0
    np.testing.assert_array_equal(labels, expected)
    if channels == 2:
        assert labels.max() > instance_labels(maps[0], None, instances).max()
