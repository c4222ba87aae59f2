"""Entry point for `ray job submit -- python jobs/segment.py`: the same flags as `unet-ray segment`.

ray job submit --working-dir . -- python jobs/segment.py s3://bucket/run/best s3://bucket/slides \
    s3://bucket/segmented --workers 4 --gpu
python jobs/segment.py --smoke-test        # random-weight model, 3 small images, CPU, local Ray
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

SMOKE_TEST_FLAGS = ["--tile", "128", "--overlap", "16", "--batch-size", "4", "--workers", "1"]
SMOKE_TEST_SIDES = ((96, 128), (150, 170), (40, 33))  # one image smaller than the tile
SMOKE_TEST_STYLES = ("fluorescence", "he", "brightfield")


def write_smoke_test_inputs(root: str) -> tuple[str, str, str]:
    """A random-weight checkpoint, three small synthetic images and an output folder under root."""
    import numpy as np
    import torch

    from unet_ray.core.config import Config
    from unet_ray.core.model import UNetVGG16BN
    from unet_ray.io.checkpoint import save_checkpoint
    from unet_ray.io.files import write_bytes_atomic
    from unet_ray.io.images import encode_png
    from unet_ray.io.synth import generate_sample

    torch.manual_seed(0)
    checkpoint = os.path.join(root, "checkpoint")
    save_checkpoint(checkpoint, UNetVGG16BN(), Config().to_dict(), {})
    images = os.path.join(root, "images")
    rng = np.random.default_rng(0)
    for index, ((height, width), style) in enumerate(
        zip(SMOKE_TEST_SIDES, SMOKE_TEST_STYLES, strict=True)
    ):
        image, _ = generate_sample(rng, height, width, style)
        write_bytes_atomic(os.path.join(images, f"smoke_{index}.png"), encode_png(image))
    return checkpoint, images, os.path.join(root, "output")


def main(argv: list[str] | None = None) -> int:
    from unet_ray.cli import add_segment_arguments, segment_main
    from unet_ray.cli_args import HelpFormatter, add_verbose_argument, apply_verbose

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    if "--smoke-test" in argv:  # CHECKPOINT INPUT OUTPUT are made up, not asked for
        root = tempfile.mkdtemp(prefix="unet_ray_segment_smoke_")
        argv = [*write_smoke_test_inputs(root), *SMOKE_TEST_FLAGS, *argv]
    parser.add_argument("--smoke-test", action="store_true", help="tiny synthetic run on CPU")
    add_segment_arguments(parser)
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    apply_verbose(args.verbose)
    try:
        return segment_main(args)  # RAY_ADDRESS (set by `ray job submit`) selects the cluster
    except (ValueError, FileNotFoundError) as error:
        print(f"jobs/segment.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
