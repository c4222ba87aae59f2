"""Node loss on a multi-node Ray cluster started here (``ray.cluster_utils.Cluster``: one raylet
per node, each with its own CPUs): a training run and a segmentation job lose a node mid-way and
a new node joins.

Run in a pytest session of its own (`make test` runs this file after the main suite): the cluster
is this session's only Ray, while the main suite's session keeps its one local Ray
(``conftest.ray_local``). The head has no CPUs, so every worker and actor runs on a node that can
be removed; the driver (this process) stays attached to the head.
"""

from __future__ import annotations

import csv
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_train import make_config  # tests/ is on sys.path (pytest's rootdir conftest)

from unet_ray import io
from unet_ray.core.config import Config, InstanceConfig, SegmentConfig
from unet_ray.runtime.cluster import API_SERVER_ENV, free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]
TILE = 64
NODE_CPUS = 1
NODES = 3  # training: 2 workers + 1 CPU for Ray Data, one CPU per node
# notice a lost node within seconds, not the default 30 s (a SIGKILLed raylet sends no goodbye)
FAST_FAILURE_DETECTION = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 3,
}


@pytest.fixture(scope="module")
def cluster():
    """A head without CPUs (driver, Train controller, Ray Data's coordinator) and the dashboard,
    and ``NODES`` one-CPU nodes, which tests replace. Every node's processes are told the
    cluster's own state API address (other Ray instances may run on this machine)."""
    import ray
    from ray.cluster_utils import Cluster

    dashboard_port = free_port()
    saved = os.environ.get(API_SERVER_ENV)
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{dashboard_port}"  # inherited by the raylets
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port,
            "dashboard_agent_listen_port": free_port(),
            "_system_config": FAST_FAILURE_DETECTION,
        },
    )
    ray.init(address=cluster.address, log_to_driver=True)
    try:
        add_nodes(cluster, NODES)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop(API_SERVER_ENV, None)
        else:
            os.environ[API_SERVER_ENV] = saved


def add_nodes(cluster, count: int) -> list:
    """``count`` one-CPU nodes, started together."""
    nodes = [cluster.add_node(wait=False, num_cpus=NODE_CPUS) for _ in range(count)]
    cluster.wait_for_nodes()
    return nodes


def replace_node(cluster, node_id: str):
    """Kill every process of the worker node ``node_id`` (as a lost spot instance), then add a
    fresh node of the same size; returns the new node."""
    [node] = [node for node in cluster.worker_nodes if node.node_id == node_id]
    cluster.remove_node(node, allow_graceful=False)
    return add_nodes(cluster, 1)[0]


def in_background(target) -> tuple[threading.Thread, list[BaseException]]:
    """Run ``target`` in a thread; its exception, if any, lands in the returned list."""
    errors: list[BaseException] = []

    def run():
        try:
            target()
        except BaseException as error:  # re-raised by the test's main thread
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {seconds} s")
        time.sleep(0.1)


@pytest.mark.timeout(900)
def test_training_survives_losing_a_worker_node(cluster, training_root, tmp_path):
    """2 workers on 2 of 3 one-CPU nodes. Once epoch 1's checkpoint is registered, the last rank
    stops at the start of epoch 2 (fault drill, ``hold``) and names its node; that node is
    killed, a new one joins, and the run resumes from exactly epoch 1's checkpoint to the end."""
    from unet_ray.pipelines.data import prepare_dataset
    from unet_ray.pipelines.train import run_training
    from unet_ray.pipelines.train_loop import read_history

    prepared = str(tmp_path / "prepared")
    prepare_dataset(str(training_root), prepared, tile_size=TILE, val_fraction=0.25, seed=0)
    output, marker = tmp_path / "run", tmp_path / "held"
    config = make_config(prepared, output, max_failures=1)  # test_train's small run
    # training runs in a thread; this (main) thread changes the cluster, as Ray's Cluster
    # must (starting a node installs signal handlers)
    runs: list = []
    thread, errors = in_background(
        lambda: runs.append(
            run_training(config, fault_injection={"epoch": 2, "marker": str(marker), "hold": True})
        )
    )
    wait_for(lambda: marker.exists() or not thread.is_alive(), 600, "the held rank's marker")
    assert not errors, errors
    lost = marker.read_text().strip()
    assert len(read_history(str(output))) == 1  # mid-run: epoch 1 done, epoch 2 not
    replace_node(cluster, lost)
    thread.join(timeout=600)
    assert not thread.is_alive(), "training did not end within 600 s of the node loss"
    assert not errors, errors
    [result] = runs
    assert lost not in {node.node_id for node in cluster.worker_nodes}
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert result.run_starts == [0, 1]  # restarted once, from epoch 1's checkpoint
    resumes = result.state["resumes"]
    assert [resume["epoch"] for resume in resumes] == [1]
    assert resumes[0]["digest"] == result.state["digests"]["1"]  # bit for bit
    with open(output / "metrics.csv") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2"]
    # the instance search after training ran on the one-CPU nodes (one worker's shape)
    assert result.threshold_search["split"] == "val"
    assert (output / "best" / "model.pt").is_file()


