"""Our own console progress: a tqdm bar per stage on a terminal, a few plain lines otherwise.

A stage (training's epochs, segmentation's images) counts finished items. On a terminal it is one
tqdm bar, with a short summary as the bar's postfix and any line worth keeping (an epoch's
metrics, a failed image) printed above it. Otherwise (a log file, a pipe, `ray job logs`) it
prints one line every ``every`` items and one for the last, so a job of any size writes about
``LINES_PER_STAGE`` lines. No Ray: the drivers call it.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

PREFIX = "[unet_ray]"
LINES_PER_STAGE = 10  # plain-line mode: about this many progress lines per stage
MAX_SILENCE_S = 60.0  # plain-line mode: a line at least this often while items finish


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stdout) is an interactive terminal."""
    stream = sys.stdout if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def lines_every(total: int, lines: int = LINES_PER_STAGE) -> int:
    """Items between two progress lines, so that ``total`` items print about ``lines`` lines."""
    return max(1, math.ceil(total / max(1, lines)))


class Progress:
    """Progress of one stage: ``update`` once per finished item (or several), ``close`` at the end.

    ``bar`` None: a tqdm bar exactly when ``stream`` is a terminal.
    """

    def __init__(
        self,
        stage: str,
        total: int,
        unit: str = "item",
        initial: int = 0,
        every: int | None = None,
        stream: TextIO | None = None,
        bar: bool | None = None,
    ):
        self.stage, self.total, self.unit = stage, total, unit
        self.done = initial
        self.stream = sys.stdout if stream is None else stream
        self.every = every or lines_every(total)
        self.started = self.last_line_at = time.monotonic()
        self.bar = None
        if is_terminal(self.stream) if bar is None else bar:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=f"{PREFIX} {stage}",
                unit=unit,
                file=self.stream,
                dynamic_ncols=True,
                leave=True,
            )

    def update(self, count: int = 1, summary: str = "", line: str = "") -> None:
        """``count`` more items finished; ``summary`` (e.g. "3 ok, 1 error") describes all so
        far; ``line`` is printed whatever the mode (above the bar on a terminal)."""
        self.done += count
        if line:
            self.write(line)
        if self.bar is not None:
            if summary:
                self.bar.set_postfix_str(summary, refresh=False)
            self.bar.update(count)
            return
        now = time.monotonic()
        crossed = self.done // self.every > (self.done - count) // self.every
        if crossed or self.done >= self.total or now - self.last_line_at >= MAX_SILENCE_S:
            self.last_line_at = now
            self._print(self.format_line(summary))

    def format_line(self, summary: str = "") -> str:
        """``[unet_ray] segment 20/100 images  18 ok, 2 error  (41 s)``."""
        unit = self.unit if self.total == 1 else f"{self.unit}s"
        elapsed = time.monotonic() - self.started
        tail = f"  {summary}" if summary else ""
        return f"{PREFIX} {self.stage} {self.done}/{self.total} {unit}{tail}  ({elapsed:.0f} s)"

    def write(self, line: str) -> None:
        """A line of its own: above the bar on a terminal, plain otherwise."""
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            self._print(line)

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
