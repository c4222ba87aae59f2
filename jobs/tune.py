"""Entry point for `ray job submit -- python jobs/tune.py`: the same flags as `unet-ray tune`.

ray job submit --working-dir . -- python jobs/tune.py --data s3://bucket/dsb2018 --num-samples 16 --gpu
python jobs/tune.py --smoke-test        # 2 tiny trials on CPU, local Ray
"""

from __future__ import annotations

import argparse
import sys

from unet_ray.cli import (
    add_train_arguments,
    add_tune_arguments,
    apply_smoke_test_defaults,
    check_train_inputs,
    config_from_args,
)
from unet_ray.cli_args import HelpFormatter, add_verbose_argument, apply_verbose

SMOKE_TEST_FLAGS = {
    "num_samples": 2,
    "max_epochs": 1,
    "image_size": 64,
    "tile_size": 64,
    "synth_count": 6,
    "workers": 1,
    "val_fraction": 0.34,
    "encoder_weights": "none",  # a smoke test never downloads the ImageNet weights
    "min_steps_per_epoch": 2,
}


def main(argv=None) -> int:
    from unet_ray.cli import tune_config_from_args
    from unet_ray.pipelines.tune import run_tuning

    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    add_train_arguments(parser)
    add_tune_arguments(parser)
    parser.add_argument("--smoke-test", action="store_true", help="two tiny trials on CPU")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    apply_verbose(args.verbose)
    if args.smoke_test:
        apply_smoke_test_defaults(args, SMOKE_TEST_FLAGS, "unet_ray_tune_smoke_")
    try:
        config = tune_config_from_args(args, config_from_args(args))
        check_train_inputs(config)  # a missing --data: exit 2 before Ray starts
    except (ValueError, FileNotFoundError) as error:
        print(f"jobs/tune.py: error: {error}", file=sys.stderr)
        return 2
    summary = run_tuning(config)
    print(summary.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
