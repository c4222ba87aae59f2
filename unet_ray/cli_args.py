"""Conventions every command line of unet_ray shares: help that shows each flag's default,
``-v/--verbose`` before or after the subcommand (and in ``jobs/*.py``), ``--version``, inputs
checked before Ray starts, and ``--config`` laid over a checkpoint's values.

Beside ``cli`` on top of the package (``cli`` and ``jobs/*.py`` import it; it imports only the
config, and ``io`` when it checks paths), so ``unet-ray --help`` loads neither torch, Ray
nor pyarrow.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterable

from unet_ray import __version__
from unet_ray.core.config import BEST_METRICS, EVALUATE_SPLITS, EXPORT_FORMATS, Config

VERBOSE_ENV = "UNET_RAY_VERBOSE"  # read by unet_ray.runtime.cluster (its VERBOSE_ENV)
VERBOSE_HELP = "debug logging, with Ray's progress bars and INFO lines (default: off)"
S3_PREFIX = "s3://"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class InputError(FileNotFoundError):
    """A path the command reads does not exist (exit 2, before Ray starts)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, except where a default says nothing: a flag whose help
    already names its default, a switch that is off unless given, and a None default (the
    help says what leaving the flag out means; ``show_config_defaults`` fills in the config's)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.default in (None, argparse.SUPPRESS)
            or action.nargs == 0  # a switch: its help says what it turns on or off
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def show_config_defaults(
    parser: argparse.ArgumentParser, fields: Iterable[tuple[str, str, str]]
) -> None:
    """Append "(default: VALUE)" from ``Config()`` to the help of every flag whose argparse
    default is None (so that only given flags override a --config file), for
    ``fields`` = (flag attribute, config section, config field); switches and helps that
    already name a default are left alone."""
    defaults = Config().to_dict()
    actions = {action.dest: action for action in parser._actions}
    for attribute, section, field_name in fields:
        action = actions.get(attribute)
        if action is None or action.default is not None or action.nargs == 0:
            continue
        if "default" in (action.help or ""):
            continue
        value = defaults[section][field_name]
        shown = "none" if value is None else value
        action.help = f"{action.help or ''} (default: {shown})".lstrip()


def add_verbose_argument(parser: argparse.ArgumentParser, top_level: bool = True) -> None:
    """``-v/--verbose``. On a subcommand its default is SUPPRESS, so that a ``-v`` given before
    the subcommand is not reset by the subcommand's parser."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=False if top_level else argparse.SUPPRESS,
        help=VERBOSE_HELP,
    )


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--version", action="version", version=f"unet-ray {__version__}", help="print the version"
    )


def apply_verbose(verbose: bool) -> None:
    """``--verbose``: debug logging here and Ray's own console output in every Ray process
    (``UNET_RAY_VERBOSE=1``, read by ``unet_ray.runtime.cluster``); else INFO."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT)
    # matplotlib's INFO lines ("generated new fontManager" on a machine's first plot) are not ours
    logging.getLogger("matplotlib").setLevel(logging.DEBUG if verbose else logging.WARNING)


def human_lines_to_stderr() -> contextlib.AbstractContextManager:
    """While a command that answers in JSON works: everything printed to stdout (progress
    lines, Ray's forwarded worker output) goes to stderr, so that stdout holds only the JSON
    printed after it (``unet-ray train > result.json``)."""
    return contextlib.redirect_stdout(sys.stderr)


def check_inputs(**paths: str | None) -> None:
    """Raise ``InputError`` naming the first path that does not exist (local, or an s3://
    object or prefix), keyword = what it is (``checkpoint``, ``input`` ...); None is skipped.
    Run before Ray starts, so a typo costs no cluster start."""
    for what, path in paths.items():
        if path is None:
            continue
        try:
            if str(path).startswith(S3_PREFIX):
                from unet_ray.io.files import exists  # here: a local check imports no pyarrow

                found = exists(path)
            else:
                found = os.path.exists(os.path.expanduser(path))
        except OSError as error:  # S3 unreachable, no credentials: the job tells its own error
            logging.getLogger(__name__).debug("could not check %s %s: %s", what, path, error)
            continue
        if not found:
            raise InputError(f"{what.replace('_', ' ')} {path} does not exist")


def config_overrides(
    given: dict[str, dict], saved: dict, flags: dict[str, object], section: str
) -> dict:
    """One config section's values: the checkpoint's (``saved``), then the keys the --config
    file sets (``given``), then the flags the user gave (non-None ``flags``)."""
    return {
        **saved,
        **given.get(section, {}),
        **{name: value for name, value in flags.items() if value is not None},
    }


# ----------------------------------------------------------------------------- parsers


def add_tta_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="test-time augmentation: average the logits over the 8 flips and quarter turns of "
        "each tile (8x the inference work; default: the checkpoint's segment.tta, on when its "
        "instance settings were searched with TTA)",
    )


THRESHOLDS_SUFFIX = "-thresholds"  # `unet-ray thresholds` writes CHECKPOINT-thresholds by default


def add_thresholds_parser(commands, handler) -> None:
    """`unet-ray thresholds`."""
    thresholds = commands.add_parser(
        "thresholds",
        help="search the instance settings on annotated images; write a new checkpoint folder",
        description="Predict each annotated image once with the checkpoint's model, search "
        "threshold, the head's splitting parameter (core ratio or contour threshold) and minimum "
        "size for the highest --metric, and write a checkpoint folder with the chosen values "
        "(the weights copied unchanged). `evaluate` and `segment` use them.",
    )
    thresholds.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint folder")
    thresholds.add_argument("data", metavar="DATA", help="DSB2018 layout or prepared shards")
    thresholds.add_argument(
        "--output",
        help=f"new checkpoint folder (default: CHECKPOINT{THRESHOLDS_SUFFIX} beside it)",
    )
    thresholds.add_argument(
        "--split",
        choices=EVALUATE_SPLITS,
        help="images to search on (default: all images of a DSB2018 layout; the validation "
        "images of prepared shards)",
    )
    thresholds.add_argument(
        "--metric",
        choices=BEST_METRICS,
        help="metric to maximise (default: the checkpoint's train.best_metric, dsb_score)",
    )
    thresholds.add_argument("--gpu", action="store_true", help="predict on the GPU")
    add_tta_argument(thresholds)
    thresholds.set_defaults(handler=handler)


def add_export_parser(commands, handler) -> None:
    """`unet-ray export`."""
    export = commands.add_parser(
        "export",
        help="write the checkpoint's model as TorchScript, ONNX or a bioimage.io package",
        description="Export the network with its input scaling and sigmoid inside: float32 "
        "N x 3 x H x W in [0, 1] (RGB uint8 / 255; H, W multiples of 32) -> probabilities "
        "N x C x H x W (channel 0 nucleus, 1 contour for mask+contour). Each export is run "
        "once on a test image and compared with the checkpoint's own output. ONNX and "
        "bioimageio need `pip install 'unet_ray[export]'`.",
    )
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint folder")
    export.add_argument(
        "out",
        metavar="OUT",
        help="file to write: model.pt (torchscript), model.onnx (onnx), or the bioimage.io "
        "package's .zip (bioimageio)",
    )
    export.add_argument(
        "--format", choices=EXPORT_FORMATS, default=EXPORT_FORMATS[0], help="export format"
    )
    export.set_defaults(handler=handler)
