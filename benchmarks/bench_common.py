"""The command line every benchmark part shares: `python benchmarks/bench_X.py [--quick] [--json F]`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path


def standalone_main(
    description: str,
    run: Callable[[bool], dict],
    format_table: Callable[[dict], str],
    quick_help: str,
    argv: list[str] | None = None,
) -> int:
    """Parse --quick/--json, run one benchmark part, print its table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    results = run(quick=args.quick)
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0
