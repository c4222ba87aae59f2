"""Checkpoint folders: ``model.pt`` (a state_dict) + ``config.json``; they load without Ray."""

from __future__ import annotations

import dataclasses
import hashlib
import io as _bytes_io
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision

from unet_ray import __version__
from unet_ray.core.config import (
    ENCODER_IMAGENET,
    ENCODER_NONE,
    HEAD_CHANNELS,
    HEAD_MASK,
    SIZE_MULTIPLE,
    Config,
    ModelConfig,
)
from unet_ray.core.model import UNetVGG16BN, freeze_encoder
from unet_ray.io.files import exists, join_uri, make_dirs, read_bytes, write_bytes_atomic
from unet_ray.io.images import NORMALISE_HIGH_PERCENTILE, NORMALISE_LOW_PERCENTILE

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
FORMAT = "unet_ray.checkpoint/1"
# what the network takes, recorded in every checkpoint (config.json "input") for tools that run
# it outside unet_ray (`unet-ray export` writes the same into its packages)
INPUT_CONTRACT = {
    "channels": "RGB",  # grayscale repeated into three channels, alpha dropped
    "dtype": "uint8",  # 0-255; the network sees value / 255 (ImageNet mean/std inside the model)
    "axes": "yxc",
    "side_multiple": SIZE_MULTIPLE,  # both sides, at any size (tiles of segment.tile)
    # >8-bit and float images: the 1st-99.8th percentile of all values (joint over channels)
    # mapped to 0-255, rounded, clipped (unet_ray.io.images); 8-bit images as they are
    "scaling_above_8_bit": {
        "low_percentile": NORMALISE_LOW_PERCENTILE,
        "high_percentile": NORMALISE_HIGH_PERCENTILE,
        "clip": True,
    },
}


def save_checkpoint(
    directory: str,
    model: torch.nn.Module,
    config: dict[str, Any],
    metrics: dict[str, Any],
    samples: dict[str, list[str]] | None = None,
) -> None:
    """Write ``model.pt`` and ``config.json`` into ``directory`` (local path or s3://), each whole.

    ``samples`` (the source image ids of each split) lets `unet-ray evaluate --split val` pick
    the validation images out of a raw DSB2018 layout.
    """
    make_dirs(directory)
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    head = getattr(model, "head", None)
    if head is not None:  # the config names the head the weights have
        head_name = {channels: name for name, channels in HEAD_CHANNELS.items()}[head.out_channels]
        config = {**config, "model": {**config.get("model", {}), "head": head_name}}
    buffer = _bytes_io.BytesIO()
    torch.save(model.state_dict(), buffer)
    write_bytes_atomic(join_uri(directory, MODEL_FILE), buffer.getvalue())
    info = {
        "format": FORMAT,
        "unet_ray_version": __version__,
        # with the training images' microns per pixel (None when not recorded)
        "input": {**INPUT_CONTRACT, "mpp": (config.get("data") or {}).get("mpp")},
        "config": config,
        "metrics": metrics,
    }
    if samples:
        info["samples"] = samples
    write_bytes_atomic(
        join_uri(directory, CONFIG_FILE), json.dumps(info, indent=2, default=float).encode()
    )


