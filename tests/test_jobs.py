"""`ray job submit -- python jobs/train.py --smoke-test` against a cluster started with `ray start`."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_hub_encoder_weights(torch_home: Path) -> Path:
    """A torchvision vgg16_bn ``features.*`` state dict (random values) where torch's hub cache
    keeps the ImageNet file, so the job's default ``--encoder-weights imagenet`` never downloads."""
    import torch
    import torchvision

    url = torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1.url
    path = torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True)
    features = torchvision.models.vgg16_bn(weights=None).features.state_dict()
    torch.save({f"features.{key}": value for key, value in features.items()}, path)
    return path


@pytest.fixture
def ray_head(tmp_path):
    """A separate local cluster (`ray start --head --block`), token authentication on; stopped after.

    Its token is its own, in RAY_AUTH_TOKEN for the head and the job client alike: nothing reads
    or writes ~/.ray/auth_token. Its TORCH_HOME is its own too, holding stand-in encoder weights."""
    dashboard_port = _free_port()
    torch_home = tmp_path / "torch_home"
    write_hub_encoder_weights(torch_home)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # `python` in the job is this venv's
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "TORCH_HOME": str(torch_home),
    }
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    # every port explicit and free: the session's own local Ray already holds Ray's default ones
    ports = [
        f"--{name}={_free_port()}"
        for name in (
            "port",
            "ray-client-server-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
        )
    ]
    log = tmp_path / "ray_start.log"
    # a short folder: Ray's socket paths under it must stay within AF_UNIX's 107 bytes
    temp_dir = tempfile.mkdtemp(prefix="rayjob_", dir="/tmp")
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            *ports,
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_dashboard(address, head, log)
        yield address, env
    finally:
        _stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop(head: subprocess.Popen) -> None:
    """SIGKILL to `ray start --block` and its process group: Ray's daemons share that group and
    their workers die with their raylet (kernel fate-sharing). A graceful stop (SIGINT) waited
    on each process in turn and took up to 60 s on a loaded machine."""
    if head.poll() is None:
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=60)


def _wait_for_dashboard(address: str, head: subprocess.Popen, log: Path, seconds: float = 120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(
                f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # an answer, e.g. 401 without the token: it is up
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the Ray dashboard at {address} did not come up in {seconds} s")


def _get_status(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


NO_AGENT_YET = "No available agent to submit job"
AGENT_WAIT_S = 120  # how long a freshly started node's job agent may take to register


# a cluster start (up to 120 s), the job (up to 600 s) and the stop (up to 60 s); about 1 min on
# an idle 2-core machine, 4-5 min on a loaded one
@pytest.mark.timeout(900)
def test_job_submit_smoke_test(ray_head):
    address, env = ray_head
    # the cluster refuses a client without its token and serves one with it
    assert _get_status(f"{address}/api/version") == 401
    assert _get_status(f"{address}/api/version", token="wrong") == 403
    assert _get_status(f"{address}/api/version", token=env["RAY_AUTH_TOKEN"]) == 200
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO)]
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        completed = subprocess.run(
            [*submit, "--", "python", "jobs/train.py", "--smoke-test"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        output = completed.stdout + completed.stderr
        # the dashboard answers before the node's job agent has registered with it; the server
        # says so ("try again later") and accepts the job once the agent is there
        if NO_AGENT_YET not in output or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert completed.returncode == 0, output[-4000:]
    assert "succeeded" in output
    assert "val_pixel_f1" in output  # the job printed its best metrics
    # this machine runs two clusters (the session's local Ray and this one): the job tells its
    # workers its own cluster's state API (unet_ray.runtime.cluster.init_ray), so Ray Train's
    # placement-group cleaner never gives up on "multiple active Ray instances"
    assert "Found multiple active Ray instances" not in output
