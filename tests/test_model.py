"""Tests for the VGG16_bn U-Net: shapes, layer counts, gradients, encoder weights, freezing."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from torch import nn

from unet_ray.core.config import ModelConfig
from unet_ray.core.model import (
    UNetVGG16BN,
    check_input_shape,
    count_conv3x3,
    decoder_parameters,
    encoder_parameters,
    freeze_encoder,
    parameter_groups,
    use_sync_batchnorm,
)
from unet_ray.io.checkpoint import (
    EncoderWeightsUnavailableError,
    build_model,
    file_sha256,
    find_hub_encoder_weights,
    hub_weights_path,
    load_encoder_weights,
    record_encoder_weights,
    resolve_imagenet_weights,
)


@pytest.fixture(scope="module")
def model() -> UNetVGG16BN:
    torch.manual_seed(0)
    return UNetVGG16BN().eval()


@pytest.fixture(scope="module")
def torchvision_vgg() -> nn.Module:
    return torchvision.models.vgg16_bn(weights=None)


@pytest.fixture(scope="module")
def vgg_state_dict(torchvision_vgg) -> dict[str, torch.Tensor]:
    """torchvision's vgg16_bn state dict with random values (not the model's own).

    The classifier's keys are kept but its tensors shrunk, so saved files stay small.
    """
    torch.manual_seed(1)
    state_dict = {}
    for key, value in torchvision_vgg.state_dict().items():
        if key.startswith("classifier."):
            state_dict[key] = torch.zeros(2)
        elif value.is_floating_point():
            state_dict[key] = torch.empty_like(value).uniform_(-1.0, 1.0)
        else:
            state_dict[key] = value.clone()
    assert any(key.startswith("classifier.") for key in state_dict)
    return state_dict


@pytest.fixture(scope="module")
def vgg_weights_file(tmp_path_factory, vgg_state_dict) -> str:
    path = tmp_path_factory.mktemp("weights") / "vgg16_bn-test.pth"
    torch.save(vgg_state_dict, path)
    return str(path)


@pytest.fixture
def no_hub_cache(tmp_path, monkeypatch):
    """Point torch's hub cache at an empty folder so the real cache is never consulted."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("UNET_RAY_NO_DOWNLOAD", "1")
    monkeypatch.setattr(torch.hub, "_hub_dir", None)


@pytest.mark.parametrize("height, width", [(64, 64), (128, 192), (96, 32)])
def test_output_has_input_size(model, height, width):
    images = torch.rand(2, 3, height, width)
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (2, 1, height, width)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "height, width, nearest",
    [(100, 200, "96x192"), (64, 65, "64x64"), (16, 48, "32x64"), (80, 81, "96x96")],
)
def test_wrong_size_names_nearest_valid_size(height, width, nearest):
    with pytest.raises(ValueError, match=f"{height}x{width}.*multiple of 32.*{nearest}"):
        check_input_shape(height, width)


def test_forward_rejects_wrong_size_and_channels(model):
    with pytest.raises(ValueError, match="pad or crop to 96x192"):
        model(torch.rand(1, 3, 100, 200))
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        model(torch.rand(1, 1, 64, 64))


def test_valid_sizes_pass_check():
    check_input_shape(32, 32)
    check_input_shape(256, 512)


def test_encoder_is_torchvision_vgg16_bn_features(model, torchvision_vgg):
    assert repr(model.encoder) == repr(torchvision_vgg.features)
    ours, theirs = model.encoder.state_dict(), torchvision_vgg.features.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[key].shape == theirs[key].shape for key in ours)


def test_has_27_conv3x3_layers(model):
    assert count_conv3x3(model) == 27
    assert count_conv3x3(model.encoder) == 13
    assert count_conv3x3(model.centre) == 4
    assert count_conv3x3(model.decoder) == 10
    assert sum(isinstance(layer, nn.MaxPool2d) for layer in model.encoder) == 5
    up_convs = [layer.up for layer in model.decoder]
    assert [(up.in_channels, up.out_channels) for up in up_convs] == [
        (512, 256),
        (512, 256),
        (256, 128),
        (128, 64),
        (64, 32),
    ]
    assert all(up.kernel_size == (2, 2) and up.stride == (2, 2) for up in up_convs)
    assert model.head.kernel_size == (1, 1) and model.head.out_channels == 1


def count_batchnorm(module: nn.Module) -> int:
    return sum(isinstance(layer, nn.BatchNorm2d) for layer in module.modules())


def test_decoder_batchnorm_adds_batchnorm_outside_encoder_only(model):
    with_batchnorm = UNetVGG16BN(decoder_batchnorm=True)
    assert count_batchnorm(model.encoder) == count_batchnorm(with_batchnorm.encoder) == 13
    assert count_batchnorm(model) == 13
    assert count_batchnorm(with_batchnorm.decoder) == 10
    assert count_batchnorm(with_batchnorm.centre) == 4
    assert count_conv3x3(with_batchnorm) == 27


