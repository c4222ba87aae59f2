"""The two model heads, ``mask`` and ``mask+contour``, trained alike and scored on held-out
synthetic images with touching nuclei.

python benchmarks/heads.py [--quick] [--json FILE]

Both heads train through the real pipeline (`unet_ray.pipelines.train.run_training`: Ray Data, Ray Train,
one CPU worker) on the same synthetic tiles of all three styles (``recipe.write_sets``: 128-px
tiles; ~40 % of the nuclei are placed against a neighbour, touching or overlapping it), with the
same seed, epochs, steps and schedule (today's defaults, random encoder: this runs offline). Each
best checkpoint is scored with `unet-ray evaluate`'s code on the held-out images of each style
(128-320 px, never seen in training), each image whole, with the instance settings saved in the
checkpoint. Prints a markdown table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS_DIR))

import recipe  # noqa: E402  (the recipe benchmark's data sets and training)

DEFAULT_JSON = BENCHMARKS_DIR / "heads_results.json"
HEADS = ("mask+contour", "mask")


def settings(quick: bool, max_lr: float) -> dict:
    epochs, steps = (2, 3) if quick else (8, 10)
    return {
        "train": {"epochs": epochs, "min_steps_per_epoch": steps, "max_lr": max_lr},
        "data": {"image_size": 96},
    }


def score_kept(root: Path, held_out: dict[str, str]) -> list[dict]:
    """Score the best checkpoints a ``--keep`` run left in ``root`` again (e.g. after a change
    of the post-processing), with the instance settings saved in each."""
    from unet_ray.pipelines.evaluate import evaluate_checkpoint

    rows = []
    for head in HEADS:
        for style, folder in held_out.items():
            metrics = evaluate_checkpoint(str(root / head / "best"), folder, split="all")
            rows.append(
                {
                    "recipe": head,
                    "style": style,
                    **{key: round(metrics[key], 4) for key in ("pixel_f1", "dsb_score", "f1_50")},
                    "n_images": metrics["n_images"],
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (a smoke test)")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-lr", type=float, default=recipe.MAX_LR)
    parser.add_argument("--keep", help="train in this folder and keep the runs")
    parser.add_argument("--score-only", action="store_true", help="score the --keep folder's runs")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    with tempfile.TemporaryDirectory(prefix="unet_ray_heads_") as folder:
        root = Path(args.keep or folder)
        source, held_out = recipe.write_sets(root, args.seed)
        if args.score_only:
            rows = score_kept(root, held_out)
        else:
            rows = []
            for head in HEADS:
                overrides = {**settings(args.quick, args.max_lr), "model": {"head": head}}
                rows += recipe.train_and_score(head, overrides, source, held_out, root)
    columns = [key for key in rows[0] if key != "recipe"]
    print("| head | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 1))
    for row in rows:
        print(f"| {row['recipe']} | " + " | ".join(str(row[key]) for key in columns) + " |")
    Path(args.json).write_text(json.dumps({"quick": args.quick, "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