def segment_actor_node(timeout: float = 300) -> str:
    """The node id of the live segmentation (inference) actor, from Ray's state API."""
    from ray.util.state import list_actors

    found: list[str] = []

    def alive_actor() -> bool:
        actors = list_actors(
            filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False
        )
        found[:] = [actor.node_id for actor in actors if "SegmentActor" in actor.class_name]
        return bool(found)

    wait_for(alive_actor, timeout, "a live SegmentActor")
    return found[0]


@pytest.mark.timeout(900)
def test_segmentation_survives_losing_the_actors_node(cluster, tmp_path):
    """One inference actor on one of three one-CPU nodes. Once the first image is written, while
    a large image is being segmented, the actor's node is killed and a new node joins: every
    input ends ok or error in the manifest (none missing), and a rerun completes the rest."""
    import torch

    from unet_ray.core.model import UNetVGG16BN
    from unet_ray.io.checkpoint import save_checkpoint
    from unet_ray.io.synth import generate_sample
    from unet_ray.io.writers import output_names
    from unet_ray.pipelines.segment import run_segmentation

    torch.manual_seed(0)
    checkpoint = str(tmp_path / "checkpoint")
    save_checkpoint(checkpoint, UNetVGG16BN(), Config().to_dict(), {})
    inputs, output = tmp_path / "in", tmp_path / "out"
    rng = np.random.default_rng(0)
    # in order: a small image, a large one (seconds of CPU: the actor is busy with it when its
    # node goes), then more small ones
    sides = {"a_first": 96, "b_large": 2048, "c_next": 96, "d_next": 128, "e_last": 96}
    for name, side in sides.items():
        image, _ = generate_sample(rng, side, side, "fluorescence")
        io.write_bytes_atomic(str(inputs / f"{name}.png"), io.encode_png(image))
    segment = SegmentConfig(tile=256, overlap=32, batch_size=4, workers=1)

    summaries: list = []
    thread, errors = in_background(
        lambda: summaries.append(
            run_segmentation(checkpoint, str(inputs), str(output), segment, InstanceConfig())
        )
    )
    # the inference actor lives from the job's start to its end: find its node first, so that
    # a slow state API cannot make the lookup miss a job that is already ending
    lost = segment_actor_node()
    first = output / output_names("a_first")["overlay"]
    wait_for(lambda: first.exists() or not thread.is_alive(), 600, "the first image's outputs")
    assert not errors, errors
    written = {path.name for path in output.iterdir()}
    # mid-job: the large image is not written yet, and no manifest either
    assert output_names("b_large")["overlay"] not in written
    assert "manifest.csv" not in written
    replace_node(cluster, lost)
    thread.join(timeout=600)
    assert not thread.is_alive(), "the job did not end within 600 s of the node loss"
    assert not errors, errors
    [summary] = summaries
    manifest = read_manifest(output / "manifest.csv")
    assert sorted(manifest) == sorted(f"{name}.png" for name in sides)  # none missing
    assert {row["status"] for row in manifest.values()} <= {"ok", "error"}
    assert summary.ok + summary.error == len(sides)
    for name, row in manifest.items():  # ok means all five outputs are there
        if row["status"] == "ok":
            stem = Path(name).stem
            assert all((output / out).is_file() for out in output_names(stem).values())

    rerun = run_segmentation(checkpoint, str(inputs), str(output), segment, InstanceConfig())
    assert (rerun.error, rerun.ok + rerun.skipped) == (0, len(sides))
    assert rerun.skipped == summary.ok  # what the first run finished is not redone
    statuses = {row["status"] for row in read_manifest(output / "manifest.csv").values()}
    assert statuses <= {"ok", "skipped"}


def read_manifest(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as handle:
        return {Path(row["input"]).name: row for row in csv.DictReader(handle)}
