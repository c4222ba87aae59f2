"""`unet-ray export`: a checkpoint's network as TorchScript, ONNX or a bioimage.io model package,
each run once on a test image and compared with the checkpoint's own output before it counts.

Every export takes what ``UNetVGG16BN`` takes, float32 N x 3 x H x W in [0, 1] (RGB uint8 / 255,
H and W multiples of 32, any size), and gives probabilities N x C x H x W (the sigmoid is
inside): channel 0 nucleus, channel 1 contour for a ``mask+contour`` head. The bioimage.io
package states the rest as its spec asks (uint8 input, scaling as preprocessing, axes, pixel size
from the checkpoint's ``data.mpp``, test tensors) so that bioimage.io tools run it as unet_ray
does. No Ray.
"""

from __future__ import annotations

import io as bytes_io
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet_ray import __version__, io
from unet_ray.core.config import EXPORT_FORMATS, HEAD_MASK_CONTOUR, SIZE_MULTIPLE, Config
from unet_ray.inference import PIXEL_SCALE, make_batch_predictor, sigmoid_in_place
from unet_ray.io.checkpoint import INPUT_CONTRACT, load_model
from unet_ray.io.synth import generate_sample

ONNX_OPSET = 17
# the image the export is traced on, and the other one it is checked on (a different size shows
# the export takes any multiple of 32); an H&E-like synthetic image with nuclei
TRACE_SHAPE = (64, 96)
CHECK_SHAPE = (96, 160)
CHECK_SEED = 0
MAX_PROBABILITY_ERROR = 1e-4  # export vs checkpoint, probabilities (measured: ~1e-6 on CPU)
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
CHANNEL_NAMES = {1: ["nucleus"], 2: ["nucleus", "contour"]}
LICENSE = "MIT"


class ExportError(ValueError):
    """An export disagrees with its checkpoint, or its format's package is missing."""


class ProbabilityNet(torch.nn.Module):
    """The U-Net with its sigmoid: what every export holds."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(images))


def test_image(shape: tuple[int, int], seed: int = CHECK_SEED) -> np.ndarray:
    """A deterministic H x W x 3 uint8 H&E-like image with nuclei."""
    image, _ = generate_sample(np.random.default_rng(seed), shape[0], shape[1], "he")
    return image


def network_input(image: np.ndarray) -> np.ndarray:
    """RGB uint8 H x W x 3 -> the exports' input, float32 1 x 3 x H x W in [0, 1]."""
    return (image.astype(np.float32) / PIXEL_SCALE).transpose(2, 0, 1)[None].copy()


def checkpoint_probabilities(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """The checkpoint's own output on ``image``: unet_ray's CPU predictor (uint8 in, the same
    scaling as training and segmentation), then the sigmoid; 1 x C x H x W float32."""
    logits = make_batch_predictor(model, "cpu")(image[None])
    return sigmoid_in_place(np.asarray(logits, dtype=np.float32))


def export_checkpoint(checkpoint: str, out: str, export_format: str) -> dict[str, Any]:
    """Write ``checkpoint``'s network to ``out`` in ``export_format`` (one of
    ``EXPORT_FORMATS``) after checking it against the checkpoint; returns what was written and
    the largest probability difference found."""
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"--format {export_format!r} is not one of {EXPORT_FORMATS}")
    model, info = load_model(checkpoint)
    net = ProbabilityNet(model).eval()
    check_image = test_image(CHECK_SHAPE)
    expected = checkpoint_probabilities(model, check_image)
    if export_format == "torchscript":
        data = torchscript_bytes(net)
        error = compare(run_torchscript(data, network_input(check_image)), expected)
    elif export_format == "onnx":
        data = onnx_bytes(net)
        error = compare(run_onnx(data, network_input(check_image)), expected)
    else:
        data, error = bioimageio_package(net, info, check_image, expected)
    io.write_bytes_atomic(out, data)
    return {
        "export": out,
        "format": export_format,
        "checkpoint": checkpoint,
        "bytes": len(data),
        "max_probability_difference": error,
        "input": "float32 N x 3 x H x W in [0, 1] (RGB uint8 / 255), H and W multiples of 32",
        "output": f"probabilities N x {len(expected[0])} x H x W "
        f"({', '.join(CHANNEL_NAMES[len(expected[0])])})",
        "mpp": (info.get("config", {}).get("data") or {}).get("mpp"),
    }