def read_checkpoint_info(directory: str) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder; a clear error when it is not one."""
    config_uri = join_uri(directory, CONFIG_FILE)
    if not exists(config_uri) or not exists(join_uri(directory, MODEL_FILE)):
        raise FileNotFoundError(
            f"{directory} is not a unet_ray checkpoint: expected {MODEL_FILE} and {CONFIG_FILE} in it"
        )
    try:
        return json.loads(read_bytes(config_uri))
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_uri} is not valid JSON: {error}") from error


def load_model(
    directory: str, device: str | torch.device = "cpu", model_bytes: bytes | None = None
):
    """Rebuild the model of a checkpoint folder in eval mode; returns ``(model, info)``.

    Encoder weights come from the checkpoint itself, so no encoder file is consulted.
    ``model_bytes``: the folder's ``model.pt`` when the caller has read it already (one read,
    one GET on object storage).
    """
    info = read_checkpoint_info(directory)
    config = Config.from_dict(info.get("config", {}))
    model_uri = join_uri(directory, MODEL_FILE)
    if model_bytes is None:
        model_bytes = read_bytes(model_uri)
    try:
        state = torch.load(_bytes_io.BytesIO(model_bytes), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt files
        raise ValueError(f"{model_uri} is not a readable PyTorch state_dict: {error}") from error
    saved = tuple(state["head.weight"].shape[:1]) if "head.weight" in state else None
    if "head" not in info.get("config", {}).get("model", {}) and saved == (1,):
        config.model.head = HEAD_MASK  # saved before heads were configurable
        info.setdefault("config", {}).setdefault("model", {})["head"] = HEAD_MASK
    channels = HEAD_CHANNELS[config.model.head]
    if saved != (channels,):
        raise ValueError(
            f"{model_uri} has a head of {saved[0] if saved else '?'} output channel(s), but its "
            f"config.json says model.head={config.model.head!r} ({channels}): a mismatched "
            "checkpoint"
        )
    model = UNetVGG16BN(decoder_batchnorm=config.model.decoder_batchnorm, head_channels=channels)
    model.load_state_dict(state)  # SyncBatchNorm layers save the keys of plain BatchNorm
    return model.to(device).eval(), info


HUB_HASH_PATTERN = re.compile(r"-([a-f0-9]{6,})\.")  # torch.hub: file name carries a SHA-256 prefix
NO_DOWNLOAD_ENV = "UNET_RAY_NO_DOWNLOAD"  # "1": never download encoder weights (tests)
DOWNLOAD_TIMEOUT_S = 60  # per network operation of the weights download
SHA256_PREFIX = 12  # hex digits of a weights file's SHA-256 recorded in checkpoints
FEATURES_PREFIX = "features."  # key prefix of the encoder in a torchvision vgg16_bn state dict


OPTIONAL_BN_SUFFIX = "num_batches_tracked"  # absent from torchvision's (2017) vgg16_bn file


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state-dict file with ``weights_only=True``; ValueError naming the file if unusable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file {path} does not exist")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and EOF errors all mean the same to the user
        raise ValueError(
            f"encoder weights file {path} is not a readable torch state dict: {error}"
        ) from error
    if not isinstance(state_dict, dict) or not all(
        isinstance(value, torch.Tensor) for value in state_dict.values()
    ):
        raise ValueError(
            f"encoder weights file {path} does not hold a state dict (a mapping of names to "
            f"tensors) but a {type(state_dict).__name__}"
        )
    return state_dict


def load_encoder_weights(model: UNetVGG16BN, path: str | Path) -> None:
    """Copy a torchvision vgg16_bn state-dict file's ``features.*`` tensors into the encoder.

    ``classifier.*`` keys are ignored. Missing, unexpected or mis-shaped feature keys raise a
    ValueError that lists them and names the file; nothing is copied in that case.
    """
    state_dict = read_state_dict(path)
    features = {
        key[len(FEATURES_PREFIX) :]: value
        for key, value in state_dict.items()
        if key.startswith(FEATURES_PREFIX)
    }
    expected = model.encoder.state_dict()
    missing = [
        FEATURES_PREFIX + key
        for key in expected
        if key not in features and not key.endswith(OPTIONAL_BN_SUFFIX)
    ]
    unexpected = [FEATURES_PREFIX + key for key in features if key not in expected]
    mis_shaped = [
        f"{FEATURES_PREFIX}{key} (file {tuple(value.shape)}, model {tuple(expected[key].shape)})"
        for key, value in features.items()
        if key in expected and value.shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mis_shaped:
        problems.append(f"wrong shapes {mis_shaped}")
    if problems:
        raise ValueError(
            f"encoder weights file {path} is not a torchvision vgg16_bn state dict: "
            + "; ".join(problems)
        )
    model.encoder.load_state_dict(features, strict=False)


class EncoderWeightsUnavailableError(ValueError):
    """ImageNet encoder weights are neither in torch's hub cache nor downloadable."""


def imagenet_weights_url() -> str:
    """torchvision's download address of ``VGG16_BN_Weights.IMAGENET1K_V1``."""
    return torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1.url


def hub_weights_path() -> Path:
    """Where torch's hub cache keeps the ImageNet weights (``$TORCH_HOME/hub/checkpoints/...``):
    torchvision's own file name, so a file placed there by hand or by torchvision is found."""
    name = Path(urlparse(imagenet_weights_url()).path).name
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def find_hub_encoder_weights() -> str | None:
    """Path of the ImageNet vgg16_bn file in torch's hub cache, or None."""
    path = hub_weights_path()
    return str(path) if path.is_file() else None


