"""Our console progress: a bar on a terminal, a few plain lines otherwise; no Ray."""

from __future__ import annotations

import fcntl
import io as text_io
import os
import pty
import select
import struct
import termios
import time

import pytest

from unet_ray.runtime.progress import PREFIX, Progress, is_terminal, lines_every


@pytest.mark.parametrize(
    ("total", "every"), [(1, 1), (9, 1), (10, 1), (11, 2), (100, 10), (101, 11), (0, 1)]
)
def test_plain_lines_come_about_ten_per_stage(total, every):
    assert lines_every(total) == every


def test_without_a_terminal_one_line_every_n_items_and_one_for_the_last():
    stream = text_io.StringIO()
    with Progress("segment", 25, unit="image", stream=stream) as progress:
        assert progress.bar is None and progress.every == 3
        for index in range(25):
            progress.update(summary=f"{index + 1} ok, 0 error")
    lines = stream.getvalue().splitlines()
    # after images 3, 6, ..., 24 and the 25th
    assert [line.split()[2] for line in lines] == [f"{n}/25" for n in (*range(3, 25, 3), 25)]
    assert lines[-1].startswith(f"{PREFIX} segment 25/25 images  25 ok, 0 error  (")


def test_a_line_of_its_own_is_printed_in_either_mode():
    stream = text_io.StringIO()
    with Progress("train", 2, unit="epoch", stream=stream, every=5) as progress:
        progress.update(line="epoch 1 metrics")
        progress.update(line="epoch 2 metrics")
    lines = stream.getvalue().splitlines()
    assert lines[:2] == ["epoch 1 metrics", "epoch 2 metrics"]
    assert len(lines) == 3 and lines[2].startswith(f"{PREFIX} train 2/2 epochs  (")  # the last


def read_everything(fd: int, quiet_s: float = 1.0, limit_s: float = 20.0) -> bytes:
    """All a pseudo-terminal's writer has written: the kernel moves pty output to the reading
    side asynchronously, so one ``os.read`` right after the writes can return only part of it
    (it did once on a clean clone). Reads until nothing more arrives for ``quiet_s``."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], quiet_s)
        if not ready:
            break
        chunks.append(os.read(fd, 65536))
    return b"".join(chunks)


def test_on_a_terminal_one_bar_with_the_summary_and_lines_above_it():
    main_fd, terminal_fd = pty.openpty()
    rows_columns = struct.pack("HHHH", 24, 120, 0, 0)
    fcntl.ioctl(terminal_fd, termios.TIOCSWINSZ, rows_columns)  # a new pty is 0 columns wide
    try:
        with os.fdopen(terminal_fd, "w", closefd=False) as terminal:
            assert is_terminal(terminal) and not is_terminal(text_io.StringIO())
            with Progress("train", 3, unit="epoch", stream=terminal, initial=1) as progress:
                assert progress.bar is not None  # chosen because the stream is a terminal
                progress.update(summary="val_f1 0.5000", line="[unet_ray] epoch 2/3 ...")
                progress.update(summary="val_f1 0.7000")
            terminal.flush()
        shown = read_everything(main_fd).decode(errors="replace")
    finally:
        os.close(main_fd)
        os.close(terminal_fd)
    assert "[unet_ray] epoch 2/3 ..." in shown
    final = shown.replace("\r", "\n").splitlines()
    bars = [line for line in final if line.startswith(f"{PREFIX} train")]
    assert bars and "3/3" in bars[-1] and "val_f1 0.7000" in bars[-1]
    assert "100%" in bars[-1]


def test_resumed_items_count_as_done_and_the_summary_rides_on_each_line():
    """The slide job's use: regions of an earlier run count from the start; each line carries
    the nuclei so far."""
    stream = text_io.StringIO()
    with Progress("slides", 6, unit="region", initial=4, stream=stream) as progress:
        progress.update(summary="120 nuclei, 0 failed")
        progress.update(summary="250 nuclei, 1 failed")
    lines = stream.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == [
        f"{PREFIX} slides 5/6 regions",
        f"{PREFIX} slides 6/6 regions",
    ]
    assert lines[-1].split("  ")[1] == "250 nuclei, 1 failed"
