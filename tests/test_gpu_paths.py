"""The GPU fast paths and strict ``--gpu`` (issue 22), checked on the CPU: uint8 training batches
give the float path's loss and steps, device-side normalisation equals the CPU formula, the
probability predictor equals the sigmoid-in-numpy path, the overlapped inference actor gives the
serial actor's maps, and ``--gpu`` without CUDA (or with too few GPUs) is exit 2 before any work,
or error rows naming the reason inside an actor."""

from __future__ import annotations

import dataclasses
import logging
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.special import expit

from unet_ray.cli import main
from unet_ray.core.config import Config, SegmentConfig
from unet_ray.core.losses import build_loss, head_targets
from unet_ray.core.model import UNetVGG16BN
from unet_ray.inference import (
    GpuUnavailableError,
    image_maps,
    image_probabilities,
    make_batch_predictor,
    normalise_images,
    select_device,
    serialised,
)
from unet_ray.io.checkpoint import save_checkpoint
from unet_ray.io.synth import generate_sample
from unet_ray.pipelines import data
from unet_ray.pipelines.segment import SegmentActor
from unet_ray.pipelines.train_loop import device_batch, train_one_epoch
from unet_ray.pipelines.tune import gpus_per_worker, trial_gpus
from unet_ray.runtime.batch import actor_gpus, gpus_needed, with_concurrent_calls
from unet_ray.runtime.cluster import check_gpu_count

CPU = torch.device("cpu")
NO_CUDA = not torch.cuda.is_available()