def resolve_imagenet_weights() -> str:
    """The cached ImageNet weights file, downloaded into the hub cache when missing.

    ``UNET_RAY_NO_DOWNLOAD=1`` (set by the test suite) forbids the download. When the file is not
    there and cannot be fetched, ``EncoderWeightsUnavailableError`` names the file to place and the
    way to train without it.
    """
    cached = find_hub_encoder_weights()
    if cached:
        return cached
    path, url = hub_weights_path(), imagenet_weights_url()
    problem = "downloads are disabled (UNET_RAY_NO_DOWNLOAD=1)"
    if os.environ.get(NO_DOWNLOAD_ENV) != "1":
        logger.info("downloading the ImageNet VGG16_bn encoder weights from %s to %s", url, path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            hash_prefix = HUB_HASH_PATTERN.search(path.name)
            saved_timeout = socket.getdefaulttimeout()
            socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # offline: fail, never hang
            try:
                torch.hub.download_url_to_file(
                    url,
                    str(path),
                    hash_prefix=hash_prefix.group(1) if hash_prefix else None,
                    progress=False,
                )
            finally:
                socket.setdefaulttimeout(saved_timeout)
            return str(path)
        except Exception as error:  # URLError, timeouts, hash mismatch, read-only cache
            problem = f"the download failed ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
    raise EncoderWeightsUnavailableError(
        f"ImageNet encoder weights are not in torch's hub cache and {problem}: place "
        f"torchvision's file {path.name} (from {url}) at {path} (the cache follows $TORCH_HOME), "
        f"pass --encoder-weights PATH to a copy of it, or train from a random encoder with "
        f"--encoder-weights none"
    )


def resolve_encoder_weights(setting: str | None) -> str | None:
    """The weights file a model setting means: ``imagenet`` -> the hub cache file (downloaded if
    needed), ``none`` -> None, anything else -> that local file (which must exist)."""
    if setting in (None, "", ENCODER_NONE):
        return None
    if setting == ENCODER_IMAGENET:
        return resolve_imagenet_weights()
    path = Path(setting).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"encoder weights file {setting} does not exist (use --encoder-weights imagenet, "
            f"none or the path of a torchvision vgg16_bn state-dict file)"
        )
    return str(path)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def record_encoder_weights(config: ModelConfig) -> ModelConfig:
    """A copy of ``config`` with the weights file that ``encoder_weights`` resolves to and its
    SHA-256 prefix filled in (what a checkpoint records); resolving may download (see above)."""
    path = resolve_encoder_weights(config.encoder_weights)
    return dataclasses.replace(
        config,
        encoder_weights_file=Path(path).name if path else "",
        encoder_weights_sha256=file_sha256(path)[:SHA256_PREFIX] if path else "",
    )


def build_model(config: ModelConfig) -> UNetVGG16BN:
    """Build the U-Net with the encoder weights ``config.encoder_weights`` names.

    ``imagenet`` (the default) loads torchvision's ImageNet weights from torch's hub cache and
    downloads them there when missing; ``none`` keeps the encoder randomly initialised; a path
    loads that file. When the config records a SHA-256 prefix (written when training started),
    the file must match it, so every worker of a run starts from the same encoder.
    ``config.freeze_encoder`` freezes the encoder after loading.
    """
    model = UNetVGG16BN(
        decoder_batchnorm=config.decoder_batchnorm, head_channels=HEAD_CHANNELS[config.head]
    )
    weights_path = resolve_encoder_weights(config.encoder_weights)
    if weights_path:
        if config.encoder_weights_sha256:
            found = file_sha256(weights_path)[:SHA256_PREFIX]
            if found != config.encoder_weights_sha256:
                raise ValueError(
                    f"encoder weights file {weights_path} has SHA-256 prefix {found}, but the run "
                    f"was started with {config.encoder_weights_sha256}: the file differs on this node"
                )
        load_encoder_weights(model, weights_path)
        logger.info("loaded VGG16_bn encoder weights from %s", weights_path)
    if config.freeze_encoder:
        if not weights_path:
            logger.warning("freezing a randomly initialised encoder: only the decoder will learn")
        freeze_encoder(model)
    return model
