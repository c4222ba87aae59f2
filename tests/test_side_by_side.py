"""Two `unet-ray` commands at once on one machine, each starting its own local Ray beside the
session's (``ray_local``): a search on 2 CPUs writing to a pipe, and a training run on a terminal.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

from unet_ray import __version__
from unet_ray.runtime.cluster import API_SERVER_ENV, VERBOSE_ENV

pytestmark = [pytest.mark.ray, pytest.mark.slow]
TILE = 64
TIMEOUT_S = 600
UNET_RAY = str(Path(sys.executable).parent / "unet-ray")  # the console script users run
SEARCH_YAML = """
data:
  elastic_probability: 0.0
tune:
  batch_sizes: [2, 4]
  seed: 0
"""
# `unet-ray tune` as a user runs it on a 2-core laptop (os.cpu_count() says 2 whatever this
# machine has); then, before its Ray goes, the placement groups it still reserves
TWO_CORE_TUNE = """
import os, sys, time
os.cpu_count = lambda: 2
from unet_ray.cli import main
code = main(sys.argv[1:])
import ray
deadline = time.monotonic() + 30  # Ray Train removes a finished run's group right after it
while True:
    table = ray.util.placement_group_table()
    reserved = [group for group, info in table.items() if info["state"] != "REMOVED"]
    if not reserved or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(f"placement groups: {len(table)} created, {len(reserved)} still reserved", flush=True)
