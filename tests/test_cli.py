"""The command line's conventions (issue 23): --version, help with every default, -v/--verbose
before or after the subcommand and in jobs/*.py, inputs checked before anything heavy is loaded or
Ray starts, --config for segment and evaluate laid over the checkpoint's values."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from unet_ray import __version__
from unet_ray.cli import build_parser, configs_from_args, main
from unet_ray.cli_args import VERBOSE_ENV
from unet_ray.core.config import Config

ROOT = Path(__file__).resolve().parent.parent
JOBS = ("train", "tune", "segment")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"unet-ray {__version__}"
    assert __version__ != "0+unknown"  # the installed distribution's version was found


def test_every_flag_of_every_subcommand_has_help_that_names_its_default():
    """Every flag explains itself; every flag that takes a value says what it is when left out
    ("default"), from argparse's default, the config's or the help text."""
    missing_help, missing_default = [], []
    for name, parser in subcommands(build_parser()).items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            flag = f"{name} {action.option_strings[-1]}"
            if not action.help:
                missing_help.append(flag)
            elif action.nargs != 0 and "default" not in formatter._get_help_string(action):
                missing_default.append(flag)
    assert not missing_help, missing_help
    assert not missing_default, missing_default


def test_help_shows_defaults_from_the_config_and_from_argparse(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--epochs EPOCHS training epochs (default: 40)" in text
    assert "--max-lr MAX_LR maximum learning rate of the schedule (default: 0.4)" in text
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 512)" in text and "(default: 4096)" in text  # --tile, --region


@pytest.mark.parametrize(
    "argv, verbose",
    [
        (["-v", "segment", "c", "i", "o"], True),
        (["segment", "c", "i", "o", "-v"], True),
        (["segment", "--verbose", "c", "i", "o"], True),
        (["segment", "c", "i", "o"], False),
        (["--verbose", "evaluate", "c", "d"], True),
        (["export", "c", "out.pt", "-v"], True),
    ],
)
def test_verbose_is_taken_before_and_after_the_subcommand(argv, verbose):
    assert build_parser().parse_args(argv).verbose is verbose


def test_verbose_after_the_subcommand_reaches_ray_processes(tmp_path, monkeypatch, capsys):
    # setenv, not delenv: monkeypatch then removes what main() sets (an absent variable that
    # delenv found is not restored), so later tests and their subprocesses are not verbose
    monkeypatch.setenv(VERBOSE_ENV, "0")
    assert main(["train", "--config", str(tmp_path / "none.yaml"), "-v"]) == 2
    assert os.environ.get(VERBOSE_ENV) == "1"  # what runtime.cluster reads
    assert "does not exist" in capsys.readouterr().err


def test_matplotlib_info_lines_stay_off_a_quiet_console(monkeypatch):
    """Issue 23: a machine's first figure logged "generated new fontManager" at INFO."""
    import logging

    from unet_ray.cli_args import apply_verbose

    monkeypatch.setenv(VERBOSE_ENV, "0")
    plots = logging.getLogger("matplotlib")
    saved = plots.level
    try:
        apply_verbose(False)
        assert not plots.isEnabledFor(logging.INFO)
        apply_verbose(True)
        assert plots.isEnabledFor(logging.DEBUG)
    finally:
        plots.setLevel(saved)


RUN_AND_REPORT = """
import sys, time
started = time.time()
{call}
print("HEAVY", sorted({{"torch", "ray", "pyarrow"}} & set(sys.modules)), file=sys.stderr)
sys.exit(code)
"""


def run_python(call: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", RUN_AND_REPORT.format(call=call), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    "argv, named",
    [
        (["segment", "{missing}", "{tmp}", "{tmp}/out"], "checkpoint {missing} does not exist"),
        (["segment", "{tmp}", "{missing}", "{tmp}/out"], "input {missing} does not exist"),
        (["prepare", "{missing}", "{tmp}/prepared"], "source {missing} does not exist"),
        (["train", "--data", "{missing}"], "data {missing} does not exist"),
        (["tune", "--data", "{missing}"], "data {missing} does not exist"),
        (["evaluate", "{missing}", "{tmp}"], "checkpoint {missing} does not exist"),
        (["thresholds", "{tmp}", "{missing}"], "data {missing} does not exist"),
        (["export", "{missing}", "{tmp}/model.pt"], "checkpoint {missing} does not exist"),
    ],
    ids=[
        "segment-checkpoint",
        "segment-input",
        "prepare",
        "train",
        "tune",
        "evaluate",
        "thresholds",
        "export",
    ],
)
def test_a_missing_input_is_exit_2_before_torch_or_ray_is_loaded(tmp_path, argv, named):
    missing = str(tmp_path / "no_such_path")
    values = {"missing": missing, "tmp": str(tmp_path)}
    argv = [part.format(**values) for part in argv]
    completed = run_python("from unet_ray.cli import main\ncode = main(sys.argv[1:])", *argv)
    assert completed.returncode == 2, completed.stderr
    assert named.format(**values) in completed.stderr
    assert "HEAVY []" in completed.stderr  # neither torch, Ray nor pyarrow was even imported
    assert "Ray dashboard" not in completed.stderr + completed.stdout


