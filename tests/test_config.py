"""Config dataclasses, YAML loading and CLI overrides."""

import json

import pytest

from unet_ray.cli import build_parser, config_from_args, main
from unet_ray.core.config import Config, load_config, save_config


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
    # tiles keep their default size: larger than the crops, so training gets random crops
    assert config.data.image_size == 64 and config.data.tile_size == 256
    assert config.train.use_gpu is True


def test_tile_size_is_at_least_the_image_size():
    args = build_parser().parse_args(["train", "--image-size", "320"])
    assert config_from_args(args).data.tile_size == 320
    args = build_parser().parse_args(["train", "--image-size", "64", "--tile-size", "128"])
    assert config_from_args(args).data.tile_size == 128


def test_relative_paths_are_resolved_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.pth").write_bytes(b"")
    args = build_parser().parse_args(
        ["train", "--data", "data", "--output", "run", "--encoder-weights", "weights.pth"]
    )
    config = config_from_args(args)
    assert config.data.source == str(tmp_path / "data")
    assert config.train.output == str(tmp_path / "run")
    assert config.model.encoder_weights == str(tmp_path / "weights.pth")
    args = build_parser().parse_args(["train", "--output", "s3://bucket/run"])
    config = config_from_args(args)
    assert config.train.output == "s3://bucket/run"  # URIs stay as given
    assert config.model.encoder_weights == "imagenet"  # the default, not a path


def test_a_search_without_output_writes_to_runs_tune_in_the_working_directory(
    tmp_path, monkeypatch
):
    """Every trial of a search runs in a folder of Ray Tune's own, so the default output must be
    absolute before the search starts (a relative one made every trial fail)."""
    from unet_ray.cli import tune_config_from_args

    monkeypatch.chdir(tmp_path)

    def tune_output(*flags: str) -> str:
        args = build_parser().parse_args(["tune", *flags])
        return tune_config_from_args(args, config_from_args(args)).train.output

    assert tune_output() == str(tmp_path / "runs" / "tune")
    (tmp_path / "plain.yaml").write_text("train:\n  epochs: 3\n")
    assert tune_output("--config", "plain.yaml") == str(tmp_path / "runs" / "tune")
    (tmp_path / "named.yaml").write_text("train:\n  output: searches/a\n")
    assert tune_output("--config", "named.yaml") == str(tmp_path / "searches" / "a")
    assert tune_output("--config", "named.yaml", "--output", "b") == str(tmp_path / "b")


@pytest.mark.parametrize(
    ("batch", "workers", "suggestion"), [(10, 4, "8 or 12"), (3, 2, "2 or 4"), (2, 3, "3")]
)
def test_batch_not_divisible_by_workers_names_valid_sizes(batch, workers, suggestion):
    with pytest.raises(ValueError, match=f"batch_size={batch}.*not divisible.*use {suggestion}$"):
        Config.from_dict({"train": {"batch_size": batch, "workers": workers}})


def test_batch_not_divisible_is_exit_2_on_the_command_line(capsys):
    assert main(["train", "--batch-size", "10", "--workers", "4"]) == 2
    assert "use 8 or 12" in capsys.readouterr().err


def test_default_encoder_is_imagenet():
    assert Config.from_dict({}).model.encoder_weights == "imagenet"


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


def test_train_output_that_cannot_be_written_is_exit_2_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    output = blocker / "run"
    assert main(["train", "--output", str(output), "--encoder-weights", "none"]) == 2
    err = capsys.readouterr().err
    assert str(output) in err and "cannot write output there" in err


def test_heads_and_instance_settings_are_validated_and_old_keys_are_read():
    with pytest.raises(
        ValueError, match=r"model.head 'contour' is not one of \('mask', 'mask\+contour'\)"
    ):
        Config.from_dict({"model": {"head": "contour"}})
    with pytest.raises(ValueError, match="instances.threshold must be in"):
        Config.from_dict({"instances": {"threshold": 1.5}})
    with pytest.raises(ValueError, match="train.contour_weight=-1"):
        Config.from_dict({"train": {"contour_weight": -1}})
    # checkpoints saved before issue 13 carry instances.min_distance: read, and dropped
    old = Config.from_dict({"instances": {"threshold": 0.4, "min_distance": 4}})
    assert old.instances.threshold == 0.4 and not hasattr(old.instances, "min_distance")
    with pytest.raises(ValueError, match="unknown key"):
        Config.from_dict({"instances": {"min_distanse": 4}})


def test_train_flags_set_the_head_and_the_instance_settings(tmp_path):
    from unet_ray.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        ["train", "--head", "mask+contour", "--contour-weight", "2", "--threshold", "0.6",
         "--no-fill-holes", "--output", str(tmp_path)]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.model.head == "mask+contour" and config.train.contour_weight == 2.0
    assert config.instances.threshold == 0.6 and config.instances.fill_holes is False
    assert config.instances.min_size == 16  # flags not given keep the config's values


def test_data_mpp_is_a_config_field_and_must_be_positive(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("data:\n  mpp: 0.5\n")
    assert load_config(path).data.mpp == 0.5  # the YAML the README shows is accepted
    assert Config.from_dict({}).data.mpp is None  # not recorded unless given
    for bad in (0, -0.25, "half"):
        with pytest.raises(ValueError, match="data.mpp"):
            Config.from_dict({"data": {"mpp": bad}})


def test_train_takes_the_pixel_size_prepare_recorded_unless_mpp_is_given(tmp_path):
    """`prepare --mpp` writes it into dataset.json; `train --data SHARDS` records it in the
    checkpoint's config; `train --mpp` wins over it."""
    from unet_ray.io.prepared import (
        DATASET_FORMAT,
        DATASET_INFO_FILE,
        dataset_mpp,
        record_dataset_mpp,
    )

    shards = tmp_path / "prepared"
    shards.mkdir()
    (shards / DATASET_INFO_FILE).write_text(json.dumps({"format": DATASET_FORMAT}))
    assert dataset_mpp(str(shards)) is None
    record_dataset_mpp(str(shards), 0.325)
    assert json.loads((shards / DATASET_INFO_FILE).read_text())["mpp"] == 0.325
    assert dataset_mpp(str(shards)) == 0.325
    parse = build_parser().parse_args
    assert config_from_args(parse(["train", "--data", str(shards)])).data.mpp == 0.325
    flags = ["train", "--data", str(shards), "--mpp", "0.5"]
    assert config_from_args(parse(flags)).data.mpp == 0.5
    assert config_from_args(parse(["train"])).data.mpp is None  # synthetic data: not recorded
