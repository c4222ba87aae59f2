"""The two model heads, ``mask`` and ``mask+contour``, trained alike and scored on held-out
synthetic images with touching nuclei.

python benchmarks/heads.py [--quick] [--json FILE]

Both heads train through the real pipeline (`unet_ray.train.run_training`: Ray Data, Ray Train,
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
HEADS = ("mask", "mask+contour")


def settings(quick: bool) -> dict:
    epochs, steps = (2, 3) if quick else (8, 10)
    return {
        "train": {"epochs": epochs, "min_steps_per_epoch": steps},
        "data": {"image_size": 96},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (a smoke test)")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="unet_ray_heads_") as folder:
        root = Path(folder)
        source, held_out = recipe.write_sets(root, args.seed)
        for head in HEADS:
            overrides = {**settings(args.quick), "model": {"head": head}}
            rows += recipe.train_and_score(head, overrides, source, held_out, root)
    print(recipe.format_table(rows).replace("| recipe |", "| head |", 1))
    Path(args.json).write_text(json.dumps({"quick": args.quick, "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