sys.exit(code)
"""
TRACEBACK_SIGNS = ("Found multiple active Ray instances", "Traceback (most recent call last)")


class Command:
    """A command started in its own session (its own local Ray dies with it), its output read
    from a pipe or, with ``terminal``, its stderr from a pseudo-terminal (120 columns) as a user
    sees it and its stdout (a JSON command's result) from a pipe of its own."""

    def __init__(self, command: list[str], cwd: Path, terminal: bool = False):
        env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
        env.pop(API_SERVER_ENV, None)
        env.pop(VERBOSE_ENV, None)  # quiet, as a user runs it
        self.chunks: dict[int, list[bytes]] = {}
        if terminal:
            reader, writer = pty.openpty()
            fcntl.ioctl(writer, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
            out_reader, out_writer = os.pipe()
        else:
            reader, writer = os.pipe()
            out_reader, out_writer = reader, writer
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out_writer,
            stderr=writer,
            start_new_session=True,
        )
        self.readers = sorted({reader, out_reader})
        for descriptor in {writer, out_writer}:
            os.close(descriptor)
        self.threads = [
            threading.Thread(target=self._read, args=(descriptor,), daemon=True)
            for descriptor in self.readers
        ]
        for thread in self.threads:
            thread.start()
        self.stdout_reader = out_reader if terminal else None

    def _read(self, reader: int) -> None:
        chunks = self.chunks.setdefault(reader, [])
        while True:
            try:
                chunk = os.read(reader, 65536)
            except OSError:  # a pseudo-terminal whose every writer closed
                return
            if not chunk:
                return
            chunks.append(chunk)

    def finish(self, timeout: float) -> tuple[int, str, str]:
        """Exit code, the output (stderr, with stdout unless ``terminal``) and the separate
        stdout ("" unless ``terminal``); a hung command is killed with all its processes."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            code = self.process.wait()
        for thread in self.threads:
            thread.join(timeout=30)  # Ray's processes may hold the output a moment longer
        texts = {}
        for reader in self.readers:
            os.close(reader)
            data = b"".join(self.chunks.get(reader, []))
            texts[reader] = data.decode(errors="replace").replace("\r\n", "\n")
        stdout = texts.pop(self.stdout_reader) if self.stdout_reader is not None else ""
        return code, "".join(texts.values()), stdout


@pytest.mark.timeout(TIMEOUT_S + 120)
def test_two_commands_side_by_side_each_on_its_own_ray(training_prepared, tmp_path, ray_local):
    """Issue 12: with 2 local CPUs a trial's driver (0.01), its Train worker (1) and its Ray Data
    read task (1) never fit at once and the search hung forever; it must finish. Issue 15: beside
    the session's Ray, a search and a training run start a local Ray each; Ray Train's
    placement-group cleaner in each must find its own instance (no "multiple active Ray
    instances" traceback), every placement group is freed, and the console shows our progress:
    lines on a pipe, a bar on a terminal."""
    config_file = tmp_path / "search.yaml"
    config_file.write_text(SEARCH_YAML)
    search_command = [
        sys.executable, "-c", TWO_CORE_TUNE, "tune",
        "--config", str(config_file), "--data", training_prepared, "--output", "search",
        "--image-size", str(TILE), "--tile-size", str(TILE), "--workers", "1",
        "--encoder-weights", "none", "--min-steps-per-epoch", "1", "--warmup-epochs", "0",
        "--num-samples", "1", "--max-epochs", "1",
    ]  # fmt: skip
    training_command = [
        UNET_RAY, "train", "--data", training_prepared, "--output", "run",
        "--image-size", str(TILE), "--tile-size", str(TILE), "--epochs", "2",
        "--batch-size", "2", "--workers", "1", "--scheduler", "constant",
        "--max-lr", "0.05", "--warmup-epochs", "0", "--min-steps-per-epoch", "1",
        "--elastic-probability", "0", "--encoder-weights", "none", "--mpp", "0.5",
    ]  # fmt: skip
    search = Command(search_command, cwd=tmp_path)
    training = Command(training_command, cwd=tmp_path, terminal=True)
    search_code, search_log, _ = search.finish(TIMEOUT_S)
    training_code, training_log, training_stdout = training.finish(TIMEOUT_S)

    assert search_code == 0, search_log[-4000:]
    assert training_code == 0, training_log[-4000:]
    (tmp_path / "search.log").write_text(search_log)
    (tmp_path / "training.log").write_text(training_log)
    for log in (search_log, training_log):
        for sign in TRACEBACK_SIGNS:
            assert sign not in log, log[max(0, log.find(sign) - 2000) : log.find(sign) + 3000]
        assert log.count("Ray's own logs:") == 1  # quiet console: where Ray's logs are, once
        assert "row/s]" not in log  # no Ray Data progress bar (quiet unless --verbose)
        assert "exclude_resources" not in log  # no deprecation warning from our shard options
    rows = list(csv.DictReader((tmp_path / "search" / "trials.csv").read_text().splitlines()))
    assert len(rows) == 1 and all(row["error"] == "" for row in rows)
    assert "placement groups: " in search_log and ", 0 still reserved" in search_log
    assert "Trial status" not in search_log  # Tune's status tables only with --verbose
    # not a terminal: one line per epoch of the trial
    assert search_log.count("[unet_ray] epoch 1/1 ") == 1

    # a terminal: one bar for the epochs, each epoch's line once (above it), then the result
    with open(tmp_path / "run" / "metrics.csv") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2"]
    assert [training_log.count(f"[unet_ray] epoch {epoch}/2 ") for epoch in (1, 2)] == [1, 1]
    bar_states = [line for line in training_log.split("\n") if "[unet_ray] train" in line]
    assert bar_states, training_log[-4000:]
    last_state = bar_states[-1].split("\r")[-1]
    assert "2/2" in last_state and "100%" in last_state and "val_f1" in last_state
    # `unet-ray train ... > result.json` gives a parseable file (issue 23): stdout is exactly one
    # JSON object; the human lines (dashboard, outputs, Ray's logs) are on stderr
    summary = json.loads(training_stdout)
    assert summary["best_checkpoint"] == str(tmp_path / "run" / "best")
    assert training_log.count("[unet_ray] Ray dashboard: http://127.0.0.1:") == 1
    assert f"outputs in {tmp_path / 'run'}" in training_log
    info = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert info["config"]["data"]["mpp"] == 0.5  # --mpp recorded for segment and slides
    assert info["input"]["mpp"] == 0.5 and info["input"]["side_multiple"] == 32
    assert info["unet_ray_version"] == __version__
