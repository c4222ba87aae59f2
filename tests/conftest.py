"""Shared fixtures: one local Ray instance and one real S3 endpoint (moto server) per test session.

The session is isolated from the machine it runs on (`pytest_configure`, before any test module
imports Ray or torch): a fresh local Ray, never a running cluster named by RAY_ADDRESS; a random
Ray auth token in RAY_AUTH_TOKEN, so nothing reads or writes ~/.ray/auth_token; an empty
TORCH_HOME and no downloads, so a machine's torch hub cache or network never changes a test's
outcome. Ray's worker processes inherit all of it.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import socket
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

RAY_TEST_CPUS = (
    8  # logical CPUs on a 2-core machine: train workers, Tune trials and Ray Data fit together
)
# Environment variables the session sets for itself (None: removed), restored afterwards.
_ISOLATED_ENV_KEYS = (
    "RAY_ADDRESS",  # an inherited address would attach the tests to someone's cluster
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",  # Ray reads this before RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token
    "RAY_AUTH_TOKEN_PATH",
    "RAY_USAGE_STATS_ENABLED",
    "TORCH_HOME",
    "UNET_RAY_NO_DOWNLOAD",  # unet_ray.io.checkpoint: never download the ImageNet encoder weights
)
_saved_env: dict[str, str | None] = {}
_torch_home: str | None = None
# Test files that start a Ray cluster of their own: they need a pytest session (a process) of
# their own, since the suite's session already holds its local Ray. Collected only when named
# on the command line (`make test` runs them after the main suite).
OWN_SESSION_FILES = ("test_node_loss.py",)


def pytest_ignore_collect(collection_path, config):
    if collection_path.name not in OWN_SESSION_FILES:
        return None
    named = any(collection_path.name in str(arg) for arg in config.args)
    return None if named else True


def pytest_report_header(config):
    return f"run in sessions of their own: {', '.join(OWN_SESSION_FILES)} (see the Makefile)"


def pytest_configure(config):
    """Isolate the session's environment before test modules import Ray or torch."""
    global _torch_home
    _saved_env.update({key: os.environ.get(key) for key in _ISOLATED_ENV_KEYS})
    _torch_home = tempfile.mkdtemp(prefix="unet_ray_torch_home_")
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.update(
        {
            "RAY_AUTH_MODE": "token",  # as users run it: authentication on
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
            "TORCH_HOME": _torch_home,
            "UNET_RAY_NO_DOWNLOAD": "1",
        }
    )


def pytest_unconfigure(config):
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_env.clear()
    if _torch_home:
        shutil.rmtree(_torch_home, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real HTTP S3 endpoint on 127.0.0.1; AWS_* variables point every client at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {key: os.environ.get(key) for key in _S3_ENV}
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


_S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket on the session's S3 endpoint; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_endpoint, tmp_path_factory):
    """A new local Ray instance for the whole session (started after the S3 variables are set,
    so every Ray worker process inherits them); never a running cluster."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    dashboard_port = _free_port()
    ray.init(
        address="local",
        num_cpus=RAY_TEST_CPUS,
        # with the dashboard, as users run it: Ray Train's PlacementGroupCleaner asks the state
        # API (served by the dashboard) whether a controller died, and only then releases the
        # placement group of a run whose driver or Tune trial was killed. Its workers are told
        # which dashboard is theirs (as unet_ray.runtime.cluster.init_ray does), since tests start other
        # local Ray instances beside this one.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}},
        log_to_driver=True,
        configure_logging=False,
        _temp_dir=None,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthetic DSB2018-layout dataset (64-160 px images) shared by the session."""
    from unet_ray.io.synth import write_synthetic_dataset

    root = tmp_path_factory.mktemp("synth") / "stage1_train"
    write_synthetic_dataset(root, count=12, seed=7, min_side=64, max_side=160)
    return root


@pytest.fixture(scope="session")
def training_root(tmp_path_factory):
    """A smaller synthetic set (6 images of 64-128 px, about 15 tiles of 64 px) for the Ray Train
    and Tune tests, whose every epoch costs real CPU time."""
    from unet_ray.io.synth import write_synthetic_dataset

    root = tmp_path_factory.mktemp("synth_training") / "stage1_train"
    write_synthetic_dataset(root, count=6, seed=7, min_side=64, max_side=128)
    return root


TRAINING_TILE = 64  # tile and crop side of the Ray Train and Tune tests


@pytest.fixture(scope="session")
def training_prepared(ray_local, training_root, tmp_path_factory) -> str:
    """``training_root`` prepared once (64-px tiles, a quarter of the images for validation) for
    every training and search test of the session; they only read it."""
    from unet_ray.pipelines.data import prepare_dataset

    output = str(tmp_path_factory.mktemp("training_prepared"))
    prepare_dataset(str(training_root), output, tile_size=TRAINING_TILE, val_fraction=0.25, seed=0)
    return output


BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_benchmark_module(name: str):
    """Import benchmarks/<name>.py (the folder is not a package; its modules import each other)."""
    if str(BENCHMARKS_DIR) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS_DIR))
    spec = importlib.util.spec_from_file_location(
        f"benchmarks_{name}", BENCHMARKS_DIR / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("run")``: a benchmark script as a module."""
    return _load_benchmark_module
