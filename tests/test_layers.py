"""The package's shape: what `make lint`'s import contracts cannot see.

import-linter (pyproject.toml, `lint-imports` in `make lint`) holds the layers, Ray above the
inference path and the import-cycle rule. These tests hold the rest: the command line answers
without loading torch or Ray, the worker set-up hook (a string Ray imports by name in every worker
process) names a real function, the io face stays out of io's own modules, and no module grows
past the size a reader can hold.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "unet_ray"
MAX_MODULE_LINES = 800
HEAVY = ("torch", "torchvision", "ray", "pyarrow", "albumentations")

LOADED_AFTER = """
import sys
from unet_ray.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print("LOADED", " ".join(sorted({{name.split(".")[0] for name in sys.modules}})))
"""


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["segment", "--help"], ["train", "--help"], ["tune", "--bad-flag"]],
    ids=["help", "segment-help", "train-help", "bad-flag"],
)
def test_the_command_line_answers_without_loading_torch_or_ray(argv):
    completed = subprocess.run(
        [sys.executable, "-c", LOADED_AFTER.format(argv=argv)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    last = completed.stdout.splitlines()[-1].split()
    assert last[0] == "LOADED"
    loaded = set(last[1:])
    assert "unet_ray" in loaded and "argparse" in loaded  # the command really ran
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


@pytest.mark.parametrize(
    "module", ["unet_ray.pipelines.segment", "unet_ray.pipelines.slide_regions"]
)
def test_post_processing_workers_import_their_job_module_without_torch(module):
    """Ray Data's CPU post-processing workers (``FinishImages``, ``FinishRegions``; up to 8 per
    GPU actor) import the job module to unpickle their class: torch would add ~650 MB each.
    Only the inference actors and the driver load the model, importing torch there."""
    completed = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    loaded = {name.split(".")[0] for name in completed.stdout.split()}
    assert "unet_ray" in loaded and "numpy" in loaded
    assert "torch" not in loaded and "torchvision" not in loaded


def test_the_worker_setup_hook_string_resolves_to_the_quieting_function():
    """Ray imports ``worker_process_setup_hook`` by its dotted name in every worker: a moved
    function would fail each worker at start-up, and nothing static checks a string."""
    from unet_ray.runtime.cluster import QUIET_WORKER_HOOK, quiet_worker_logging

    module_name, _, function_name = QUIET_WORKER_HOOK.rpartition(".")
    assert getattr(importlib.import_module(module_name), function_name) is quiet_worker_logging


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_io_module_imports_the_io_face():
    """``unet_ray/io/__init__.py`` imports files, images and dsb; one of them importing the face
    back would meet a half-initialised module."""
    offenders = {
        path.name
        for path in (PACKAGE / "io").glob("*.py")
        if path.name != "__init__.py" and "unet_ray.io" in imported_modules(path)
    }
    assert (PACKAGE / "io" / "__init__.py").exists()
    assert not offenders, offenders


def test_no_package_module_is_over_800_lines():
    sizes = {
        str(path.relative_to(PACKAGE)): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    assert len(sizes) > 20  # the walk found the package
    assert not {name: lines for name, lines in sizes.items() if lines > MAX_MODULE_LINES}