def crops(count: int = 4, size: int = 32, seed: int = 0):
    """Augmented-looking training crops: uint8 images and int32 instance labels."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(count):
        image, label = generate_sample(rng, size, size, "fluorescence")[:2]
        images.append(image)
        labels.append(label.astype(np.int32))
    return images, labels


def float_batch(images, labels) -> dict[str, torch.Tensor]:
    """The float32 batch the pipeline shipped before issue 22 (its formula, kept here)."""
    image = np.stack(images).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    label = np.stack(labels).astype(np.int32)
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image)),
        "mask": torch.from_numpy((label > 0).astype(np.float32)[:, None]),
        "labels": torch.from_numpy(label),
    }


def uint8_batch(images, labels, with_labels: bool) -> dict[str, torch.Tensor]:
    return {
        key: torch.from_numpy(value)
        for key, value in data.to_model_batch(images, labels, with_labels).items()
    }


# ----------------------------------------------------------------------------- training batches


def test_uint8_batches_are_a_fifth_of_the_bytes_and_labels_travel_only_for_the_contour_head():
    images, labels = crops()
    mask_head = data.to_model_batch(images, labels, with_labels=False)
    contour_head = data.to_model_batch(images, labels, with_labels=True)
    assert set(mask_head) == {"image", "mask"} and "labels" in contour_head
    assert mask_head["image"].dtype == np.uint8 and mask_head["mask"].dtype == np.uint8
    old = float_batch(images, labels)
    old_bytes = sum(tensor.numel() * tensor.element_size() for tensor in old.values())
    new_bytes = sum(array.nbytes for array in mask_head.values())
    assert new_bytes * 5 <= old_bytes  # 1.31 MB -> 0.26 MB per 256^2 sample


def test_device_normalisation_equals_the_cpu_formula_exactly():
    images, labels = crops(count=3, size=64, seed=3)
    on_device = device_batch(uint8_batch(images, labels, True), CPU)
    reference = float_batch(images, labels)
    assert on_device["image"].dtype == torch.float32
    assert torch.equal(on_device["image"], reference["image"])
    assert torch.equal(on_device["mask"], reference["mask"])
    # every grey level, not only those the crops happen to hold
    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    expected = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16).astype(np.float32) / 255.0
    assert np.array_equal(normalise_images(levels).numpy(), expected)


@pytest.mark.parametrize("channels", [1, 2])
def test_uint8_path_gives_the_float_paths_loss_and_training_steps(channels):
    """Same loss, same updated weights after an epoch of the loop, for both heads (the contour
    head's target needs the labels, which travel only then)."""
    images, labels = crops(count=4, size=32, seed=channels)
    config = Config.from_dict({"train": {"scheduler": "constant", "max_lr": 0.05}})
    loss_function = build_loss("bce+dice")

    def run(batch):
        torch.manual_seed(0)
        model = torch.nn.Conv2d(3, channels, 3, padding=1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
        first = device_batch(batch, CPU)
        with torch.no_grad():
            logits = model(first["image"])
            loss = loss_function(logits, head_targets(first, channels))
        mean, _ = train_one_epoch(
            model, optimizer, loss_function, iter([batch] * 3), config, 0, 3, CPU
        )
        return float(loss), mean, model.weight.detach().clone()

    new = run(uint8_batch(images, labels, with_labels=channels == 2))
    old = run(float_batch(images, labels))
    assert new[0] == old[0] and new[0] > 0
    assert new[1] == pytest.approx(old[1], rel=1e-6)
    assert torch.equal(new[2], old[2])


# ----------------------------------------------------------------------------- inference maps


class FirstChannels(torch.nn.Module):
    """A 'model' whose logits are its input's first two channels, rescaled: shows exactly what
    the predictor feeds the network."""

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return batch[:, :2] * 8.0 - 4.0


def test_the_predictor_normalises_windows_as_the_cpu_formula():
    windows = np.random.default_rng(0).integers(0, 256, (3, 32, 64, 3), dtype=np.uint8)
    logits = make_batch_predictor(FirstChannels(), "cpu")(windows)
    expected = windows.transpose(0, 3, 1, 2)[:, :2].astype(np.float32) / 255.0 * 8.0 - 4.0
    np.testing.assert_array_equal(logits, expected)


def test_probability_maps_equal_the_sigmoid_of_the_logits_on_either_side():
    """CPU: float16(expit(logits)), exactly what the actors computed before; the device path
    (sigmoid and float16 in torch before the copy back, forced here on the CPU) within one
    float16 step of it."""
    windows = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    model = FirstChannels()
    logits = make_batch_predictor(model, "cpu")(windows)
    on_cpu = make_batch_predictor(model, "cpu", probabilities=True)(windows)
    on_device = make_batch_predictor(model, "cpu", probabilities=True, maps_on_device=True)(windows)
    assert on_cpu.dtype == np.float16 and on_device.dtype == np.float16
    np.testing.assert_array_equal(on_cpu, expit(logits).astype(np.float16))
    np.testing.assert_allclose(on_device.astype(np.float32), on_cpu.astype(np.float32), atol=1e-3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("checkpoint") / "random")
    save_checkpoint(folder, UNetVGG16BN(), Config().to_dict(), {})
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    uris = []
    for index, side in enumerate((192, 160, 224)):
        image = generate_sample(np.random.default_rng(index), side, side + 32, "he")[0]
        Image.fromarray(image).save(folder / f"image{index}.png")
        uris.append(str(folder / f"image{index}.png"))
    return uris


def test_the_overlapped_actor_gives_the_serial_actors_maps(checkpoint, images):
    """Two calls at once in one actor (one reading and tiling while the other's batches run)
    give exactly the maps of one call after the other, which are the one inference path's
    probabilities (``image_probabilities``) as float16; and the calls did run at once."""
    torch.set_num_threads(1)
    segment = SegmentConfig(tile=128, overlap=16, batch_size=2)
    actor = SegmentActor(checkpoint, dataclasses.asdict(segment))
    serial = {uri: actor.infer_one(uri) for uri in images}

    overlapped: dict[str, dict] = {}
    start = threading.Barrier(len(images))

    def infer(uri: str) -> None:
        start.wait()
        overlapped[uri] = actor.infer_one(uri)

    threads = [threading.Thread(target=infer, args=(uri,)) for uri in images]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for uri in images:
        assert serial[uri]["status"] == "ok" and overlapped[uri]["status"] == "ok"
        np.testing.assert_array_equal(
            overlapped[uri]["probabilities"], serial[uri]["probabilities"]
        )
    spans = sorted((row["infer_start"], row["infer_end"]) for row in overlapped.values())
    assert spans[1][0] < spans[0][1]  # the second call started before the first ended

    from unet_ray.io.checkpoint import load_model

    model, _ = load_model(checkpoint)
    image = np.asarray(Image.open(images[0]).convert("RGB"))
    reference = image_probabilities(image, make_batch_predictor(model, "cpu"), segment)
    np.testing.assert_array_equal(serial[images[0]]["probabilities"], reference.astype(np.float16))
    maps = image_maps(image, make_batch_predictor(model, "cpu", probabilities=True), segment)
    np.testing.assert_array_equal(maps.astype(np.float16), reference.astype(np.float16))


def test_serialised_runs_one_forward_pass_at_a_time():
    inside, most = [0], [0]
    guard = threading.Lock()

    def slow_predict(windows):
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        threading.Event().wait(0.02)
        with guard:
            inside[0] -= 1
        return windows

    predict = serialised(slow_predict)
    threads = [threading.Thread(target=predict, args=(np.zeros(1),)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1


def test_inference_pools_run_two_calls_per_actor_in_threads():
    import ray

    pool = with_concurrent_calls(
        ray.data.ActorPoolStrategy(size=3, max_tasks_in_flight_per_actor=2),
        SegmentActor.CONCURRENT_CALLS,
    )
    assert (pool.min_size, pool.max_size) == (3, 3)
    assert pool.max_concurrent_calls_per_actor == 2 and pool.enable_true_multi_threading
    plain = ray.data.ActorPoolStrategy(min_size=1, max_size=4)
    assert with_concurrent_calls(plain, 1) is plain


# ----------------------------------------------------------------------------- strict --gpu


@pytest.mark.skipif(not NO_CUDA, reason="checks the machine without CUDA")
def test_gpu_without_cuda_is_an_error_naming_gpu_and_cuda_never_the_cpu():
    with pytest.raises(GpuUnavailableError, match="--gpu.*CUDA"):
        select_device(True)
    assert select_device(False) == "cpu"
    assert issubclass(GpuUnavailableError, ValueError)  # the CLI's exit 2


@pytest.mark.skipif(not NO_CUDA, reason="checks the machine without CUDA")
def test_an_actor_without_cuda_gives_error_rows_with_the_reason(checkpoint, images):
    """A cluster job whose actor lands where torch has no CUDA: each image an error row naming
    --gpu and CUDA (no model loaded, no CPU fall-back)."""
    actor = SegmentActor(checkpoint, dataclasses.asdict(SegmentConfig(use_gpu=True)))
    row = actor.infer_one(images[0])
    assert row["status"] == "error"
    assert "--gpu" in row["message"] and "CUDA" in row["message"]
    assert row["probabilities"].size == 0


@pytest.mark.skipif(not NO_CUDA, reason="checks the machine without CUDA")
def test_evaluate_gpu_without_cuda_is_exit_2(checkpoint, synth_root, capsys):
    assert main(["evaluate", checkpoint, str(synth_root), "--split", "all", "--gpu"]) == 2
    error = capsys.readouterr().err
    assert "--gpu" in error and "CUDA" in error


@pytest.mark.skipif(not NO_CUDA, reason="checks the machine without CUDA")
def test_segment_gpu_asking_more_gpus_than_there_are_is_exit_2_before_work(
    ray_local, checkpoint, images, tmp_path, capsys
):
    output = tmp_path / "out"
    flags = ["--workers", "3", "--actors-per-gpu", "2"]
    assert main(["segment", checkpoint, images[0], str(output), "--gpu", *flags]) == 2
    error = capsys.readouterr().err
    assert "--gpu needs" in error and "2 in all" in error and "CUDA" in error
    assert not (output / "manifest.csv").exists()


@pytest.mark.skipif(not NO_CUDA, reason="checks the machine without CUDA")
def test_tune_gpu_is_exit_2_before_any_trial(ray_local, tmp_path, capsys):
    output = tmp_path / "search"
    flags = ["--encoder-weights", "none", "--gpus-per-trial", "0.25", "--output", str(output)]
    assert main(["tune", "--gpu", *flags]) == 2
    error = capsys.readouterr().err
    assert "--gpu needs" in error and "0.25 in all" in error and "CUDA" in error
    assert not (output / "ray_tune").exists()


def test_too_few_gpus_is_a_usage_error_on_local_ray_and_a_warning_on_a_cluster(caplog):
    check_gpu_count(2, {"GPU": 2.0}, False, "one GPU per worker", "lower --workers")
    check_gpu_count(1.0, {"GPU": 0.9999999}, False, "one", "fix")  # Ray's rounding
    with pytest.raises(ValueError, match="needs one GPU per worker, 3 in all, but the Ray cluster"):
        check_gpu_count(3, {"GPU": 2.0}, False, "one GPU per worker", "lower --workers")
    with caplog.at_level(logging.WARNING):
        check_gpu_count(3, {"GPU": 2.0}, True, "one GPU per worker", "lower --workers")
    assert "waits until the cluster has them" in caplog.text


def test_gpu_shares_of_actors_and_trials():
    assert actor_gpus(SegmentConfig()) == 0 and gpus_needed(SegmentConfig(workers=4)) == 0
    four = SegmentConfig(use_gpu=True, workers=5, actors_per_gpu=4)
    assert actor_gpus(four) == 0.25 and gpus_needed(four) == 2
    with pytest.raises(ValueError, match="--actors-per-gpu 0"):
        actor_gpus(SegmentConfig(use_gpu=True, actors_per_gpu=0))

    def config(workers: int, shared: float) -> Config:
        return Config.from_dict(
            {"train": {"workers": workers, "use_gpu": True}, "tune": {"gpus_per_trial": shared}}
        )

    assert gpus_per_worker(config(1, 0.25)) == 0.25 and trial_gpus(config(1, 0.25)) == 0.25
    assert gpus_per_worker(config(2, 0)) == 1.0 and trial_gpus(config(2, 0)) == 2.0
    assert gpus_per_worker(config(2, 4)) == 2.0
    with pytest.raises(ValueError, match="DDP ranks cannot share"):
        gpus_per_worker(config(2, 1))
