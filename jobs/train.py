"""Entry point for `ray job submit -- python jobs/train.py`: the same flags as `unet-ray train`.

ray job submit --working-dir . -- python jobs/train.py --data s3://bucket/dsb2018 --workers 4 --gpu
python jobs/train.py --smoke-test        # tiny, CPU, seconds to a minute, local Ray
"""

from __future__ import annotations

import argparse
import json
import sys

from unet_ray.cli import (
    add_train_arguments,
    apply_smoke_test_defaults,
    check_train_inputs,
    config_from_args,
)
from unet_ray.cli_args import (
    HelpFormatter,
    add_verbose_argument,
    apply_verbose,
    human_lines_to_stderr,
)

SMOKE_TEST_FLAGS = {
    "epochs": 1,
    "batch_size": 2,
    "image_size": 64,
    "tile_size": 64,
    "synth_count": 6,
    "workers": 1,
    "val_fraction": 0.34,
    "encoder_weights": "none",  # a smoke test never downloads the ImageNet weights
    "min_steps_per_epoch": 2,
}


def main(argv=None) -> int:
    from unet_ray.pipelines.train import run_training

    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    add_train_arguments(parser)
    parser.add_argument("--smoke-test", action="store_true", help="tiny synthetic run on CPU")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    apply_verbose(args.verbose)
    if args.smoke_test:
        apply_smoke_test_defaults(args, SMOKE_TEST_FLAGS, "unet_ray_smoke_")
    try:
        config = config_from_args(args)
        check_train_inputs(config)  # a missing --data: exit 2 before Ray starts
    except (ValueError, FileNotFoundError) as error:
        print(f"jobs/train.py: error: {error}", file=sys.stderr)
        return 2
    with human_lines_to_stderr():  # stdout: only the JSON below
        result = run_training(config)
    print(json.dumps({"best_checkpoint": result.best_checkpoint, **result.metrics}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
