"""The ``unet-ray`` command: argparse subcommands that call the package's functions."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence

from unet_ray.core.config import (
    ENCODER_IMAGENET,
    ENCODER_NONE,
    EVALUATE_SPLITS,
    HEADS,
    LOSSES,
    SCHEDULERS,
    Config,
    InstanceConfig,
    load_config,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# ----------------------------------------------------------------------------- shared flags


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `unet-ray train`; also accepted by `tune` (fixed for every trial) and jobs/train.py.

    Every default is None so that only flags the user gave override the --config file.
    """
    parser.add_argument("--config", help="YAML config; flags given on the command line override it")
    parser.add_argument(
        "--data",
        help="DSB2018 layout (folder, .zip, s3://) or prepared shards; "
        "omitted: synthetic data generated into the output folder",
    )
    parser.add_argument(
        "--output",
        help="run folder, local or s3://bucket/prefix (default runs/train; tune: runs/tune)",
    )
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int, help="global batch size, split across workers")
    parser.add_argument("--max-lr", type=float, help="maximum learning rate of the schedule")
    parser.add_argument("--scheduler", choices=SCHEDULERS)
    parser.add_argument("--loss", choices=LOSSES)
    parser.add_argument(
        "--image-size",
        type=int,
        help="side of the training crops fed to the network, multiple of 32 (random crops of "
        "larger tiles)",
    )
    parser.add_argument(
        "--tile-size",
        type=int,
        help="tile side when raw data is prepared on the fly (default 256, at least --image-size)",
    )
    parser.add_argument("--val-fraction", type=float, help="fraction of images held out")
    parser.add_argument("--elastic-probability", type=float)
    parser.add_argument("--synth-count", type=int, help="synthetic images when --data is omitted")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--workers", type=int, help="Ray Train workers (DDP ranks)")
    parser.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker")
    parser.add_argument("--max-failures", type=int, help="worker failures survived by resuming")
    parser.add_argument(
        "--encoder-weights",
        metavar="imagenet|none|PATH",
        help="imagenet (default: torchvision's ImageNet weights from torch's hub cache, "
        "downloaded once), none (random encoder) or a torchvision vgg16_bn state-dict file",
    )
    parser.add_argument(
        "--encoder-lr-scale",
        type=float,
        help="learning rate of a pretrained encoder relative to the decoder's (default 0.1)",
    )
    parser.add_argument(
        "--warmup-epochs", type=float, help="linear learning-rate warm-up (default 1 epoch)"
    )
    parser.add_argument(
        "--min-steps-per-epoch",
        type=int,
        help="small sets: draw augmented tiles until an epoch has this many steps (default 100)",
    )
    parser.add_argument(
        "--no-sync-batchnorm",
        dest="sync_batchnorm",
        action="store_false",
        default=None,
        help="plain BatchNorm per GPU (default: SyncBatchNorm with more than one GPU worker)",
    )
    parser.add_argument("--freeze-encoder", action="store_true", default=None)
    parser.add_argument("--decoder-batchnorm", action="store_true", default=None)
    parser.add_argument(
        "--head",
        choices=HEADS,
        help="mask: one nucleus channel (the report's); mask+contour: nucleus and contour, to "
        "split touching nuclei (default: model.head of the config)",
    )
    parser.add_argument(
        "--contour-weight", type=float, help="mask+contour: weight of the contour loss (1.0)"
    )
    add_instance_arguments(parser)


def add_instance_arguments(parser: argparse.ArgumentParser) -> None:
    """Post-processing flags; each given one overrides the value saved in the checkpoint (train:
    the config's), which validation, `evaluate` and `segment` share."""
    group = parser.add_argument_group("instances (default: the checkpoint's values)")
    group.add_argument("--threshold", type=float, help="nucleus probability threshold (0.5)")
    group.add_argument(
        "--contour-threshold",
        type=float,
        help="mask+contour: nuclei part where the contour probability reaches this fraction of "
        "its peak in the image (0.5)",
    )
    group.add_argument(
        "--core-ratio",
        type=float,
        help="mask head: seeds where the distance to the background is at least this fraction "
        "of the largest one nearby (0.85)",
    )
    group.add_argument("--min-size", type=int, help="smallest nucleus kept, pixels (16)")
    group.add_argument("--min-seed-size", type=int, help="smallest seed counted, pixels (4)")
    group.add_argument(
        "--no-fill-holes",
        dest="fill_holes",
        action="store_false",
        default=None,
        help="keep background enclosed by one nucleus as background",
    )


