"""The ``unet-ray`` command: every flag, its translation into configs, and every subcommand.

Layer 6, on top of the package and imported by nothing in it (``jobs/*.py`` and the console
script import it). Each subcommand imports its pipeline when it runs, so ``unet-ray --help`` and a
bad flag answer without loading torch or Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import yaml

from unet_ray.cli_args import (
    THRESHOLDS_SUFFIX,
    HelpFormatter,
    add_export_parser,
    add_thresholds_parser,
    add_tta_argument,
    add_verbose_argument,
    add_version_argument,
    apply_verbose,
    check_inputs,
    config_overrides,
    human_lines_to_stderr,
    show_config_defaults,
)
from unet_ray.core.config import (
    BEST_METRICS,
    DEFAULT_HALO,
    DEFAULT_REGION,
    ENCODER_IMAGENET,
    ENCODER_NONE,
    EVALUATE_SPLITS,
    HEADS,
    LABEL_TILE,
    LOSSES,
    SCHEDULERS,
    Config,
    InstanceConfig,
    SegmentConfig,
    SlideConfig,
    load_config,
    read_config_overrides,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# ----------------------------------------------------------------------------- shared flags


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `unet-ray train`; also accepted by `tune` (fixed for every trial) and jobs/train.py.

    Every default is None so that only flags the user gave override the --config file.
    """
    parser.add_argument(
        "--config",
        help="YAML config; flags given on the command line override it (default: none)",
    )
    parser.add_argument(
        "--data",
        help="DSB2018 layout (folder, .zip, s3://) or prepared shards; "
        "omitted: synthetic data generated into the output folder",
    )
    parser.add_argument(
        "--output",
        help="run folder, local or s3://bucket/prefix (default runs/train; tune: runs/tune)",
    )
    parser.add_argument("--epochs", type=int, help="training epochs")
    parser.add_argument("--batch-size", type=int, help="global batch size, split across workers")
    parser.add_argument("--max-lr", type=float, help="maximum learning rate of the schedule")
    parser.add_argument("--scheduler", choices=SCHEDULERS, help="learning-rate schedule")
    parser.add_argument("--loss", choices=LOSSES, help="training loss")
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
    parser.add_argument(
        "--elastic-probability", type=float, help="fraction of tiles elastically deformed"
    )
    parser.add_argument("--synth-count", type=int, help="synthetic images when --data is omitted")
    parser.add_argument("--seed", type=int, help="split and synthetic-data seed")
    parser.add_argument(
        "--mpp",
        type=float,
        help="microns per pixel of the training images, recorded in the checkpoint so that "
        "`segment` rescales to it (default: what `prepare --mpp` recorded in prepared shards, "
        "else none)",
    )
    parser.add_argument("--workers", type=int, help="Ray Train workers (DDP ranks)")
    parser.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker")
    parser.add_argument("--max-failures", type=int, help="worker failures survived by resuming")
    add_model_arguments(parser)
    add_selection_arguments(parser)
    add_instance_arguments(parser)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The network, its encoder weights and how its layers learn (train, tune, jobs)."""
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
    parser.add_argument(
        "--freeze-encoder", action="store_true", default=None, help="keep the encoder fixed"
    )
    parser.add_argument(
        "--decoder-batchnorm",
        action="store_true",
        default=None,
        help="batch-norm in the decoder (the report found it lowers contrast at borders)",
    )
    parser.add_argument(
        "--head",
        choices=HEADS,
        help="mask: one nucleus channel (the report's); mask+contour: nucleus and contour, to "
        "split touching nuclei (default: model.head of the config)",
    )
    parser.add_argument(
        "--contour-weight", type=float, help="mask+contour: weight of the contour loss"
    )


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """How a run picks its best checkpoint and its instance settings."""
    parser.add_argument(
        "--no-instance-search",
        dest="search_instances",
        action="store_false",
        default=None,
        help="skip the search of the instance settings on the validation images after training "
        "(default: search them and store them in OUTPUT/best)",
    )
    parser.add_argument(
        "--best-metric",
        choices=BEST_METRICS,
        help="validation metric that picks OUTPUT/best and ranks Tune's trials (default "
        "dsb_score: the DSB2018 score, mean over IoU 0.5-0.95; f1_50: instance F1 at IoU 0.5)",
    )


def add_instance_arguments(parser: argparse.ArgumentParser) -> None:
    """Post-processing flags; each given one overrides the value saved in the checkpoint (train:
    the config's), which validation, `evaluate` and `segment` share."""
    group = parser.add_argument_group("instances (default: the checkpoint's values)")
    group.add_argument(
        "--threshold", type=float, help="nucleus probability threshold (a new model's default: 0.5)"
    )
    group.add_argument(
        "--contour-threshold",
        type=float,
        help="mask+contour: nuclei part where the contour probability reaches this fraction of "
        "its peak in the image (a new model's default: 0.5)",
    )
    group.add_argument(
        "--core-ratio",
        type=float,
        help="mask head: seeds where the distance to the background is at least this fraction "
        "of the largest one nearby (a new model's default: 0.85)",
    )
    group.add_argument(
        "--min-size", type=int, help="smallest nucleus kept, pixels (a new model's default: 16)"
    )
    group.add_argument(
        "--min-seed-size", type=int, help="smallest seed counted, pixels (a new model's default: 4)"
    )
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
    """``base`` (the checkpoint's instance settings), then the ``instances:`` keys of a
    ``--config`` file (segment, evaluate), then the flags the user gave."""
    given = read_config_overrides(getattr(args, "config", None), ("instances",))
    flags = {name: getattr(args, name, None) for name in INSTANCE_FLAGS}
    values = config_overrides(given, dataclasses.asdict(base), flags, "instances")
    return Config.from_dict({"instances": values}).instances


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `unet-ray tune` beyond the train flags (which stay fixed for every trial)."""
    parser.add_argument("--num-samples", type=int, help="number of trials")
    parser.add_argument("--max-epochs", type=int, help="epochs of the longest trial")
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: what fits)")
    parser.add_argument(
        "--gpus-per-trial",
        type=float,
        help="with --gpu: GPUs one trial's workers share, e.g. 0.25 runs four one-worker trials "
        "per GPU (default: one per worker)",
    )


TUNE_FLAGS = (("num_samples", "tune", "num_samples"), ("max_epochs", "tune", "max_epochs"))


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
    ("mpp", "data", "mpp"),
    ("workers", "train", "workers"),
    ("gpu", "train", "use_gpu"),
    ("max_failures", "train", "max_failures"),
    ("best_metric", "train", "best_metric"),
    ("search_instances", "train", "search_instances"),
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
    source = data["source"]
    if data["mpp"] is None and source and (source.startswith("s3://") or os.path.isdir(source)):
        from unet_ray.io.prepared import dataset_mpp

        data["mpp"] = dataset_mpp(data["source"])  # `prepare --mpp` recorded it
    return Config.from_dict(values)


def check_train_inputs(config: Config) -> None:
    """A --data or --encoder-weights path that does not exist: InputError (exit 2) before Ray."""
    weights = config.model.encoder_weights
    check_inputs(
        data=config.data.source,
        encoder_weights_file=None if weights in (ENCODER_IMAGENET, ENCODER_NONE) else weights,
    )


def absolute_path(uri: str | None) -> str | None:
    """A local path made absolute (``~`` expanded); s3:// URIs and None unchanged."""
    if uri is None or str(uri).startswith("s3://"):
        return uri
    return os.path.abspath(os.path.expanduser(str(uri)))


DEFAULT_OUTPUT = "runs/tune"  # relative to the user's working directory


def config_file_sets_output(args: argparse.Namespace) -> bool:
    """Whether the --config file names ``train.output`` (then a search writes there; otherwise
    into ``runs/tune``, never into a training run's default ``runs/train``)."""
    path = getattr(args, "config", None)
    if path is None:
        return False
    with open(os.path.expanduser(path)) as handle:
        values = yaml.safe_load(handle) or {}
    return bool((values.get("train") or {}).get("output"))


def tune_config_from_args(args: argparse.Namespace, config: Config) -> Config:
    """Apply `unet-ray tune`'s own flags; the train flags were applied by ``config_from_args``."""
    values = config.to_dict()
    if getattr(args, "output", None) is None and not config_file_sets_output(args):
        # absolute now: every trial runs in a folder of Tune's own (Ray chdirs into it)
        values["train"]["output"] = os.path.abspath(DEFAULT_OUTPUT)
    for attribute, field_name in (
        ("num_samples", "num_samples"),
        ("max_epochs", "max_epochs"),
        ("max_concurrent", "max_concurrent"),
        ("gpus_per_trial", "gpus_per_trial"),
    ):
        if getattr(args, attribute, None) is not None:
            values["tune"][field_name] = getattr(args, attribute)
    return Config.from_dict(values)


# (flag attribute, SegmentConfig field): None unless given, so that --config can set them
SEGMENT_FLAGS = (
    ("tile", "tile"),
    ("overlap", "overlap"),
    ("scheme", "scheme"),
    ("batch_size", "batch_size"),
    ("workers", "workers"),
    ("gpu", "use_gpu"),
    ("actors_per_gpu", "actors_per_gpu"),
    ("overwrite", "overwrite"),
    ("mpp", "image_mpp"),
)


def add_segment_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``unet-ray segment`` and ``jobs/segment.py``."""
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint folder (local, s3://)")
    parser.add_argument("input", metavar="INPUT", help="image folder, s3:// prefix or one image")
    parser.add_argument("output", metavar="OUTPUT", help="output folder or s3:// prefix")
    parser.add_argument(
        "--config",
        help="YAML config whose segment: and instances: sections override the checkpoint's "
        "values (flags override both; default: none)",
    )
    parser.add_argument("--tile", type=int, help="network input side, multiple of 32")
    parser.add_argument(
        "--overlap", type=int, help="context margin kept around each tile's core (pixels per side)"
    )
    parser.add_argument(
        "--scheme",
        choices=("default", "reference"),
        help="reference: the report's 128-px cores reflect-padded to 256 (ignores --tile/--overlap)",
    )
    parser.add_argument("--batch-size", type=int, help="tiles per inference batch")
    parser.add_argument("--workers", type=int, help="inference actors (one model each)")
    parser.add_argument(
        "--gpu",
        action="store_true",
        default=None,
        help="one GPU per actor (strict: no CUDA where it runs is an error, never the CPU)",
    )
    parser.add_argument(
        "--actors-per-gpu",
        type=int,
        help="with --gpu: inference actors sharing each GPU, each holding 1/N of it (default 1)",
    )
    parser.add_argument(
        "--cpus-per-worker", type=int, help="CPUs per actor (default: a fair share of the cluster)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="redo images whose outputs are complete",
    )
    add_tta_argument(parser)
    add_instance_arguments(parser)
    add_slide_arguments(parser)
    show_config_defaults(parser, [(flag, "segment", name) for flag, name in SEGMENT_FLAGS])


def configs_from_args(
    args: argparse.Namespace, saved: Config
) -> tuple[SegmentConfig, InstanceConfig]:
    """Validated segment config: the defaults (TTA: the checkpoint's), then the ``segment:``
    keys of a ``--config`` file, then the flags given; and the instance config: the
    checkpoint's (``saved``), the file's ``instances:`` keys, then the instance flags given."""
    given = read_config_overrides(getattr(args, "config", None), ("segment",))
    flags = {name: getattr(args, flag, None) for flag, name in SEGMENT_FLAGS}
    flags["tta"] = args.tta
    base = {**dataclasses.asdict(SegmentConfig()), "tta": saved.segment.tta}
    config = Config.from_dict({"segment": config_overrides(given, base, flags, "segment")})
    return config.segment, instance_config_from_args(args, saved.instances)


def add_slide_arguments(parser: argparse.ArgumentParser) -> None:
    """The whole-slide flags of ``unet-ray segment`` and ``jobs/segment.py``."""
    parser.add_argument(
        "--mpp",
        type=float,
        help="slides: microns per pixel to segment at (default: each slide's own); whole "
        "images: their microns per pixel (default: a TIFF's resolution tags), rescaled to the "
        "model's (the checkpoint's data.mpp) and the outputs mapped back",
    )
    parser.add_argument(
        "--region",
        type=int,
        default=DEFAULT_REGION,
        help=f"slide region side in pixels, a multiple of {LABEL_TILE}; TIFFs larger than one "
        "region are read by window as slides (default: %(default)s)",
    )
    parser.add_argument(
        "--halo",
        type=int,
        default=DEFAULT_HALO,
        help="context read around each slide region; nuclei up to halo - overlap px stay whole "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--no-tissue-mask",
        dest="tissue_mask",
        action="store_false",
        help="segment every slide region, also background",
    )


def slide_config_from_args(args: argparse.Namespace) -> SlideConfig:
    return SlideConfig(
        region=getattr(args, "region", DEFAULT_REGION),
        halo=getattr(args, "halo", DEFAULT_HALO),
        mpp=getattr(args, "mpp", None),
        tissue_mask=getattr(args, "tissue_mask", True),
    )


# ----------------------------------------------------------------------------- subcommands


def command_synth(args: argparse.Namespace) -> int:
    from unet_ray.io.synth import write_synthetic_dataset

    ids = write_synthetic_dataset(
        args.out, count=args.count, seed=args.seed, min_side=args.min_side, max_side=args.max_side
    )
    print(f"wrote {len(ids)} synthetic DSB2018-layout samples to {args.out}")
    return EXIT_OK


def command_prepare(args: argparse.Namespace) -> int:
    check_inputs(source=args.src)  # inputs first: a typo costs neither imports nor Ray
    if args.mpp is not None and args.mpp <= 0:
        raise ValueError(f"--mpp {args.mpp} must be positive (microns per pixel)")
    from unet_ray.io.prepared import record_dataset_mpp
    from unet_ray.pipelines.data import prepare_dataset
    from unet_ray.runtime.cluster import init_ray

    init_ray()
    info = prepare_dataset(
        absolute_path(args.src), absolute_path(args.out), args.tile, args.val_fraction, args.seed
    )
    if args.mpp is not None:
        record_dataset_mpp(absolute_path(args.out), args.mpp)
    print(
        f"prepared {info['train']['tiles']} training and {info['val']['tiles']} validation "
        f"tiles of {info['tile_size']} px in {args.out}"
    )
    return EXIT_OK


def command_train(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_train_inputs(config)
    from unet_ray.pipelines.train import run_training

    with human_lines_to_stderr():
        result = run_training(config)
    summary = {"best_checkpoint": result.best_checkpoint, **result.metrics}
    if result.threshold_search:
        summary["threshold_search"] = result.threshold_search
    print(json.dumps(summary, indent=2))  # stdout holds only this JSON object
    print(
        f"outputs in {result.output}: metrics.csv, curves.png, tensorboard/, best/", file=sys.stderr
    )
    return EXIT_OK


def command_tune(args: argparse.Namespace) -> int:
    config = tune_config_from_args(args, config_from_args(args))
    check_train_inputs(config)
    from unet_ray.pipelines.tune import run_tuning

    summary = run_tuning(config)
    print(summary.table)
    print(f"outputs in {summary.output}: trials.csv, trials.png, best.yaml, best/")
    return EXIT_OK


def command_evaluate(args: argparse.Namespace) -> int:
    check_inputs(checkpoint=args.checkpoint, data=args.data)
    from unet_ray.inference import select_device
    from unet_ray.pipelines.evaluate import evaluate_checkpoint

    tta = read_config_overrides(args.config, ("segment",))["segment"].get("tta")
    with human_lines_to_stderr():
        metrics = evaluate_checkpoint(
            absolute_path(args.checkpoint),
            absolute_path(args.data),
            split=args.split,
            overrides=lambda saved: instance_config_from_args(args, saved),
            tta=tta if args.tta is None else args.tta,
            device=select_device(bool(getattr(args, "gpu", False))),
        )
    print(json.dumps(metrics, indent=2))
    return EXIT_OK


def command_thresholds(args: argparse.Namespace) -> int:
    check_inputs(checkpoint=args.checkpoint, data=args.data)
    from unet_ray.inference import select_device
    from unet_ray.io.prepared import is_prepared
    from unet_ray.pipelines.thresholds import describe_search, search_checkpoint

    checkpoint, data = absolute_path(args.checkpoint), absolute_path(args.data)
    output = absolute_path(args.output) or checkpoint.rstrip("/") + THRESHOLDS_SUFFIX
    if output.rstrip("/") == checkpoint.rstrip("/"):
        raise ValueError(f"--output {output} is the checkpoint itself: name a new folder")
    split = args.split or ("val" if is_prepared(data) else "all")
    with human_lines_to_stderr():
        record = search_checkpoint(
            checkpoint,
            data,
            output=output,
            split=split,
            device=select_device(bool(args.gpu)),
            tta=args.tta,
            metric=args.metric,
        )
    print(json.dumps({"checkpoint": output, **record}, indent=2))
    print(describe_search(record), file=sys.stderr)
    return EXIT_OK


def command_segment(args: argparse.Namespace) -> int:
    return segment_main(args)


def segment_main(args: argparse.Namespace) -> int:
    """Run ``unet-ray segment`` from parsed flags (starting local Ray if none); exit code.

    Bad flags and an OUTPUT that cannot be written raise ValueError before Ray starts.
    """
    check_inputs(checkpoint=args.checkpoint, input=args.input)  # before any import or Ray
    from unet_ray import io
    from unet_ray.io.checkpoint import read_checkpoint_info
    from unet_ray.pipelines.segment import run_segmentation
    from unet_ray.runtime.cluster import init_ray

    # Ray's actors run in another working directory: local paths are the user's, made absolute
    for name in ("checkpoint", "input", "output"):
        setattr(args, name, absolute_path(getattr(args, name)))
    saved = Config.from_dict(read_checkpoint_info(args.checkpoint).get("config", {}))
    segment, instances = configs_from_args(args, saved)
    print(
        "instances: "
        + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(instances).items())
        + f"; tta={segment.tta}"
    )
    io.check_writable(args.output)
    init_ray()
    summary = run_segmentation(
        args.checkpoint,
        args.input,
        args.output,
        segment,
        instances,
        cpus_per_worker=getattr(args, "cpus_per_worker", None),
        slide=slide_config_from_args(args),
    )
    print(
        f"{summary.ok} ok, {summary.error} error, {summary.skipped} skipped; "
        f"manifest: {summary.manifest}"
    )
    return summary.exit_code


# ----------------------------------------------------------------------------- parser


def command_export(args: argparse.Namespace) -> int:
    check_inputs(checkpoint=args.checkpoint)
    from unet_ray.pipelines.export import export_checkpoint

    with human_lines_to_stderr():
        record = export_checkpoint(
            absolute_path(args.checkpoint), absolute_path(args.out), args.format
        )
    print(json.dumps(record, indent=2))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unet-ray",
        description="Train, tune and run a VGG16_bn U-Net for nucleus segmentation on Ray.",
        formatter_class=HelpFormatter,
    )
    add_verbose_argument(parser)
    add_version_argument(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    synth = commands.add_parser("synth", help="write a synthetic DSB2018-layout dataset")
    synth.add_argument("out", metavar="OUT", help="folder to write (DSB2018 layout)")
    synth.add_argument("--count", type=int, default=24, help="images")
    synth.add_argument("--seed", type=int, default=0, help="random seed")
    synth.add_argument("--min-side", type=int, default=64, help="smallest image side, pixels")
    synth.add_argument("--max-side", type=int, default=320, help="largest image side, pixels")
    synth.set_defaults(handler=command_synth)

    prepare = commands.add_parser(
        "prepare", help="DSB2018 layout (dir, .zip, s3://) -> Parquet shards"
    )
    prepare.add_argument("src", metavar="SRC", help="DSB2018 layout: folder, .zip or s3://")
    prepare.add_argument("out", metavar="OUT", help="output folder or s3:// prefix")
    prepare.add_argument("--tile", type=int, default=256, help="tile side (report: 256)")
    prepare.add_argument(
        "--val-fraction", type=float, default=0.15, help="fraction of images held out"
    )
    prepare.add_argument("--seed", type=int, default=0, help="split seed")
    prepare.add_argument(
        "--mpp",
        type=float,
        help="microns per pixel of the images, recorded in dataset.json; training on the "
        "shards records it in the checkpoint (default: none)",
    )
    prepare.set_defaults(handler=command_prepare)

    train = commands.add_parser("train", help="train the U-Net on Ray Train (resumes a rerun)")
    add_train_arguments(train)
    show_config_defaults(train, _TRAIN_OVERRIDES)
    train.set_defaults(handler=command_train)

    tune = commands.add_parser("tune", help="search scheduler, max lr and batch size on Ray Tune")
    add_train_arguments(tune)
    add_tune_arguments(tune)
    show_config_defaults(tune, [*_TRAIN_OVERRIDES, *TUNE_FLAGS])
    tune.set_defaults(handler=command_tune)

    evaluate = commands.add_parser("evaluate", help="print a JSON object of metrics")
    evaluate.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint folder")
    evaluate.add_argument("data", metavar="DATA", help="DSB2018 layout or prepared shards")
    evaluate.add_argument(
        "--config",
        help="YAML config whose instances: section (and segment.tta) override the "
        "checkpoint's values (flags override both; default: none)",
    )
    evaluate.add_argument(
        "--split",
        default="val",
        choices=EVALUATE_SPLITS,
        help="images to score: val (default: the checkpoint's validation images), train, or "
        "all images of a raw DSB2018 layout",
    )
    evaluate.add_argument(
        "--gpu", action="store_true", help="predict on the GPU (strict: no CUDA is exit 2)"
    )
    add_tta_argument(evaluate)
    add_instance_arguments(evaluate)
    evaluate.set_defaults(handler=command_evaluate)

    add_thresholds_parser(commands, command_thresholds)

    segment = commands.add_parser("segment", help="segment an image collection on Ray Data")
    add_segment_arguments(segment)
    segment.set_defaults(handler=command_segment)
    add_export_parser(commands, command_export)
    for subcommand in commands.choices.values():
        subcommand.formatter_class = HelpFormatter
        add_verbose_argument(subcommand, top_level=False)  # -v also after the subcommand
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_verbose(args.verbose)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"unet-ray {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