def compare(found: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference; ``ExportError`` past ``MAX_PROBABILITY_ERROR``."""
    if found.shape != expected.shape:
        raise ExportError(f"export gives shape {found.shape}, the checkpoint {expected.shape}")
    error = float(np.max(np.abs(found.astype(np.float32) - expected)))
    if not error <= MAX_PROBABILITY_ERROR:
        raise ExportError(
            f"export differs from the checkpoint by {error:.2e} in probability "
            f"(allowed {MAX_PROBABILITY_ERROR:.0e}): not written"
        )
    return error


def traced_example() -> torch.Tensor:
    return torch.from_numpy(network_input(test_image(TRACE_SHAPE, seed=CHECK_SEED + 1)))


def torchscript_bytes(net: ProbabilityNet) -> bytes:
    """``torch.jit.trace`` of the network (sizes stay free: the graph has no fixed shape)."""
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the size check, traced once
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still shipped
        traced = torch.jit.trace(net, traced_example(), check_trace=False)
        buffer = bytes_io.BytesIO()
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def run_torchscript(data: bytes, images: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(bytes_io.BytesIO(data), map_location="cpu")
    with torch.no_grad():
        return loaded(torch.from_numpy(images)).numpy()


def onnx_bytes(net: ProbabilityNet) -> bytes:
    """ONNX (opset ``ONNX_OPSET``) with batch, height and width dynamic, through torch's
    TorchScript-based exporter (``dynamo=False``: the new one needs onnxscript)."""
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
    except ImportError as error:
        raise ExportError(
            "--format onnx needs the onnx package: pip install 'unet_ray[export]'"
        ) from error
    dynamic = {0: "batch", 2: "height", 3: "width"}
    buffer = bytes_io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation, the traced size check
        torch.onnx.export(
            net,
            (traced_example(),),
            buffer,
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: dynamic, OUTPUT_NAME: dynamic},
        )
    return buffer.getvalue()


def run_onnx(data: bytes, images: np.ndarray) -> np.ndarray:
    try:
        import onnxruntime
    except ImportError as error:
        raise ExportError(
            "checking an ONNX export needs onnxruntime: pip install 'unet_ray[export]'"
        ) from error
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT_NAME: images})[0]


# ----------------------------------------------------------------------------- bioimage.io


def bioimageio_package(
    net: ProbabilityNet, info: dict[str, Any], image: np.ndarray, expected: np.ndarray
) -> tuple[bytes, float]:
    """A bioimage.io model package (zip): TorchScript and ONNX weights, each checked, the test
    image as input tensor (uint8) and the checkpoint's probabilities as output tensor; the spec
    library validates it before its bytes are returned."""
    try:
        from bioimageio.spec import load_description, save_bioimageio_package
    except ImportError as error:
        raise ExportError(
            "--format bioimageio needs bioimageio.spec: pip install 'unet_ray[export]'"
        ) from error
    torchscript, onnx_model = torchscript_bytes(net), onnx_bytes(net)
    error = max(
        compare(run_torchscript(torchscript, network_input(image)), expected),
        compare(run_onnx(onnx_model, network_input(image)), expected),
    )
    with tempfile.TemporaryDirectory(prefix="unet_ray_export_") as folder:
        root = Path(folder)
        (root / "weights.pt").write_bytes(torchscript)
        (root / "weights.onnx").write_bytes(onnx_model)
        np.save(root / "test_input.npy", image.transpose(2, 0, 1)[None].copy())
        np.save(root / "test_output.npy", expected.astype(np.float32))
        (root / "README.md").write_text(package_readme(info))
        description = model_description(root, info, channels=expected.shape[1])
        package = root / "package.zip"
        save_bioimageio_package(description, output_path=package)
        loaded = load_description(package)
        summary = loaded.validation_summary
        if summary.status not in ("valid-format", "passed"):
            raise ExportError(f"the bioimage.io package does not validate: {summary.format()}")
        return package.read_bytes(), error


def model_description(root: Path, info: dict[str, Any], channels: int):
    """The bioimage.io (format 0.5) model description of the files in ``root``."""
    import bioimageio.spec.model.v0_5 as spec

    config = Config.from_dict(info.get("config", {}))
    mpp = config.data.mpp
    unit = {"unit": "micrometer", "scale": float(mpp)} if mpp else {}
    space = [
        spec.SpaceInputAxis(
            id=spec.AxisId(name),
            size=spec.ParameterizedSize(min=SIZE_MULTIPLE, step=SIZE_MULTIPLE),
            **unit,
        )
        for name in ("y", "x")
    ]
    image_input = spec.InputTensorDescr(
        id=spec.TensorId("image"),
        description="RGB uint8 (>8-bit images: 1st-99.8th percentile scaled to 0-255 first)",
        axes=[
            spec.BatchAxis(),
            spec.ChannelAxis(channel_names=[spec.Identifier(name) for name in ("r", "g", "b")]),
            *space,
        ],
        test_tensor=spec.FileDescr(source=root / "test_input.npy"),
        # the tensor the network gets, after the preprocessing (the test tensor is uint8)
        data=spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        preprocessing=[
            spec.EnsureDtypeDescr(kwargs=spec.EnsureDtypeKwargs(dtype="float32")),
            spec.ScaleLinearDescr(kwargs=spec.ScaleLinearKwargs(gain=1.0 / PIXEL_SCALE)),
        ],
    )
    output = spec.OutputTensorDescr(
        id=spec.TensorId(OUTPUT_NAME),
        description="sigmoid probabilities: " + ", ".join(CHANNEL_NAMES[channels]),
        axes=[
            spec.BatchAxis(),
            spec.ChannelAxis(channel_names=[spec.Identifier(n) for n in CHANNEL_NAMES[channels]]),
            *[
                spec.SpaceOutputAxis(
                    id=spec.AxisId(name),
                    size=spec.SizeReference(
                        tensor_id=spec.TensorId("image"), axis_id=spec.AxisId(name)
                    ),
                    **unit,
                )
                for name in ("y", "x")
            ],
        ],
        test_tensor=spec.FileDescr(source=root / "test_output.npy"),
        data=spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
    )
    head = "nucleus and contour" if config.model.head == HEAD_MASK_CONTOUR else "nucleus"
    return spec.ModelDescr(
        name="unet_ray VGG16_bn U-Net nuclei",
        description=f"Nucleus segmentation: a VGG16_bn-encoder U-Net ({head} probabilities), "
        f"exported by unet_ray {__version__}",
        authors=[spec.Author(name="unet_ray")],
        cite=[
            spec.CiteEntry(
                text="Ronneberger et al., U-Net: Convolutional Networks for Biomedical Image "
                "Segmentation",
                doi=spec.Doi("10.1007/978-3-319-24574-4_28"),
            )
        ],
        license=LICENSE,
        documentation=spec.FileDescr(source=root / "README.md"),
        inputs=[image_input],
        outputs=[output],
        weights=spec.WeightsDescr(
            torchscript=spec.TorchscriptWeightsDescr(
                source=root / "weights.pt", pytorch_version=spec.Version(torch.__version__)
            ),
            onnx=spec.OnnxWeightsDescr(
                source=root / "weights.onnx", opset_version=ONNX_OPSET, parent="torchscript"
            ),
        ),
        tags=["nuclei", "segmentation", "unet", "2d", "unet_ray"],
    )


def package_readme(info: dict[str, Any]) -> str:
    config = info.get("config", {})
    return (
        "# unet_ray nucleus U-Net\n\n"
        "A VGG16_bn-encoder U-Net trained with unet_ray. Input: RGB uint8, scaled to [0, 1] by "
        "the package's preprocessing; images with more than 8 bits are first scaled to 0-255 "
        "between their 1st and 99.8th percentiles (joint over channels, clipped), as unet_ray "
        "does. Height and width must be multiples of 32. Output: sigmoid probabilities; "
        "instances follow from thresholding (unet_ray's instance settings are below).\n\n"
        "```json\n"
        + json.dumps(
            {
                "input": info.get("input", INPUT_CONTRACT),
                "instances": config.get("instances"),
                "head": (config.get("model") or {}).get("head"),
                "mpp": (config.get("data") or {}).get("mpp"),
                "unet_ray_version": info.get("unet_ray_version"),
            },
            indent=2,
        )
        + "\n```\n\n# Validation\n\nBefore this package was written, its TorchScript and ONNX "
        "weights were run on its test input and compared with the checkpoint's own output in "
        f"unet_ray (largest probability difference allowed: {MAX_PROBABILITY_ERROR:.0e}).\n"
    )
