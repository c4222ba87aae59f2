"""Config dataclasses, YAML loading and CLI overrides."""

import pytest

from unet_ray.cli import build_parser, config_from_args, main
from unet_ray.config import Config, load_config, save_config


def test_defaults_follow_the_reference_report():
    config = load_config(None)
    assert config.train.scheduler == "warm-restart"
    assert config.train.max_lr == 0.4
    assert config.train.batch_size == 16
    assert config.train.momentum == 0.9
    assert config.data.tile_size == 256
    assert config.model.decoder_batchnorm is False


def test_yaml_round_trip(tmp_path):
    config = load_config(None)
    config.train.epochs = 3
    config.tune.batch_sizes = [2, 4]
    path = tmp_path / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ValueError, match="epocs"):
        load_config(path)


def test_unknown_section_is_named():
    with pytest.raises(ValueError, match="trian"):
        Config.from_dict({"trian": {}})


def test_image_size_must_be_multiple_of_32():
    with pytest.raises(ValueError, match="try 96"):
        Config.from_dict({"data": {"image_size": 100}})


def test_bad_scheduler_is_rejected():
    with pytest.raises(ValueError, match="scheduler 'linear'"):
        Config.from_dict({"train": {"scheduler": "linear"}})


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  epochs: 7\n  max_lr: 0.1\ndata:\n  image_size: 128\n")
    args = build_parser().parse_args(
        ["train", "--config", str(path), "--max-lr", "0.2", "--image-size", "64", "--gpu"]
    )
    config = config_from_args(args)
    assert config.train.epochs == 7  # from the file
    assert config.train.max_lr == 0.2  # the flag wins
    assert config.data.image_size == 64 and config.data.tile_size == 64
    assert config.train.use_gpu is True


def test_every_subcommand_has_help(capsys):
    for command in ("synth", "prepare", "train", "tune", "evaluate", "segment"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert command in capsys.readouterr().out


def test_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--scheduler", "linear"])
    assert exit_info.value.code == 2


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
