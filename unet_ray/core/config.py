"""Typed configuration for every stage (model, data, train, tune, segment). No torch, no Ray.

One config flows one way: YAML file -> dataclasses -> CLI flags override -> ``asdict`` is passed to
Ray workers, rebuilt there with ``from_dict`` and saved beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCHEDULERS = ("warm-restart", "cyclic", "constant")
LOSSES = ("bce", "dice", "bce+dice")
TILING_SCHEMES = ("default", "reference")
EVALUATE_SPLITS = ("val", "train", "all")  # `unet-ray evaluate --split`
EXPORT_FORMATS = ("torchscript", "onnx", "bioimageio")  # `unet-ray export --format`
# what picks the best checkpoint (OUTPUT/best) and ranks Tune's trials: a validation metric of
# `unet-ray evaluate` (instance metrics count nuclei; pixel F1 only overlap). Every one stays in
# metrics.csv.
BEST_METRICS = ("dsb_score", "f1_50", "pixel_f1")
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * step, 2) for step in range(10))  # DSB2018: 0.50..0.95
SIZE_MULTIPLE = 32  # five 2x2 max-pools: input sides must be multiples of 2**5


ENCODER_IMAGENET = "imagenet"  # torchvision's VGG16_BN_Weights.IMAGENET1K_V1 via torch's hub cache
ENCODER_NONE = "none"  # randomly initialised encoder
HEAD_MASK, HEAD_MASK_CONTOUR = "mask", "mask+contour"
HEADS = (HEAD_MASK, HEAD_MASK_CONTOUR)
HEAD_CHANNELS = {HEAD_MASK: 1, HEAD_MASK_CONTOUR: 2}
# keys older checkpoints saved that no longer mean anything; dropped when read
RETIRED_KEYS = {"instances": ("min_distance",)}


@dataclass
class ModelConfig:
    # "imagenet" (torchvision's ImageNet weights through the hub cache, downloaded once),
    # "none" (random) or a local torchvision vgg16_bn state-dict file
    encoder_weights: str = ENCODER_IMAGENET
    # filled in when training starts: the weights file used and its SHA-256 prefix ("" for none)
    encoder_weights_file: str = ""
    encoder_weights_sha256: str = ""
    freeze_encoder: bool = False  # keep the VGG16_bn encoder fixed during training
    decoder_batchnorm: bool = (
        False  # batch-norm in the decoder (report: off, lowers border contrast)
    )
    # "mask": one logit, nucleus (the report's head); "mask+contour": nucleus and nucleus
    # contour, so that touching nuclei are split where the network saw them meet
    head: str = HEAD_MASK


@dataclass
class DataConfig:
    source: str | None = (
        None  # DSB2018 layout (dir, .zip, s3://) or prepared shards; None: synthetic
    )
    tile_size: int = 256  # standardised tile side used by `prepare` (report: 256)
    image_size: int = 256  # side of the training crops fed to the network (multiple of 32)
    val_fraction: float = 0.15  # fraction of source images held out for validation
    seed: int = 0  # split / synthetic-data seed
    synth_count: int = 24  # images generated when no source is given
    elastic_probability: float = 0.25  # elastic deformation is slow: applied to this fraction
    augment: bool = True  # random flips, rotations, shift-scale-rotate, colour, blur/noise
    # microns per pixel of the training images (--mpp; None: not recorded). Saved in the
    # checkpoint: `segment` rescales whole images to it and warns when a slide's differs
    mpp: float | None = None


@dataclass
class InstanceConfig:
    """Probability maps -> instance labels (``unet_ray.core.instances``); one set of values, saved in
    the checkpoint, serves validation, `unet-ray evaluate` and `unet-ray segment`."""

    threshold: float = 0.5  # nucleus probability above which a pixel is nucleus
    contour_threshold: float = (
        0.5  # mask+contour head: parts nuclei at this fraction of the contour peak
    )
    core_ratio: float = 0.85  # mask head: seeds where distance >= ratio * largest distance nearby
    min_size: int = 16  # objects smaller than this many pixels are dropped
    min_seed_size: int = 4  # seeds smaller than this many pixels are ignored
    fill_holes: bool = True  # background enclosed by one nucleus becomes part of it


@dataclass
class TrainConfig:
    output: str = "runs/train"  # local folder or s3://bucket/prefix
    epochs: int = 40  # report: F1 0.93 after ~40 epochs
    batch_size: int = 16  # global batch size, split across workers (report optimum: 16)
    max_lr: float = 0.4  # maximum learning rate of the schedule (report optimum: 0.4)
    min_lr: float = 1e-4  # floor of the warm-restart and cyclic schedules
    scheduler: str = "warm-restart"  # warm-restart | cyclic | constant
    # warm-restart: epochs of the first cosine cycle (each next one twice as long); 0 sizes the
    # cycles so that `epochs` ends exactly at the end of the `restart_cycles`-th cycle
    restart_epochs: float = 0
    restart_cycles: int = 2  # warm-restart with restart_epochs 0: 40 epochs -> 13.3 + 26.7
    cycle_epochs: int = 4  # cyclic: epochs per triangular cycle (up and down)
    warmup_epochs: float = 1.0  # linear learning-rate warm-up from 0 over this many epochs
    # learning rate of a pretrained encoder relative to the decoder's (1.0 for a random encoder)
    encoder_lr_scale: float = 0.1
    min_steps_per_epoch: int = 100  # small sets: an epoch draws augmented tiles until this many
    shuffle_buffer_tiles: int = 256  # training tiles mixed in each worker's shuffle buffer
    sync_batchnorm: bool = True  # SyncBatchNorm when training on more than one GPU
    loss: str = "bce"  # bce | dice | bce+dice
    contour_weight: float = 1.0  # mask+contour head: weight of the contour channel's loss
    momentum: float = 0.9  # SGD momentum (report: 0.9)
    weight_decay: float = 1e-4  # not applied to batch-norm weights and biases
    grad_clip: float = 1.0  # max gradient norm; large max_lr with SGD needs it
    workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 2  # worker crashes tolerated; training resumes from the latest checkpoint
    checkpoints_to_keep: int = 2  # latest plus best by `best_metric`
    # validation metric that picks OUTPUT/best and ranks Tune's trials: dsb_score (DSB2018 score,
    # mean over IoU 0.5-0.95), f1_50 (instance F1 at IoU 0.5) or pixel_f1
    best_metric: str = "dsb_score"
    # after training: search the instance settings on the validation images (by best_metric)
    # and store them in OUTPUT/best (`unet-ray thresholds` does it on other annotated images)
    search_instances: bool = True


@dataclass
class TuneConfig:
    num_samples: int = 8  # trials
    max_epochs: int = 30  # epochs of every trial that ASHA does not stop early
    grace_period: int = 2  # epochs before ASHA may stop a trial
    reduction_factor: int = 2  # ASHA
    max_concurrent: int = 0  # 0: as many as the cluster's CPUs/GPUs hold
    schedulers: list[str] = field(default_factory=lambda: ["warm-restart", "cyclic"])
    max_lr_min: float = 1e-3
    max_lr_max: float = 0.5
    batch_sizes: list[int] = field(default_factory=lambda: [4, 8, 16])
    losses: list[str] = field(default_factory=list)  # empty: fixed to train.loss
    decoder_batchnorm: list[bool] = field(default_factory=list)  # empty: fixed
    elastic_probabilities: list[float] = field(default_factory=list)  # empty: fixed
    seed: int = 0
    # --gpu: GPUs one trial's training workers share (0.25: four one-worker trials per GPU);
    # 0: one whole GPU per worker
    gpus_per_trial: float = 0.0


@dataclass
class SegmentConfig:
    tile: int = 512  # network input side per tile (multiple of 32)
    overlap: int = 32  # context margin on each side of a tile's kept core (pixels)
    scheme: str = "default"  # default | reference (128-px cores reflect-padded to 256)
    batch_size: int = 8  # tiles per inference batch
    # test-time augmentation: logits averaged over the 8 flips and quarter turns of each tile
    # (8x the inference work)
    tta: bool = False
    workers: int = 1  # inference actors (one model each)
    use_gpu: bool = False
    actors_per_gpu: int = 1  # --gpu: inference actors sharing one GPU (each holds 1/N of it)
    overwrite: bool = False  # redo images whose outputs are complete
    # whole images: their microns per pixel (`segment --mpp`), over what a TIFF's resolution tags
    # say; None: the tags'. Images with a known pixel size are rescaled to the model's data.mpp
    image_mpp: float | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    instances: InstanceConfig = field(default_factory=InstanceConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> Config:
        """Build a config from nested dicts; unknown sections or keys raise ValueError."""
        values = dict(values or {})
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(sections))
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}; expected {sorted(sections)}")
        built = {}
        for section_field in dataclasses.fields(cls):
            section_class = section_field.default_factory  # the dataclass itself
            built[section_field.name] = _build_section(
                section_class, section_field.name, values.get(section_field.name)
            )
        config = cls(**built)
        validate(config)
        return config


def _build_section(section_class, name: str, values: dict[str, Any] | None):
    values = values or {}
    if not isinstance(values, dict):
        raise ValueError(f"config section '{name}' must be a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(section_class)}
    values = {key: value for key, value in values.items() if key not in RETIRED_KEYS.get(name, ())}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in config section '{name}'; known: {sorted(known)}"
        )
    return section_class(**values)


def validate(config: Config) -> None:
    """Raise ValueError with the fix in the message for values no stage can use."""
    if config.train.scheduler not in SCHEDULERS:
        raise ValueError(f"train.scheduler '{config.train.scheduler}' is not one of {SCHEDULERS}")
    if config.train.best_metric not in BEST_METRICS:
        raise ValueError(
            f"train.best_metric '{config.train.best_metric}' is not one of {BEST_METRICS}"
        )
    if config.train.loss not in LOSSES:
        raise ValueError(f"train.loss '{config.train.loss}' is not one of {LOSSES}")
    if config.model.head not in HEADS:
        raise ValueError(f"model.head '{config.model.head}' is not one of {HEADS}")
    if config.train.contour_weight < 0:
        raise ValueError(f"train.contour_weight={config.train.contour_weight} must be >= 0")
    if not 0.0 < config.instances.threshold < 1.0 or not 0.0 < config.instances.core_ratio <= 1.0:
        raise ValueError("instances.threshold must be in (0, 1) and instances.core_ratio in (0, 1]")
    if config.segment.scheme not in TILING_SCHEMES:
        raise ValueError(f"segment.scheme '{config.segment.scheme}' is not one of {TILING_SCHEMES}")
    for name, side in (
        ("data.image_size", config.data.image_size),
        ("segment.tile", config.segment.tile),
    ):
        if side <= 0 or side % SIZE_MULTIPLE:
            nearest = max(SIZE_MULTIPLE, round(side / SIZE_MULTIPLE) * SIZE_MULTIPLE)
            raise ValueError(
                f"{name}={side} must be a positive multiple of {SIZE_MULTIPLE}; try {nearest}"
            )
    for name, mpp in (
        ("data.mpp", config.data.mpp),
        ("segment.image_mpp", config.segment.image_mpp),
    ):
        if mpp is not None and not (isinstance(mpp, int | float) and mpp > 0):
            raise ValueError(f"{name}={mpp!r} must be a positive number of microns per pixel")
    if not 0.0 <= config.data.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={config.data.val_fraction} must be in [0, 1)")
    if config.train.workers < 1 or config.train.batch_size < 1 or config.train.epochs < 1:
        raise ValueError("train.workers, train.batch_size and train.epochs must all be at least 1")
    if config.train.max_lr <= 0:
        raise ValueError(f"train.max_lr={config.train.max_lr} must be positive")
    check_batch_divides(config.train.batch_size, config.train.workers)
    if config.train.restart_epochs < 0 or config.train.restart_cycles < 1:
        raise ValueError("train.restart_epochs must be >= 0 and train.restart_cycles >= 1")
    if config.train.warmup_epochs < 0 or config.train.min_steps_per_epoch < 1:
        raise ValueError("train.warmup_epochs must be >= 0 and train.min_steps_per_epoch >= 1")
    if config.train.encoder_lr_scale < 0:
        raise ValueError(f"train.encoder_lr_scale={config.train.encoder_lr_scale} must be >= 0")
    if config.train.shuffle_buffer_tiles < 1:
        raise ValueError("train.shuffle_buffer_tiles must be at least 1")
    if not 0.0 <= config.data.elastic_probability <= 1.0:
        raise ValueError(
            f"data.elastic_probability={config.data.elastic_probability} must be in [0, 1]"
        )


def check_batch_divides(batch_size: int, workers: int) -> None:
    """The global batch is split evenly across the workers: refuse one that does not divide,
    naming the nearest sizes that do."""
    if batch_size % workers == 0:
        return
    lower = (batch_size // workers) * workers
    upper = lower + workers
    choices = " or ".join(str(size) for size in (lower, upper) if size >= workers)
    raise ValueError(
        f"train.batch_size={batch_size} (--batch-size) is not divisible by "
        f"train.workers={workers} (--workers): the global batch is split evenly across the "
        f"workers; use {choices}"
    )


def load_config(path: str | Path | None) -> Config:
    """Read a YAML config (all sections optional). ``None`` gives the defaults."""
    if path is None:
        return Config.from_dict({})
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(
            f"config file {path} must hold a mapping of sections, got {type(values).__name__}"
        )
    try:
        return Config.from_dict(values)
    except (ValueError, TypeError) as error:
        raise ValueError(f"config file {path}: {error}") from error


def read_config_overrides(path: str | Path | None, sections: tuple[str, ...]) -> dict[str, dict]:
    """The keys a YAML config file sets in ``sections``, as written (validated whole by
    ``load_config``): what `segment --config` and `evaluate --config` lay over the checkpoint's
    values, leaving every key the file does not name to the checkpoint."""
    if path is None:
        return {section: {} for section in sections}
    load_config(path)  # a missing file, bad YAML, an unknown key or a bad value: told here
    values = yaml.safe_load(Path(path).read_text()) or {}
    return {section: dict(values.get(section) or {}) for section in sections}


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


DEFAULT_REGION = 4096  # region (core) side in frame pixels
DEFAULT_HALO = 128  # context read around each core: nuclei up to halo - overlap px are whole
LABEL_TILE = 256  # OME-TIFF tile side of the labels; regions are multiples of it


@dataclass
class SlideConfig:
    region: int = DEFAULT_REGION  # region side (frame pixels), a multiple of LABEL_TILE
    halo: int = DEFAULT_HALO  # context around each region (pixels); must exceed the tile overlap
    mpp: float | None = None  # microns per pixel to segment at; None: the slide's own
    tissue_mask: bool = True  # skip regions without tissue (Otsu on saturation)


def check_slide_config(slide: SlideConfig, segment: SegmentConfig) -> None:
    """Raise ValueError, with the fix, for region geometry no slide can use."""
    if slide.region < LABEL_TILE or slide.region % LABEL_TILE:
        nearest = max(LABEL_TILE, round(slide.region / LABEL_TILE) * LABEL_TILE)
        raise ValueError(
            f"--region {slide.region} must be a multiple of {LABEL_TILE}; try {nearest}"
        )
    if slide.halo <= segment.overlap:
        raise ValueError(
            f"--halo {slide.halo} must exceed the tile overlap ({segment.overlap}): nuclei up to "
            "halo - overlap px across are kept whole; try 128"
        )
    if slide.mpp is not None and slide.mpp <= 0:
        raise ValueError(f"--mpp {slide.mpp} must be positive (microns per pixel)")