INSTANCE_FLAGS = (
    "threshold",
    "contour_threshold",
    "core_ratio",
    "min_size",
    "min_seed_size",
    "fill_holes",
)  # attribute = InstanceConfig field


def instance_config_from_args(args: argparse.Namespace, base: InstanceConfig) -> InstanceConfig:
    """``base`` (the checkpoint's instance settings) with the flags the user gave applied."""
    given = {
        name: getattr(args, name)
        for name in INSTANCE_FLAGS
        if getattr(args, name, None) is not None
    }
    values = {**dataclasses.asdict(base), **given}
    return Config.from_dict({"instances": values}).instances


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `unet-ray tune` beyond the train flags (which stay fixed for every trial)."""
    parser.add_argument("--num-samples", type=int, help="number of trials")
    parser.add_argument("--max-epochs", type=int, help="epochs of the longest trial")
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: what fits)")


# (flag attribute, config section, config field)
_TRAIN_OVERRIDES = (
    ("data", "data", "source"),
    ("output", "train", "output"),
    ("epochs", "train", "epochs"),
    ("batch_size", "train", "batch_size"),
    ("max_lr", "train", "max_lr"),
    ("scheduler", "train", "scheduler"),
    ("loss", "train", "loss"),
    ("image_size", "data", "image_size"),
    ("tile_size", "data", "tile_size"),
    ("val_fraction", "data", "val_fraction"),
    ("elastic_probability", "data", "elastic_probability"),
    ("synth_count", "data", "synth_count"),
    ("seed", "data", "seed"),
    ("workers", "train", "workers"),
    ("gpu", "train", "use_gpu"),
    ("max_failures", "train", "max_failures"),
    ("encoder_weights", "model", "encoder_weights"),
    ("encoder_lr_scale", "train", "encoder_lr_scale"),
    ("warmup_epochs", "train", "warmup_epochs"),
    ("min_steps_per_epoch", "train", "min_steps_per_epoch"),
    ("sync_batchnorm", "train", "sync_batchnorm"),
    ("freeze_encoder", "model", "freeze_encoder"),
    ("decoder_batchnorm", "model", "decoder_batchnorm"),
    ("head", "model", "head"),
    ("contour_weight", "train", "contour_weight"),
    *((name, "instances", name) for name in INSTANCE_FLAGS),
)


def apply_smoke_test_defaults(args: argparse.Namespace, defaults: dict, prefix: str) -> None:
    """For `jobs/*.py --smoke-test`: tiny values for every flag the user left unset, and a fresh
    temporary output folder unless --output was given."""
    import tempfile

    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.output is None:
        args.output = tempfile.mkdtemp(prefix=prefix)


def config_from_args(args: argparse.Namespace) -> Config:
    """The --config file (or defaults) with every flag the user gave applied on top, validated.

    Local paths are made absolute against the user's working directory here, before any Ray
    worker (which runs in a directory of Ray's) sees them. Tiles are at least as large as the
    training crops (``--image-size 320`` alone prepares raw data in 320-px tiles)."""
    values = load_config(absolute_path(getattr(args, "config", None))).to_dict()
    for attribute, section, field_name in _TRAIN_OVERRIDES:
        value = getattr(args, attribute, None)
        if value is not None:
            values[section][field_name] = value
    data = values["data"]
    if getattr(args, "tile_size", None) is None:
        data["tile_size"] = max(data["tile_size"], data["image_size"])
    data["source"] = absolute_path(data["source"])
    values["train"]["output"] = absolute_path(values["train"]["output"])
    if values["model"]["encoder_weights"] not in (ENCODER_IMAGENET, ENCODER_NONE):
        values["model"]["encoder_weights"] = absolute_path(values["model"]["encoder_weights"])
    return Config.from_dict(values)


def absolute_path(uri: str | None) -> str | None:
    """A local path made absolute (``~`` expanded); s3:// URIs and None unchanged."""
    if uri is None or str(uri).startswith("s3://"):
        return uri
    return os.path.abspath(os.path.expanduser(str(uri)))


# ----------------------------------------------------------------------------- subcommands


def command_synth(args: argparse.Namespace) -> int:
    from unet_ray.io.synth import write_synthetic_dataset

    ids = write_synthetic_dataset(
        args.out, count=args.count, seed=args.seed, min_side=args.min_side, max_side=args.max_side
    )
    print(f"wrote {len(ids)} synthetic DSB2018-layout samples to {args.out}")
    return EXIT_OK


def command_prepare(args: argparse.Namespace) -> int:
    from unet_ray.data import prepare_dataset

    _init_ray()
    info = prepare_dataset(
        absolute_path(args.src), absolute_path(args.out), args.tile, args.val_fraction, args.seed
    )
    print(
        f"prepared {info['train']['tiles']} training and {info['val']['tiles']} validation "
        f"tiles of {info['tile_size']} px in {args.out}"
    )
    return EXIT_OK


def command_train(args: argparse.Namespace) -> int:
    from unet_ray.train import run_training

    config = config_from_args(args)
    result = run_training(config)
    print(json.dumps({"best_checkpoint": result.best_checkpoint, **result.metrics}, indent=2))
    print(f"outputs in {result.output}: metrics.csv, curves.png, tensorboard/, best/")
    return EXIT_OK


def command_tune(args: argparse.Namespace) -> int:
    from unet_ray.tune import run_tuning, tune_config_from_args

    config = tune_config_from_args(args, config_from_args(args))
    summary = run_tuning(config)
    print(summary.table)
    print(f"outputs in {summary.output}: trials.csv, trials.png, best.yaml, best/")
    return EXIT_OK


def command_evaluate(args: argparse.Namespace) -> int:
    from unet_ray.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(
        absolute_path(args.checkpoint),
        absolute_path(args.data),
        split=args.split,
        overrides=lambda saved: instance_config_from_args(args, saved),
    )
    print(json.dumps(metrics, indent=2))
    return EXIT_OK


def command_segment(args: argparse.Namespace) -> int:
    from unet_ray.segment import segment_main

    return segment_main(args)


def _init_ray() -> None:
    from unet_ray.runtime.cluster import init_ray

    init_ray()


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unet-ray",
        description="Train, tune and run a VGG16_bn U-Net for nucleus segmentation on Ray.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, with Ray's progress bars and INFO lines",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    synth = commands.add_parser("synth", help="write a synthetic DSB2018-layout dataset")
    synth.add_argument("out", metavar="OUT")
    synth.add_argument("--count", type=int, default=24)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--min-side", type=int, default=64)
    synth.add_argument("--max-side", type=int, default=320)
    synth.set_defaults(handler=command_synth)

    prepare = commands.add_parser(
        "prepare", help="DSB2018 layout (dir, .zip, s3://) -> Parquet shards"
    )
    prepare.add_argument("src", metavar="SRC")
    prepare.add_argument("out", metavar="OUT")
    prepare.add_argument("--tile", type=int, default=256, help="tile side (report: 256)")
    prepare.add_argument("--val-fraction", type=float, default=0.15)
    prepare.add_argument("--seed", type=int, default=0)
    prepare.set_defaults(handler=command_prepare)

    train = commands.add_parser("train", help="train the U-Net on Ray Train (resumes a rerun)")
    add_train_arguments(train)
    train.set_defaults(handler=command_train)

    tune = commands.add_parser("tune", help="search scheduler, max lr and batch size on Ray Tune")
    add_train_arguments(tune)
    add_tune_arguments(tune)
    tune.set_defaults(handler=command_tune)

    evaluate = commands.add_parser("evaluate", help="print a JSON object of metrics")
    evaluate.add_argument("checkpoint", metavar="CHECKPOINT")
    evaluate.add_argument("data", metavar="DATA", help="DSB2018 layout or prepared shards")
    evaluate.add_argument(
        "--split",
        default="val",
        choices=EVALUATE_SPLITS,
        help="images to score: val (default: the checkpoint's validation images), train, or "
        "all images of a raw DSB2018 layout",
    )
    add_instance_arguments(evaluate)
    evaluate.set_defaults(handler=command_evaluate)

    segment = commands.add_parser("segment", help="segment an image collection on Ray Data")
    _add_segment_arguments(segment)
    segment.set_defaults(handler=command_segment)
    return parser


def _add_segment_arguments(parser: argparse.ArgumentParser) -> None:
    from unet_ray.segment import add_segment_arguments

    add_segment_arguments(parser)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ["UNET_RAY_VERBOSE"] = "1"  # read by unet_ray.train.init_ray
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"unet-ray {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
