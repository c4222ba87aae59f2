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

import logging
import math

import torch
import torchvision
from torch import nn

from unet_ray.core.config import (
    ENCODER_NONE,
    SIZE_MULTIPLE,
    ModelConfig,
)

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet normalisation for vgg16_bn
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_CHANNELS = 3  # RGB in [0, 1]
CENTRE_CHANNELS = 512  # width of the four centre convolutions (= the last encoder stage)
DECODER_CHANNELS = (512, 256, 128, 64, 32)  # output width of each up-step, coarsest first
VGG16_LAYERS = torchvision.models.vgg.cfgs["D"]  # 13 conv widths with "M" for each max-pool


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


def is_pretrained(config: ModelConfig) -> bool:
    return config.encoder_weights not in (None, "", ENCODER_NONE)


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
