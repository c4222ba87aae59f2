"""The VGG16_bn-encoder U-Net, loading its encoder weights from a local file, and freezing it.

Plain torch: no Ray, no I/O beyond reading one weights file. Layout (from the reference report):

- encoder: torchvision ``vgg16_bn`` features, 13 conv3x3 + BN + ReLU in five stages, each stage
  followed by a 2x2 max-pool; the classifier is dropped;
- centre: four 512-wide conv3x3 + ReLU at 1/32 resolution (two after the last pool, two before
  the first up-convolution); ``decoder_batchnorm`` adds batch-norm here too;
- decoder: five up-steps, each a 2x2 stride-2 transposed convolution halving the channels,
  concatenation with the encoder stage output of the same size, and two conv3x3 + ReLU
  (batch-norm in between only with ``decoder_batchnorm``);
- head: a 1x1 convolution to one logit.

27 conv3x3 layers in all (13 + 4 + 10); padded convolutions, so the output has the input's size.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torchvision
from torch import nn

from unet_ray.config import SIZE_MULTIPLE, ModelConfig

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet normalisation for vgg16_bn
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_CHANNELS = 3  # RGB in [0, 1]
CENTRE_CHANNELS = 512  # width of the four centre convolutions (= the last encoder stage)
DECODER_CHANNELS = (512, 256, 128, 64, 32)  # output width of each up-step, coarsest first
HUB_WEIGHTS_PATTERN = "vgg16_bn-*.pth"  # torchvision's file name in torch.hub's checkpoint cache
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

    def __init__(self, decoder_batchnorm: bool = False):
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
        self.head = nn.Conv2d(in_channels, 1, kernel_size=1)
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


def find_hub_encoder_weights() -> str | None:
    """Path of a vgg16_bn file in torch's hub cache (``$TORCH_HOME/hub/checkpoints``), or None."""
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    matches = sorted(checkpoints.glob(HUB_WEIGHTS_PATTERN)) if checkpoints.is_dir() else []
    return str(matches[0]) if matches else None


def build_model(config: ModelConfig) -> UNetVGG16BN:
    """Build the U-Net; encoder weights from ``config.encoder_weights``, else the hub cache.

    Never downloads: with neither file the encoder stays randomly initialised and a warning says
    so. ``config.freeze_encoder`` freezes the encoder after loading.
    """
    model = UNetVGG16BN(decoder_batchnorm=config.decoder_batchnorm)
    weights_path = config.encoder_weights or find_hub_encoder_weights()
    if weights_path:
        load_encoder_weights(model, weights_path)
        logger.info("loaded VGG16_bn encoder weights from %s", weights_path)
    else:
        logger.warning(
            "no encoder weights file given and none in torch's hub cache (%s): the VGG16_bn "
            "encoder is randomly initialised; pass --encoder-weights PATH for ImageNet weights",
            Path(torch.hub.get_dir()) / "checkpoints",
        )
    if config.freeze_encoder:
        if not weights_path:
            logger.warning("freezing a randomly initialised encoder: only the decoder will learn")
        freeze_encoder(model)
    return model