def test_state_dict_has_no_normalisation_buffers(model):
    keys = set(model.state_dict())
    assert "mean" not in keys and "std" not in keys
    assert "encoder.0.weight" in keys and "head.weight" in keys


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = UNetVGG16BN(decoder_batchnorm=True).train()
    logits = model(torch.rand(2, 3, 64, 64))
    assert torch.isfinite(logits).all()
    logits.mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_parameter_split_covers_every_parameter_once(model):
    encoder, decoder = encoder_parameters(model), decoder_parameters(model)
    assert len(encoder) + len(decoder) == len(list(model.parameters()))
    assert {id(p) for p in encoder}.isdisjoint({id(p) for p in decoder})
    assert any(p is model.head.weight for p in decoder)


def test_encoder_weights_round_trip(vgg_weights_file, vgg_state_dict):
    model = UNetVGG16BN()
    load_encoder_weights(model, vgg_weights_file)
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, vgg_state_dict[f"features.{key}"]), key


def test_encoder_weights_without_num_batches_tracked_load(tmp_path, vgg_state_dict):
    """torchvision's published vgg16_bn file predates BN's num_batches_tracked buffers."""
    old_format = {k: v for k, v in vgg_state_dict.items() if "num_batches_tracked" not in k}
    path = tmp_path / "old.pth"
    torch.save(old_format, path)
    model = UNetVGG16BN()
    load_encoder_weights(model, path)
    assert torch.equal(model.encoder[0].weight, vgg_state_dict["features.0.weight"])


def test_corrupt_weights_file_names_the_file(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ValueError, match="corrupt.pth.*not a readable torch state dict"):
        load_encoder_weights(UNetVGG16BN(), path)


def test_missing_weights_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_encoder_weights(UNetVGG16BN(), tmp_path / "absent.pth")


def test_weights_file_missing_a_key_lists_it(tmp_path, vgg_state_dict):
    incomplete = dict(vgg_state_dict)
    del incomplete["features.7.weight"]
    path = tmp_path / "incomplete.pth"
    torch.save(incomplete, path)
    model = UNetVGG16BN()
    before = model.encoder[0].weight.clone()
    with pytest.raises(ValueError, match=r"incomplete.pth.*missing keys \['features.7.weight'\]"):
        load_encoder_weights(model, path)
    assert torch.equal(model.encoder[0].weight, before)  # nothing copied on error


