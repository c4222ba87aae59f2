"""The training recipe, before and after issue 12, on a small annotated set, as a user trains it.

python benchmarks/recipe.py [--quick] [--json FILE] [--plot FILE]

A lab's own annotations are often a handful of images. This trains the U-Net through the real
pipeline (`unet_ray.pipelines.train.run_training`: Ray Data, Ray Train, one CPU worker) on 8 synthetic
128-px tiles of all three styles, twice:

- ``before``: the defaults before issue 12: an epoch is one pass over the tiles (8 tiles at batch
  16: one step per epoch), warm restart from the full max lr at step 0 in 10-epoch first cycles,
  40 epochs (ending inside the 30-70 cycle), training crops as large as the tiles;
- ``after``: today's defaults: linear warm-up, cycles sized to end with the run, epochs of at
  least ``min_steps_per_epoch`` steps of augmented tiles drawn again and again, random crops of
  the tiles, a large shuffle buffer; with the epochs and steps per epoch scaled down so that both
  recipes get about the same wall-clock time on the same machine (its seconds are in the table).

Neither uses the ImageNet encoder (this benchmark must run offline; the pretrained encoder is the
default for users with the weights). Each checkpoint is then scored with `unet-ray evaluate`'s code
on a held-out set of each style (images of 128-320 px never seen in training), per image at
native size. Prints a markdown table; writes the JSON and a plot of the default learning-rate
schedule (and the old one) against epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCHMARKS_DIR = Path(__file__).resolve().parent
DEFAULT_JSON = BENCHMARKS_DIR / "recipe_results.json"
DEFAULT_PLOT = BENCHMARKS_DIR / "lr_schedule.png"
TILE = 128
TRAIN_IMAGES = 8  # one 128-px tile each
VAL_IMAGES = 2  # the training run's own validation split
HELD_OUT_PER_STYLE = 4
BATCH = 16
MAX_LR = 0.4  # the report's optimum, the default


def recipes(quick: bool) -> dict[str, dict]:
    """The two configs (beyond data and output). ``after`` keeps today's defaults except the
    run length, scaled so that it costs about what ``before`` costs here."""
    before_epochs = 12 if quick else 40
    after_epochs, after_steps = (3, 4) if quick else (4, 10)
    return {
        "before": {
            "train": {
                "epochs": before_epochs,
                "restart_epochs": 10,
                "warmup_epochs": 0,
                "min_steps_per_epoch": 1,
                "shuffle_buffer_tiles": 4 * BATCH,
                "encoder_lr_scale": 1.0,
            },
            "data": {"image_size": TILE},
        },
        "after": {
            "train": {"epochs": after_epochs, "min_steps_per_epoch": after_steps},
            "data": {"image_size": 96},  # random 96-px crops of the 128-px tiles
        },
    }


def write_sets(root: Path, seed: int) -> tuple[str, dict[str, str]]:
    """The training source (8 + 2 tiles of 128 px, styles in turn) and one held-out DSB2018
    layout per style (images of 128-320 px)."""
    from unet_ray.io.dsb import write_dsb_sample
    from unet_ray.io.synth import STYLES, generate_sample, write_synthetic_dataset

    source = root / "train" / "stage1_train"
    write_synthetic_dataset(
        source, count=TRAIN_IMAGES + VAL_IMAGES, seed=seed, min_side=TILE, max_side=TILE
    )
    held_out = {}
    rng = np.random.default_rng(seed + 1000)
    for style in STYLES:
        folder = root / "held_out" / style / "stage1_train"
        for index in range(HELD_OUT_PER_STYLE):
            height, width = (int(side) for side in rng.integers(128, 321, size=2))
            image, labels = generate_sample(rng, height, width, style)
            write_dsb_sample(str(folder), f"{style}{index:02d}", image, labels)
        held_out[style] = str(folder)
    return str(source), held_out


def train_and_score(
    name: str, overrides: dict, source: str, held_out: dict[str, str], root: Path
) -> list[dict]:
    from unet_ray.core.config import Config
    from unet_ray.pipelines.evaluate import evaluate_checkpoint
    from unet_ray.pipelines.train import run_training

    values = {
        "model": {"encoder_weights": "none", **overrides.get("model", {})},
        "data": {
            "source": source,
            "tile_size": TILE,
            "val_fraction": VAL_IMAGES / (TRAIN_IMAGES + VAL_IMAGES),
            **overrides["data"],
        },
        "train": {
            "output": str(root / name),
            "batch_size": BATCH,
            "max_lr": MAX_LR,
            "workers": 1,
            **overrides["train"],
        },
    }
    config = Config.from_dict(values)
    started = time.perf_counter()
    result = run_training(config)
    seconds = time.perf_counter() - started
    steps = _steps_run(result, config)
    rows = []
    for style, folder in held_out.items():
        metrics = evaluate_checkpoint(result.best_checkpoint, folder, split="all")
        rows.append(
            {
                "recipe": name,
                "style": style,
                "steps": steps,
                "epochs": config.train.epochs,
                "best_epoch": result.metrics["epoch"],
                "train_seconds": round(seconds, 1),
                "pixel_f1": round(metrics["pixel_f1"], 4),
                "dsb_score": round(metrics["dsb_score"], 4),
                "f1_50": round(metrics["f1_50"], 4),
                "n_images": metrics["n_images"],
            }
        )
    return rows


def _steps_run(result, config) -> int:
    from unet_ray.io.prepared import read_dataset_info
    from unet_ray.pipelines.data import tile_copies
    from unet_ray.pipelines.train_loop import steps_per_worker_epoch

    tiles = read_dataset_info(str(Path(config.train.output) / "prepared"))["train"]["tiles"]
    copies = tile_copies(tiles, 1, config.train.batch_size, config.train.min_steps_per_epoch)
    return len(result.history) * steps_per_worker_epoch(tiles * copies, 1, config.train.batch_size)


def plot_schedules(path: Path, steps_per_epoch: int = 100) -> None:
    """The default learning-rate schedule of a 40-epoch run, with the old default beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unet_ray.core.config import TrainConfig
    from unet_ray.core.schedules import config_learning_rate

    new = TrainConfig()
    old = TrainConfig(restart_epochs=10, warmup_epochs=0)
    epochs = np.arange(new.epochs * steps_per_epoch) / steps_per_epoch
    figure, axes = plt.subplots(figsize=(7, 3.2))
    axes.plot(epochs, [config_learning_rate(old, e) for e in epochs], label="before (10+20+40)")
    axes.plot(epochs, [config_learning_rate(new, e) for e in epochs], label="default now")
    axes.set_xlabel("epoch")
    axes.set_ylabel("learning rate (decoder)")
    axes.set_title("warm restart, max lr 0.4, 40 epochs")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def format_table(rows: list[dict]) -> str:
    columns = (
        "recipe",
        "style",
        "epochs",
        "steps",
        "train_seconds",
        "pixel_f1",
        "dsb_score",
        "f1_50",
        "n_images",
    )
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[column]) for column in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (a smoke test)")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    parser.add_argument("--plot", default=str(DEFAULT_PLOT))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    plot_schedules(Path(args.plot))
    rows = []
    with tempfile.TemporaryDirectory(prefix="unet_ray_recipe_") as folder:
        root = Path(folder)
        source, held_out = write_sets(root, args.seed)
        for name, overrides in recipes(args.quick).items():
            rows += train_and_score(name, overrides, source, held_out, root)
    print(format_table(rows))
    Path(args.json).write_text(json.dumps({"quick": args.quick, "rows": rows}, indent=2))
    print(f"wrote {args.json} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
