"""`unet-ray export` (issue 23): each format written by the command, loaded back by its own runtime
(torch.jit, onnxruntime, the bioimage.io spec library) and compared with the checkpoint's model
on an image the export never saw, of another size than it was traced at."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from unet_ray.cli import main
from unet_ray.core.config import Config
from unet_ray.core.model import UNetVGG16BN
from unet_ray.io.checkpoint import load_model, save_checkpoint
from unet_ray.io.synth import generate_sample
from unet_ray.pipelines.export import TRACE_SHAPE, ExportError, compare

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SHAPE = (128, 96)  # not the traced 64 x 96, nor the export's own check image
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """Random weights, the two-channel head, a recorded pixel size of 0.5 um."""
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("export") / "checkpoint"
    config = Config.from_dict({"model": {"head": "mask+contour"}, "data": {"mpp": 0.5}})
    save_checkpoint(str(folder), UNetVGG16BN(head_channels=2), config.to_dict(), {})
    return str(folder)


@pytest.fixture(scope="module")
def image_and_expected(checkpoint):
    """An unseen RGB uint8 image, the export input (float32 / 255, NCHW) and the checkpoint
    model's probabilities, computed here with plain torch."""
    image, _ = generate_sample(np.random.default_rng(7), *SHAPE, "fluorescence")
    images = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    model, _ = load_model(checkpoint)
    with torch.no_grad():
        expected = torch.sigmoid(model(images)).numpy()
    assert SHAPE != TRACE_SHAPE and expected.shape == (1, 2, *SHAPE)
    return image, images.numpy(), expected


def export(checkpoint, out, export_format, capsys) -> dict:
    assert main(["export", checkpoint, str(out), "--format", export_format]) == 0
    record = json.loads(capsys.readouterr().out)  # stdout: one JSON object
    assert record["format"] == export_format and record["mpp"] == 0.5
    assert record["max_probability_difference"] <= TOLERANCE
    assert out.stat().st_size == record["bytes"]
    return record


def test_torchscript_export_matches_the_checkpoint(
    checkpoint, image_and_expected, tmp_path, capsys
):
    out = tmp_path / "model.pt"
    export(checkpoint, out, "torchscript", capsys)
    _, images, expected = image_and_expected
    loaded = torch.jit.load(str(out))
    with torch.no_grad():
        found = loaded(torch.from_numpy(images)).numpy()
        batch = loaded(torch.from_numpy(np.concatenate([images, images[:, :, ::-1].copy()])))
    assert np.abs(found - expected).max() <= TOLERANCE
    assert batch.shape == (2, 2, *SHAPE)  # any batch size


def test_onnx_export_matches_the_checkpoint(checkpoint, image_and_expected, tmp_path, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    export(checkpoint, out, "onnx", capsys)
    _, images, expected = image_and_expected
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    found = session.run(None, {"image": images})[0]
    assert np.abs(found - expected).max() <= TOLERANCE


def test_bioimageio_package_validates_and_carries_the_contract(
    checkpoint, image_and_expected, tmp_path, capsys
):
    spec = pytest.importorskip("bioimageio.spec")
    out = tmp_path / "unet.zip"
    export(checkpoint, out, "bioimageio", capsys)
    description = spec.load_description(out)
    assert type(description).__name__ == "ModelDescr", description.validation_summary.format()
    assert description.validation_summary.status in ("valid-format", "passed")
    image_input, output = description.inputs[0], description.outputs[0]
    axes = {str(axis.id): axis for axis in image_input.axes}
    assert list(axes) == ["batch", "channel", "y", "x"]
    assert [str(name) for name in axes["channel"].channel_names] == ["r", "g", "b"]
    assert axes["y"].scale == 0.5 and axes["x"].unit == "micrometer"  # the pixel size
    assert axes["y"].size.min == 32 and axes["y"].size.step == 32  # sides: multiples of 32
    steps = [step.id for step in image_input.preprocessing]
    assert "scale_linear" in steps
    gain = next(step for step in image_input.preprocessing if step.id == "scale_linear").kwargs.gain
    assert gain == pytest.approx(1 / 255)
    assert [str(name) for name in output.axes[1].channel_names] == ["nucleus", "contour"]
    with zipfile.ZipFile(out) as package:
        names = set(package.namelist())
        assert {"rdf.yaml", "weights.pt", "weights.onnx"} <= names
        package.extractall(tmp_path / "package")
    # the package's own test tensors: uint8 in, preprocessing as described, its weights out
    folder = tmp_path / "package"
    test_input = np.load(folder / image_input.test_tensor.source.path)
    test_output = np.load(folder / output.test_tensor.source.path)
    assert test_input.dtype == np.uint8 and test_input.shape[1] == 3
    weights = torch.jit.load(str(folder / "weights.pt"))
    with torch.no_grad():
        found = weights(torch.from_numpy(test_input.astype(np.float32) * gain)).numpy()
    assert np.abs(found - test_output).max() <= TOLERANCE
    # and the package's weights agree with the checkpoint on the unseen image too
    _, images, expected = image_and_expected
    with torch.no_grad():
        assert np.abs(weights(torch.from_numpy(images)).numpy() - expected).max() <= TOLERANCE


def test_an_export_that_disagrees_with_its_checkpoint_is_refused():
    expected = np.zeros((1, 1, 32, 32), np.float32)
    assert compare(expected + 5e-5, expected) == pytest.approx(5e-5)
    with pytest.raises(ExportError, match="differs from the checkpoint"):
        compare(expected + 1e-2, expected)
    with pytest.raises(ExportError, match="shape"):
        compare(expected[:, :, :16], expected)