def test_weights_file_with_wrong_shape_lists_it(tmp_path, vgg_state_dict):
    wrong = dict(vgg_state_dict)
    wrong["features.3.weight"] = torch.zeros(64, 32, 3, 3)
    wrong["features.99.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.pth"
    torch.save(wrong, path)
    with pytest.raises(ValueError) as error:
        load_encoder_weights(UNetVGG16BN(), path)
    message = str(error.value)
    assert "wrong.pth" in message
    assert "features.3.weight (file (64, 32, 3, 3), model (64, 64, 3, 3))" in message
    assert "unexpected keys ['features.99.weight']" in message


def test_weights_file_with_no_state_dict_is_rejected(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="list.pth.*does not hold a state dict"):
        load_encoder_weights(UNetVGG16BN(), path)


def test_build_model_with_encoder_none_is_random(no_hub_cache):
    assert find_hub_encoder_weights() is None
    model = build_model(ModelConfig(encoder_weights="none"))
    assert count_conv3x3(model) == 27


def test_imagenet_default_offline_and_uncached_names_the_file_and_the_way_out(no_hub_cache):
    with pytest.raises(EncoderWeightsUnavailableError) as error:
        build_model(ModelConfig())  # the default: imagenet
    message = str(error.value)
    assert str(hub_weights_path()) in message and "vgg16_bn-6c64b313.pth" in message
    assert "--encoder-weights none" in message and "TORCH_HOME" in message


def test_train_command_without_imagenet_weights_exits_2_before_any_work(
    no_hub_cache, tmp_path, capsys
):
    from unet_ray.cli import main

    assert main(["train", "--output", str(tmp_path / "run")]) == 2
    assert "--encoder-weights none" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_imagenet_weights_are_downloaded_into_the_hub_cache(
    no_hub_cache, tmp_path, vgg_weights_file, vgg_state_dict, monkeypatch
):
    """The real download code path against a real HTTP server on 127.0.0.1 serving a test file
    under a torch.hub name whose hash prefix matches (torch.hub checks it)."""
    import functools
    import http.server
    import shutil
    import threading

    from unet_ray.io import checkpoint as weights_module

    served = tmp_path / "served"
    served.mkdir()
    name = f"vgg16_bn-{file_sha256(vgg_weights_file)[:8]}.pth"
    shutil.copy(vgg_weights_file, served / name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{name}"
        monkeypatch.setattr(weights_module, "imagenet_weights_url", lambda: url)
        monkeypatch.delenv("UNET_RAY_NO_DOWNLOAD")
        recorded = record_encoder_weights(ModelConfig())
        cached = hub_weights_path()
        assert cached.name == name and cached.is_file()  # downloaded into $TORCH_HOME
        assert recorded.encoder_weights_file == name
        assert recorded.encoder_weights_sha256 == file_sha256(cached)[:12]
        model = build_model(recorded)  # now from the cache, checked against the recorded digest
        assert torch.equal(model.encoder[0].weight, vgg_state_dict["features.0.weight"])
        missing = f"http://127.0.0.1:{server.server_address[1]}/vgg16_bn-00000000.pth"
        monkeypatch.setattr(weights_module, "imagenet_weights_url", lambda: missing)
        with pytest.raises(EncoderWeightsUnavailableError, match="the download failed"):
            resolve_imagenet_weights()
    finally:
        server.shutdown()


def test_recorded_digest_mismatch_is_refused(no_hub_cache, vgg_weights_file):
    config = ModelConfig(encoder_weights=vgg_weights_file, encoder_weights_sha256="0" * 12)
    with pytest.raises(ValueError, match="SHA-256 prefix .* the file differs"):
        build_model(config)


def test_missing_encoder_weights_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pth does not exist.*imagenet, none"):
        build_model(ModelConfig(encoder_weights=str(tmp_path / "absent.pth")))


def test_parameter_groups_scale_the_encoder_and_spare_norms_and_biases_from_decay():
    model = UNetVGG16BN(decoder_batchnorm=True)
    groups = {group["name"]: group for group in parameter_groups(model, 1e-4, 0.1)}
    assert set(groups) == {"encoder", "encoder_no_decay", "decoder", "decoder_no_decay"}
    assert groups["encoder"]["lr_scale"] == groups["encoder_no_decay"]["lr_scale"] == 0.1
    assert groups["decoder"]["lr_scale"] == groups["decoder_no_decay"]["lr_scale"] == 1.0
    assert (
        groups["encoder"]["weight_decay"] == 1e-4
        and groups["decoder_no_decay"]["weight_decay"] == 0
    )
    in_groups = [id(p) for group in groups.values() for p in group["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in model.parameters())  # each exactly once
    no_decay = {
        id(p) for name in ("encoder_no_decay", "decoder_no_decay") for p in groups[name]["params"]
    }
    for name, parameter in model.named_parameters():
        assert (id(parameter) in no_decay) == (name.endswith(".bias") or parameter.ndim == 1), name
    freeze_encoder(model)
    names = {group["name"] for group in parameter_groups(model, 1e-4, 0.1)}
    assert names == {"decoder", "decoder_no_decay"}  # frozen parameters are left out


@pytest.mark.parametrize(
    ("enabled", "use_gpu", "workers", "expected"),
    [
        (True, True, 2, True),
        (True, True, 1, False),
        (True, False, 4, False),
        (False, True, 4, False),
    ],
)
def test_sync_batchnorm_only_with_several_gpu_workers(enabled, use_gpu, workers, expected):
    assert use_sync_batchnorm(enabled, use_gpu, workers) is expected


def test_build_model_uses_hub_cache_file(no_hub_cache, tmp_path, vgg_state_dict, caplog):
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(vgg_state_dict, checkpoints / "vgg16_bn-6c64b313.pth")
    assert find_hub_encoder_weights() == str(checkpoints / "vgg16_bn-6c64b313.pth")
    with caplog.at_level(logging.WARNING, logger="unet_ray.io.checkpoint"):
        model = build_model(ModelConfig(decoder_batchnorm=True))  # the default: imagenet
    assert torch.equal(model.encoder[0].weight, vgg_state_dict["features.0.weight"])
    assert count_batchnorm(model.decoder) == 10


def test_build_model_loads_given_file_and_freezes(no_hub_cache, vgg_weights_file, vgg_state_dict):
    model = build_model(ModelConfig(encoder_weights=vgg_weights_file, freeze_encoder=True))
    assert torch.equal(model.encoder[3].weight, vgg_state_dict["features.3.weight"])
    assert not any(p.requires_grad for p in encoder_parameters(model))
    assert all(p.requires_grad for p in decoder_parameters(model))


def test_frozen_encoder_stays_fixed_after_an_sgd_step():
    torch.manual_seed(0)
    model = UNetVGG16BN()
    freeze_encoder(model)
    model.train()
    assert not any(layer.training for layer in model.encoder.modules())
    assert model.decoder.training and model.centre.training
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_before = model.head.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    images, target = torch.rand(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.5).float()
    loss = nn.functional.binary_cross_entropy_with_logits(model(images), target)
    loss.backward()
    optimizer.step()
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key]), key  # weights and BN statistics
    assert not torch.equal(model.head.weight, head_before)


@pytest.mark.slow
def test_model_overfits_one_batch():
    """The U-Net with a random encoder can fit one 64x64 image of blobs (pixel F1 > 0.9)."""
    torch.manual_seed(0)
    rows, columns = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    mask = ((rows - 32) ** 2 + (columns - 24) ** 2 < 100) | (
        (rows - 16) ** 2 + (columns - 48) ** 2 < 49
    )
    target = mask.float()[None, None]
    images = (0.2 + 0.6 * target + 0.05 * torch.randn(1, 1, 64, 64)).repeat(1, 3, 1, 1)
    model = UNetVGG16BN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(20):
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(images), target)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = model.eval()(images) > 0
    true_positive = (predicted & (target > 0)).sum().item()
    f1 = 2 * true_positive / (predicted.sum().item() + target.sum().item())
    assert f1 > 0.9