@pytest.mark.parametrize("job", JOBS)
def test_jobs_take_verbose_and_refuse_a_missing_input_with_exit_2(tmp_path, job):
    missing = str(tmp_path / "no_such_path")
    argv = (
        [missing, str(tmp_path), str(tmp_path / "out")] if job == "segment" else ["--data", missing]
    )
    call = f"sys.path.insert(0, 'jobs')\nimport {job} as job\ncode = job.main(sys.argv[1:])"
    completed = run_python(call, *argv, "-v")
    assert completed.returncode == 2, completed.stderr
    assert f"{missing} does not exist" in completed.stderr
    assert "HEAVY" in completed.stderr


# ----------------------------------------------------------------------------- --config


def write_yaml(path: Path, values: dict) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_segment_config_file_sits_between_the_checkpoint_and_the_flags(tmp_path):
    """checkpoint (saved) < --config file < flags, key by key; keys the file leaves out keep
    the checkpoint's values (a searched threshold is not reset to the default)."""
    saved = Config.from_dict(
        {"instances": {"threshold": 0.7, "core_ratio": 0.9}, "segment": {"tta": True}}
    )
    config = write_yaml(
        tmp_path / "segment.yaml",
        {"segment": {"tile": 256, "batch_size": 2}, "instances": {"min_size": 30}},
    )
    parse = build_parser().parse_args
    segment, instances = configs_from_args(
        parse(["segment", "c", "i", "o", "--config", config]), saved
    )
    assert (segment.tile, segment.batch_size, segment.tta) == (256, 2, True)
    assert (instances.threshold, instances.core_ratio, instances.min_size) == (0.7, 0.9, 30)
    flags = ["segment", "c", "i", "o", "--config", config, "--tile", "128", "--threshold", "0.6"]
    segment, instances = configs_from_args(parse([*flags, "--no-tta", "--mpp", "0.25"]), saved)
    assert (segment.tile, segment.batch_size, segment.tta) == (128, 2, False)
    assert (instances.threshold, instances.min_size) == (0.6, 30)
    assert segment.image_mpp == 0.25  # --mpp: the whole images' pixel size
    segment, instances = configs_from_args(parse(["segment", "c", "i", "o"]), saved)
    assert (segment.tile, instances.threshold, segment.image_mpp) == (512, 0.7, None)


def test_a_config_file_with_an_unknown_key_is_exit_2_for_segment(tmp_path, capsys):
    config = write_yaml(tmp_path / "bad.yaml", {"segment": {"tiles": 256}})
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (tmp_path / "in").mkdir()
    argv = ["segment", str(checkpoint), str(tmp_path / "in"), str(tmp_path / "out")]
    assert main([*argv, "--config", config]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) ['tiles']" in err or "not a unet_ray checkpoint" in err


def test_evaluate_config_file_overrides_the_checkpoint_instances(tmp_path):
    from unet_ray.cli import instance_config_from_args

    saved = Config.from_dict({"instances": {"threshold": 0.7, "min_size": 20}}).instances
    config = write_yaml(tmp_path / "evaluate.yaml", {"instances": {"min_size": 5}})
    args = build_parser().parse_args(["evaluate", "c", "d", "--config", config])
    instances = instance_config_from_args(args, saved)
    assert (instances.threshold, instances.min_size) == (0.7, 5)
    args = build_parser().parse_args(["evaluate", "c", "d", "--config", config, "--min-size", "9"])
    assert instance_config_from_args(args, saved).min_size == 9


OWN_LINES_AFTER_RAY = """
import logging
from unet_ray.cli_args import apply_verbose
from unet_ray.runtime.cluster import init_ray
apply_verbose(False)
init_ray()
logging.getLogger("unet_ray.pipelines.train").info("OUR INFO LINE")
logging.getLogger("unet_ray.pipelines.train").warning("OUR WARNING LINE")
"""


@pytest.mark.ray
def test_our_log_lines_show_once_after_ray_starts_quietly():
    """Ray's quiet logging config set the root logger to WARNING (our INFO lines, e.g. the
    instance search's summary, vanished once Ray ran) and added its handler beside ours (every
    warning twice). A local Ray of its own, as a command starts it."""
    env = {
        key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", VERBOSE_ENV)
    }
    completed = subprocess.run(
        [sys.executable, "-c", OWN_LINES_AFTER_RAY],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stderr.count("OUR INFO LINE") == 1, completed.stderr[-3000:]
    assert completed.stderr.count("OUR WARNING LINE") == 1, completed.stderr[-3000:]
