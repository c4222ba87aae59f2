"""The VGG16_bn-encoder U-Net, its ImageNet / local encoder weights, freezing, optimiser groups.

Plain torch: no Ray; the only I/O is the encoder weights file (and its one-off download). Layout (from the reference report):

- encoder: torchvision ``vgg16_bn`` features, 13 conv3x3 + BN + ReLU in five stages, each stage
  followed by a 2x2 max-pool; the classifier is dropped;
- centre: four 512-wide conv3x3 + ReLU at 1/32 resolution (two after the last pool, two before
  the first up-convolution); ``decoder_batchnorm`` adds batch-norm here too;
- decoder: five up-steps, each a 2x2 stride-2 transposed convolution halving the channels,
  concatenation with the encoder stage output of the same size, and two conv3x3 + ReLU
  (batch-norm in between only with ``decoder_batchnorm``);
- head: a 1x1 convolution to one logit per channel: nucleus (``mask`` head), or nucleus and
  nucleus contour (``mask+contour``).

27 conv3x3 layers in all (13 + 4 + 10); padded convolutions, so the output has the input's size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from unet_ray.config import (
    ENCODER_IMAGENET,
    ENCODER_NONE,
    HEAD_CHANNELS,
    SIZE_MULTIPLE,
    ModelConfig,
)

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet normalisation for vgg16_bn
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_CHANNELS = 3  # RGB in [0, 1]
CENTRE_CHANNELS = 512  # width of the four centre convolutions (= the last encoder stage)
DECODER_CHANNELS = (512, 256, 128, 64, 32)  # output width of each up-step, coarsest first
HUB_HASH_PATTERN = re.compile(r"-([a-f0-9]{6,})\.")  # torch.hub: file name carries a SHA-256 prefix
NO_DOWNLOAD_ENV = "UNET_RAY_NO_DOWNLOAD"  # "1": never download encoder weights (tests)
DOWNLOAD_TIMEOUT_S = 60  # per network operation of the weights download
SHA256_PREFIX = 12  # hex digits of a weights file's SHA-256 recorded in checkpoints
FEATURES_PREFIX = "features."  # key prefix of the encoder in a torchvision vgg16_bn state dict
VGG16_LAYERS = torchvision.models.vgg.cfgs["D"]  # 13 conv widths with "M" for each max-pool
OPTIONAL_BN_SUFFIX = "num_batches_tracked"  # absent from torchvision's (2017) vgg16_bn file


def check_input_shape(height: int, width: int) -> None:
    """Raise ValueError, naming the nearest valid size, unless both sides are multiples of 32."""
    if height > 0 and width > 0 and height % SIZE_MULTIPLE == 0 and width % SIZE_MULTIPLE == 0:
        return
    nearest_height, nearest_width = nearest_valid_side(height), nearest_valid_side(width)
    raise ValueError(
        f"input size {height}x{width} is not a multiple of {SIZE_MULTIPLE}; "
        f"pad or crop to {nearest_height}x{nearest_width}"
    )


def nearest_valid_side(side: int) -> int:
    """The multiple of 32 closest to ``side`` (halves round up), at least 32."""
    return max(SIZE_MULTIPLE, math.floor(side / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE)


def conv3x3_block(in_channels: int, out_channels: int, batchnorm: bool) -> list[nn.Module]:
    """A padded 3x3 convolution, optional batch-norm, ReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=not batchnorm)
    ]
    if batchnorm:
        layers.append(nn.BatchNorm2d(out_channels))
    layers.append(nn.ReLU(inplace=True))
    return layers


def double_conv(in_channels: int, out_channels: int, batchnorm: bool) -> nn.Sequential:
    """Two conv3x3 (+ BN) + ReLU blocks."""
    return nn.Sequential(
        *conv3x3_block(in_channels, out_channels, batchnorm),
        *conv3x3_block(out_channels, out_channels, batchnorm),
    )


