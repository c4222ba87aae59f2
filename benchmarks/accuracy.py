"""Instance accuracy (issue 24): the two heads, the searched instance settings and test-time
augmentation, over several seeds, on held-out synthetic images of touching nuclei.

python benchmarks/accuracy.py [--seeds 0 1 2] [--epochs 12] [--steps 10] [--quick] [--json FILE]

For each seed and head (``mask``, ``mask+contour``) the U-Net trains through the real pipeline
(`unet_ray.pipelines.train.run_training`: Ray Data, Ray Train, one CPU worker, random encoder:
offline) on the recipe benchmark's 8 + 2 synthetic 128-px tiles of the three styles of DSB2018
(fluorescence, brightfield, H&E; ~40 % of the nuclei placed against a neighbour), with today's
defaults: best epoch by DSB score, instance settings searched on the run's 2 validation images.
The best checkpoint is then scored with `unet-ray evaluate`'s code on held-out images of every
style (4 per style, 128-320 px, never seen in training), each whole, three ways:

- ``default``: the default instance settings (what a checkpoint had before the search);
- ``searched``: the settings the search stored in the checkpoint;
- ``searched+tta``: the same settings on logits averaged over the 8 flips and quarter turns.

Prints a table per seed and head, the means over seeds with their spread, and TTA's cost
(seconds of `evaluate` with and without it); writes the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS_DIR))

import recipe  # noqa: E402  (the recipe benchmark's data sets)

DEFAULT_JSON = BENCHMARKS_DIR / "accuracy_results.json"
HEADS = ("mask", "mask+contour")
MODES = ("default", "searched", "searched+tta")
METRICS = ("pixel_f1", "dsb_score", "f1_50")


def train(head: str, seed: int, epochs: int, steps: int, source: str, root: Path):
    from unet_ray.core.config import Config
    from unet_ray.pipelines.train import run_training

    config = Config.from_dict(
        {
            "model": {"encoder_weights": "none", "head": head},
            "data": {
                "source": source,
                "tile_size": recipe.TILE,
                "image_size": 96,
                "seed": seed,
                "val_fraction": recipe.VAL_IMAGES / (recipe.TRAIN_IMAGES + recipe.VAL_IMAGES),
            },
            "train": {
                "output": str(root / f"{head}-seed{seed}"),
                "batch_size": recipe.BATCH,
                "workers": 1,
                "epochs": epochs,
                "min_steps_per_epoch": steps,
            },
        }
    )
    started = time.perf_counter()
    result = run_training(config)
    return result, time.perf_counter() - started


def score(checkpoint: str, held_out: dict[str, str]) -> list[dict]:
    """Each style's held-out scores in the three ``MODES``, with the seconds `evaluate` took."""
    from unet_ray.core.config import InstanceConfig
    from unet_ray.pipelines.evaluate import evaluate_checkpoint

    modes = {
        "default": {"overrides": lambda saved: InstanceConfig(), "tta": False},
        "searched": {"tta": False},
        "searched+tta": {"tta": True},
    }
    rows = []
    for style, folder in held_out.items():
        for mode, options in modes.items():
            started = time.perf_counter()
            metrics = evaluate_checkpoint(checkpoint, folder, split="all", **options)
            rows.append(
                {
                    "style": style,
                    "mode": mode,
                    **{key: round(metrics[key], 4) for key in METRICS},
                    "seconds": round(time.perf_counter() - started, 2),
                    "instances": metrics["instances"],
                }
            )
    return rows


def summarise(runs: list[dict]) -> list[dict]:
    """Per head and mode: the mean over seeds (of each seed's mean over styles) and the spread."""
    summary = []
    for head in HEADS:
        for mode in MODES:
            per_seed = {key: [] for key in (*METRICS, "seconds")}
            for run in runs:
                if run["head"] != head:
                    continue
                rows = [row for row in run["scores"] if row["mode"] == mode]
                for key in per_seed:
                    per_seed[key].append(statistics.mean(row[key] for row in rows))
            if not per_seed["dsb_score"]:
                continue
            entry = {"head": head, "mode": mode, "seeds": len(per_seed["dsb_score"])}
            for key, values in per_seed.items():
                entry[key] = round(statistics.mean(values), 4)
                if key != "seconds" and len(values) > 1:
                    entry[f"{key}_sd"] = round(statistics.stdev(values), 4)
            summary.append(entry)
    return summary


def format_tables(runs: list[dict], summary: list[dict]) -> str:
    lines = [
        "| head | seed | best epoch | train s | searched settings | mode | "
        + " | ".join(f"{style} pixel F1 / DSB / F1@0.5" for style in _styles(runs))
        + " |",
        "|" + "---|" * (6 + len(_styles(runs))),
    ]
    for run in runs:
        chosen = run["searched"]
        settings = ", ".join(
            f"{key} {chosen[key]}" for key in ("threshold", "core_ratio", "contour_threshold")
        )
        settings += f", min_size {chosen['min_size']}"
        for mode in MODES:
            cells = [
                " / ".join(f"{row[key]:.3f}" for key in METRICS)
                for row in run["scores"]
                if row["mode"] == mode
            ]
            lines.append(
                f"| {run['head']} | {run['seed']} | {run['best_epoch']} | {run['train_seconds']} "
                f"| {settings} | {mode} | " + " | ".join(cells) + " |"
            )
    lines += ["", "| head | mode | seeds | pixel F1 | DSB score | F1@0.5 | evaluate s |"]
    lines.append("|---|---|---|---|---|---|---|")
    for entry in summary:
        cells = [
            f"{entry[key]:.3f}" + (f" ± {entry[key + '_sd']:.3f}" if key + "_sd" in entry else "")
            for key in METRICS
        ]
        lines.append(
            f"| {entry['head']} | {entry['mode']} | {entry['seeds']} | "
            + " | ".join(cells)
            + f" | {entry['seconds']:.1f} |"
        )
    return "\n".join(lines)


def _styles(runs: list[dict]) -> list[str]:
    return list(dict.fromkeys(row["style"] for row in runs[0]["scores"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=10, help="minimum steps per epoch")
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    parser.add_argument("--quick", action="store_true", help="2 epochs of 2 steps (a smoke test)")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    args = parser.parse_args(argv)
    epochs, steps = (2, 2) if args.quick else (args.epochs, args.steps)
    os.environ.setdefault("UNET_RAY_NO_DOWNLOAD", "1")
    runs = []
    with tempfile.TemporaryDirectory(prefix="unet_ray_accuracy_") as folder:
        for seed in args.seeds:
            root = Path(folder) / f"seed{seed}"
            source, held_out = recipe.write_sets(root, seed)
            for head in args.heads:
                result, seconds = train(head, seed, epochs, steps, source, root)
                runs.append(
                    {
                        "head": head,
                        "seed": seed,
                        "epochs": epochs,
                        "steps_per_epoch": steps,
                        "best_epoch": result.metrics["epoch"],
                        "train_seconds": round(seconds, 1),
                        "search": result.threshold_search,
                        "searched": result.threshold_search["chosen"],
                        "scores": score(result.best_checkpoint, held_out),
                    }
                )
                print(f"seed {seed} {head}: trained in {seconds:.0f} s", flush=True)
    summary = summarise(runs)
    print(format_tables(runs, summary))
    settings = {"epochs": epochs, "steps_per_epoch": steps, "quick": args.quick}
    payload = {"settings": settings, "summary": summary, "runs": runs}
    Path(args.json).write_text(json.dumps(payload, indent=2, default=_plain))
    print(f"wrote {args.json}")
    return 0


def _plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)


if __name__ == "__main__":
    sys.exit(main())
