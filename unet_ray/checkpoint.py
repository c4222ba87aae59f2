"""Checkpoint folders: ``model.pt`` (a state_dict) + ``config.json``; they load without Ray."""

from __future__ import annotations

import io as _bytes_io
import json
from typing import Any

import torch

from unet_ray import io
from unet_ray.config import HEAD_CHANNELS, HEAD_MASK, Config

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
FORMAT = "unet_ray.checkpoint/1"


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
    io.make_dirs(directory)
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    head = getattr(model, "head", None)
    if head is not None:  # the config names the head the weights have
        head_name = {channels: name for name, channels in HEAD_CHANNELS.items()}[head.out_channels]
        config = {**config, "model": {**config.get("model", {}), "head": head_name}}
    buffer = _bytes_io.BytesIO()
    torch.save(model.state_dict(), buffer)
    io.write_bytes_atomic(io.join_uri(directory, MODEL_FILE), buffer.getvalue())
    info = {"format": FORMAT, "config": config, "metrics": metrics}
    if samples:
        info["samples"] = samples
    io.write_bytes_atomic(
        io.join_uri(directory, CONFIG_FILE), json.dumps(info, indent=2, default=float).encode()
    )


def read_checkpoint_info(directory: str) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder; a clear error when it is not one."""
    config_uri = io.join_uri(directory, CONFIG_FILE)
    if not io.exists(config_uri) or not io.exists(io.join_uri(directory, MODEL_FILE)):
        raise FileNotFoundError(
            f"{directory} is not a unet_ray checkpoint: expected {MODEL_FILE} and {CONFIG_FILE} in it"
        )
    try:
        return json.loads(io.read_bytes(config_uri))
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_uri} is not valid JSON: {error}") from error


def load_model(directory: str, device: str | torch.device = "cpu"):
    """Rebuild the model of a checkpoint folder in eval mode; returns ``(model, info)``.

    Encoder weights come from the checkpoint itself, so no encoder file is consulted.
    """
    from unet_ray.model import UNetVGG16BN

    info = read_checkpoint_info(directory)
    config = Config.from_dict(info.get("config", {}))
    model_uri = io.join_uri(directory, MODEL_FILE)
    try:
        state = torch.load(
            _bytes_io.BytesIO(io.read_bytes(model_uri)), map_location="cpu", weights_only=True
        )
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