class UpStep(nn.Module):
    """2x2 up-convolution halving the channels, concatenation with the skip, two conv3x3."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, batchnorm: bool):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.convs = double_conv(in_channels // 2 + skip_channels, out_channels, batchnorm)

    def forward(self, features: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([self.up(features), skip], dim=1))


class UNetVGG16BN(nn.Module):
    """U-Net with a VGG16_bn encoder; forward maps N x 3 x H x W in [0, 1] to N x 1 x H x W logits.

    ``encoder`` is torchvision's ``vgg16_bn().features`` unchanged, so its state-dict keys are
    torchvision's ``features.*`` keys with the prefix ``encoder.``; the ImageNet mean/std are
    non-persistent buffers and do not appear in the state dict.
    """

    def __init__(self, decoder_batchnorm: bool = False, head_channels: int = 1):
        super().__init__()
        self.decoder_batchnorm = decoder_batchnorm
        self.encoder_frozen = False
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.encoder = build_vgg16_bn_encoder()
        skip_channels = encoder_stage_channels(self.encoder)
        self.centre = nn.Sequential(
            *conv3x3_block(skip_channels[-1], CENTRE_CHANNELS, decoder_batchnorm),
            *conv3x3_block(CENTRE_CHANNELS, CENTRE_CHANNELS, decoder_batchnorm),
            *conv3x3_block(CENTRE_CHANNELS, CENTRE_CHANNELS, decoder_batchnorm),
            *conv3x3_block(CENTRE_CHANNELS, CENTRE_CHANNELS, decoder_batchnorm),
        )
        in_channels = CENTRE_CHANNELS
        steps = []
        for skip, out_channels in zip(reversed(skip_channels), DECODER_CHANNELS, strict=True):
            steps.append(UpStep(in_channels, skip, out_channels, decoder_batchnorm))
            in_channels = out_channels
        self.decoder = nn.ModuleList(steps)
        self.head = nn.Conv2d(in_channels, head_channels, kernel_size=1)
        initialise_new_layers([self.centre, self.decoder, self.head])

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the encoder; return its 1/32 output and each stage's output before its max-pool."""
        skips = []
        features = images
        for layer in self.encoder:
            if isinstance(layer, nn.MaxPool2d):
                skips.append(features)
            features = layer(features)
        return features, skips

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != INPUT_CHANNELS:
            raise ValueError(
                f"expected a float batch N x {INPUT_CHANNELS} x H x W in [0, 1], "
                f"got shape {tuple(images.shape)}"
            )
        check_input_shape(images.shape[2], images.shape[3])
        features, skips = self.encode((images - self.mean) / self.std)
        features = self.centre(features)
        for step, skip in zip(self.decoder, reversed(skips), strict=True):
            features = step(features, skip)
        return self.head(features)

    def train(self, mode: bool = True) -> UNetVGG16BN:
        """As ``nn.Module.train``, but a frozen encoder's batch-norm layers stay in eval mode."""
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self


def build_vgg16_bn_encoder() -> nn.Sequential:
    """torchvision's ``vgg16_bn(weights=None).features``, with its initialisation.

    Built from torchvision's own layer list (config "D" with batch-norm) so that the 120M-weight
    classifier is never allocated; module structure and state-dict keys are identical.
    """
    encoder = torchvision.models.vgg.make_layers(VGG16_LAYERS, batch_norm=True)
    for layer in encoder.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
    return encoder


def encoder_stage_channels(encoder: nn.Sequential) -> list[int]:
    """Output channels of each encoder stage (the last conv before each max-pool)."""
    channels = []
    last_width = INPUT_CHANNELS
    for layer in encoder:
        if isinstance(layer, nn.Conv2d):
            last_width = layer.out_channels
        elif isinstance(layer, nn.MaxPool2d):
            channels.append(last_width)
    return channels


def initialise_new_layers(modules: list[nn.Module]) -> None:
    """He-normal weights and zero biases for the layers the U-Net adds to the VGG encoder."""
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
            elif isinstance(layer, nn.BatchNorm2d):
                nn.init.ones_(layer.weight)
                nn.init.zeros_(layer.bias)


def count_conv3x3(model: nn.Module) -> int:
    """Number of 3x3 ``nn.Conv2d`` layers in ``model`` (27 for the U-Net)."""
    return sum(
        1
        for layer in model.modules()
        if isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) == (3, 3)
    )


def encoder_parameters(model: UNetVGG16BN) -> list[nn.Parameter]:
    """The VGG16_bn encoder's parameters."""
    return list(model.encoder.parameters())


def decoder_parameters(model: UNetVGG16BN) -> list[nn.Parameter]:
    """Every parameter outside the encoder: centre, decoder and head."""
    encoder_ids = {id(parameter) for parameter in model.encoder.parameters()}
    return [parameter for parameter in model.parameters() if id(parameter) not in encoder_ids]


def freeze_encoder(model: UNetVGG16BN) -> None:
    """Stop training the encoder: no gradients, and its batch-norm statistics stay fixed."""
    for parameter in model.encoder.parameters():
        parameter.requires_grad_(False)
    model.encoder_frozen = True
    model.train(model.training)  # puts the encoder's batch-norm layers in eval mode


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


def is_pretrained(config: ModelConfig) -> bool:
    return config.encoder_weights not in (None, "", ENCODER_NONE)


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


def parameter_groups(model: nn.Module, weight_decay: float, encoder_lr_scale: float) -> list[dict]:
    """SGD parameter groups: encoder and decoder (centre, up-steps, head), each split into
    weights with weight decay and batch-norm weights and biases without it. Every group carries
    ``lr_scale``: ``encoder_lr_scale`` for the encoder, 1.0 elsewhere. Frozen parameters and empty
    groups are left out."""
    model = getattr(model, "module", model)
    encoder_ids = {id(parameter) for parameter in model.encoder.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for module in model.modules():
        no_decay_module = isinstance(module, nn.modules.batchnorm._BatchNorm)
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            decay = not (no_decay_module or name == "bias")
            groups.setdefault((id(parameter) in encoder_ids, decay), []).append(parameter)
    return [
        {
            "params": parameters,
            "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": encoder_lr_scale if in_encoder else 1.0,
            "name": ("encoder" if in_encoder else "decoder") + ("" if decay else "_no_decay"),
        }
        for (in_encoder, decay), parameters in sorted(groups.items(), reverse=True)
    ]


def use_sync_batchnorm(enabled: bool, use_gpu: bool, world_size: int) -> bool:
    """SyncBatchNorm pays off (and works) only with several GPU workers: batch statistics over
    the global batch instead of each GPU's share of it."""
    return enabled and use_gpu and world_size > 1
