"""Offline checks of cluster.yaml (Ray's own autoscaler validation) and k8s/rayjob.yaml (KubeRay)."""

from __future__ import annotations

import argparse
import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from unet_ray.cli import build_parser, config_from_args

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_CONFIG_PATH = REPOSITORY_ROOT / "cluster.yaml"
RAYJOB_MANIFEST_PATH = REPOSITORY_ROOT / "k8s" / "rayjob.yaml"
CONSTRAINTS_PATH = REPOSITORY_ROOT / "constraints.txt"

PROJECT_MOUNT = "~/unet_ray"
AUTH_TOKEN_PATH = "~/.ray/auth_token"
RAY_IMAGE_REPOSITORY = "rayproject/ray"
SUBMIT_COMMAND = "ray job submit "
GPU_RESOURCE_K8S = "nvidia.com/gpu"
# EC2 instance families with NVIDIA GPUs (the part of the type before the dot).
GPU_INSTANCE_FAMILIES = ("g4dn", "g5", "g6", "g6e", "gr6", "p3", "p4d", "p4de", "p5", "p5e")
# Train and tune also build a Config from their flags; segment has no Config of its own.
JOBS_WITH_TRAIN_CONFIG = ("train", "tune")
JOB_SCRIPT = re.compile(r"^jobs/(?P<name>train|tune|segment)\.py$")


# ----------------------------------------------------------------------------- helpers


def load_yaml(path: Path) -> dict:
    with open(path) as file:
        return yaml.safe_load(file)


def read_comment_commands(path: Path) -> list[str]:
    """Shell commands written in the file's comment lines, `\\` continuations joined."""
    commands, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            pending = ""
            continue
        text = pending + stripped.lstrip("#").strip()
        if text.endswith("\\"):
            pending = text[:-1].rstrip() + " "
        else:
            commands.append(text)
            pending = ""
    return commands


def find_job_commands(commands: list[str]) -> list[list[str]]:
    """The entrypoint of each `ray job submit ... -- python jobs/<name>.py ARGS`, from the script on."""
    job_argvs = []
    for command in commands:
        if not command.startswith(SUBMIT_COMMAND):
            continue
        tokens = shlex.split(command)
        entrypoint = tokens[tokens.index("--") + 1 :]
        assert entrypoint[0] == "python", f"`{command}` does not run a Python script"
        job_argvs.append(entrypoint[1:])
    return job_argvs


def parse_job_argv(job_argv: list[str]) -> argparse.Namespace:
    """Parse `jobs/<name>.py ARGS` with the `unet-ray <name>` parser (the jobs share its flags)."""
    match = JOB_SCRIPT.match(job_argv[0])
    assert match, f"{job_argv[0]!r} is not one of jobs/train.py, jobs/tune.py, jobs/segment.py"
    name = match.group("name")
    try:
        args = build_parser().parse_args([name, *job_argv[1:]])
    except SystemExit as error:
        pytest.fail(f"documented command `{shlex.join(job_argv)}` is rejected (exit {error.code})")
    if name in JOBS_WITH_TRAIN_CONFIG:
        config_from_args(args)  # raises on values the config rejects
    return args


def find_gpu_node_types(config: dict) -> dict[str, dict]:
    return {
        name: node_type
        for name, node_type in config["available_node_types"].items()
        if node_type["resources"].get("GPU", 0) > 0
    }


def read_locked_versions(path: Path) -> dict[str, str]:
    """`name==version` lines of a pip constraints file, by lower-case name."""
    versions = {}
    for line in path.read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            name, separator, version = requirement.partition("==")
            assert separator, f"{path.name}: {line!r} is not an exact `name==version` pin"
            versions[name.strip().lower()] = version.strip()
    return versions


@pytest.fixture(scope="module")
def locked_ray_version() -> str:
    return read_locked_versions(CONSTRAINTS_PATH)["ray"]


def assert_ray_image(image: str, ray_version: str) -> None:
    repository, _, tag = image.partition(":")
    assert repository == RAY_IMAGE_REPOSITORY, image
    assert tag.startswith(f"{ray_version}-"), f"{image} does not run the locked Ray {ray_version}"


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return load_yaml(CLUSTER_CONFIG_PATH)


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load_yaml(RAYJOB_MANIFEST_PATH)


@pytest.fixture(scope="module")
def head_group(rayjob) -> dict:
    return rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]


@pytest.fixture(scope="module")
def gpu_group(rayjob) -> dict:
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu_groups = [
        group
        for group in groups
        for container in group["template"]["spec"]["containers"]
        if GPU_RESOURCE_K8S in container["resources"].get("limits", {})
    ]
    assert len(gpu_groups) == 1, f"expected one GPU worker group, found {len(gpu_groups)}"
    return gpu_groups[0]


# ----------------------------------------------------------------------------- cluster.yaml


def test_cluster_config_passes_ray_validation(cluster_config):
    validate_config(copy.deepcopy(cluster_config))
    # What `ray up` does before it talks to AWS: merge the provider defaults, then validate.
    prepared = prepare_config(copy.deepcopy(cluster_config))
    validate_config(prepared)
    assert prepared["cluster_name"] == "unet-ray"
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["cache_stopped_nodes"] is False


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        pytest.param(
            lambda config: config.update(bogus_key=1), jsonschema.ValidationError, id="unknown-key"
        ),
        pytest.param(
            lambda config: config["available_node_types"]["head"].pop("resources"),
            jsonschema.ValidationError,
            id="node-type-without-resources",
        ),
        pytest.param(
            lambda config: config["available_node_types"]["head"]["resources"].update(CPU=-1),
            jsonschema.ValidationError,
            id="negative-resource",
        ),
        pytest.param(
            lambda config: config.update(head_node_type="no_such_type"),
            ValueError,
            id="unknown-head-type",
        ),
        pytest.param(
            lambda config: config["available_node_types"]["gpu_worker"].update(min_workers=99),
            ValueError,
            id="min-workers-over-max",
        ),
    ],
)
def test_ray_validation_rejects_broken_copies(cluster_config, mutate, error):
    broken = copy.deepcopy(cluster_config)
    mutate(broken)
    with pytest.raises(error):
        validate_config(broken)


def test_head_node_takes_no_training_work(cluster_config):
    head_type = cluster_config["head_node_type"]
    head = cluster_config["available_node_types"][head_type]
    assert head["resources"] == {"CPU": 0}
    assert head_type not in find_gpu_node_types(cluster_config)
    prepared = prepare_config(copy.deepcopy(cluster_config))
    assert prepared["available_node_types"][head_type]["max_workers"] == 0


def test_gpu_worker_group_autoscales_from_zero(cluster_config):
    gpu_types = find_gpu_node_types(cluster_config)
    assert len(gpu_types) == 1, f"expected one GPU worker group, found {sorted(gpu_types)}"
    (gpu_worker,) = gpu_types.values()
    assert gpu_worker["min_workers"] == 0 < gpu_worker["max_workers"]
    assert gpu_worker["max_workers"] <= cluster_config["max_workers"]
    instance_family = gpu_worker["node_config"]["InstanceType"].split(".")[0]
    assert instance_family in GPU_INSTANCE_FAMILIES


def test_every_node_type_shares_image_profile_and_disk(cluster_config):
    node_configs = [node["node_config"] for node in cluster_config["available_node_types"].values()]
    for key in ("ImageId", "IamInstanceProfile", "BlockDeviceMappings"):
        values = [node_config[key] for node_config in node_configs]
        assert all(value == values[0] for value in values), f"{key} differs between node types"


def test_setup_installs_the_mounted_project_on_every_node(cluster_config):
    local_project = REPOSITORY_ROOT / cluster_config["file_mounts"][PROJECT_MOUNT]
    pyproject = (local_project / "pyproject.toml").read_text()
    assert re.search(r'^name = "unet_ray"$', pyproject, re.MULTILINE), local_project
    install = f"pip install -c {PROJECT_MOUNT}/constraints.txt -e {PROJECT_MOUNT}"
    assert (local_project / "constraints.txt").is_file()
    prepared = prepare_config(copy.deepcopy(cluster_config))
    # `ray up` runs setup_commands before the head's and the workers' own setup commands.
    assert install in prepared["head_setup_commands"]
    assert install in prepared["worker_setup_commands"]


def test_start_commands_open_the_dashboard_and_join_the_head(cluster_config):
    head_start = " ".join(cluster_config["head_start_ray_commands"])
    assert "ray start --head" in head_start
    assert "--dashboard-host=0.0.0.0" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    worker_start = " ".join(cluster_config["worker_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in worker_start


def test_every_node_uses_token_authentication(cluster_config):
    assert "-e RAY_AUTH_MODE=token" in cluster_config["docker"]["run_options"]
    assert cluster_config["file_mounts"][AUTH_TOKEN_PATH] == AUTH_TOKEN_PATH


def test_installed_ray_is_the_locked_one(locked_ray_version):
    assert ray.__version__ == locked_ray_version, (
        f"Ray {ray.__version__} is installed but constraints.txt locks {locked_ray_version}: "
        "run `make venv` (or `make lock` after changing pyproject.toml)"
    )


def test_locked_versions_are_exact_pins():
    versions = read_locked_versions(CONSTRAINTS_PATH)
    assert {"ray", "torch", "torchvision", "pytest", "ruff"} <= versions.keys()
    assert "unet_ray" not in versions and "unet-ray" not in versions


def test_cluster_image_runs_the_locked_ray(cluster_config, locked_ray_version):
    image = cluster_config["docker"]["image"]
    assert_ray_image(image, locked_ray_version)
    assert image.endswith("-gpu")


def test_documented_job_commands_parse():
    job_argvs = find_job_commands(read_comment_commands(CLUSTER_CONFIG_PATH))
    assert sorted(argv[0] for argv in job_argvs) == [
        "jobs/segment.py",
        "jobs/train.py",
        "jobs/tune.py",
    ]
    for job_argv in job_argvs:
        args = parse_job_argv(job_argv)
        assert args.gpu is True, f"`{shlex.join(job_argv)}` does not ask for GPUs"


# ----------------------------------------------------------------------------- k8s/rayjob.yaml


def test_rayjob_is_a_kuberay_job_that_cleans_up(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"


def test_rayjob_entrypoint_runs_the_train_job_on_gpus(rayjob, gpu_group):
    tokens = shlex.split(rayjob["spec"]["entrypoint"])
    assert tokens[:2] == ["python", "jobs/train.py"]
    args = parse_job_argv(tokens[1:])
    assert args.gpu is True
    assert args.data.startswith("s3://") and args.output.startswith("s3://")
    (container,) = gpu_group["template"]["spec"]["containers"]
    gpus_per_pod = int(container["resources"]["limits"][GPU_RESOURCE_K8S])
    assert args.workers <= gpu_group["maxReplicas"] * gpus_per_pod


def test_rayjob_head_takes_no_training_work(head_group):
    assert head_group["rayStartParams"]["num-cpus"] == "0"
    assert head_group["rayStartParams"]["dashboard-host"] == "0.0.0.0"


def test_rayjob_start_params_are_strings(head_group, rayjob):
    # KubeRay's CRD types rayStartParams as map[string]string: a bare 0 would be rejected.
    groups = [head_group, *rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    for group in groups:
        for key, value in group["rayStartParams"].items():
            assert isinstance(value, str), f"rayStartParams.{key} = {value!r} is not a string"


def test_rayjob_gpu_group_autoscales(gpu_group):
    assert gpu_group["minReplicas"] == 0
    assert gpu_group["minReplicas"] <= gpu_group["replicas"] <= gpu_group["maxReplicas"]
    (container,) = gpu_group["template"]["spec"]["containers"]
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert int(limits[GPU_RESOURCE_K8S]) >= 1
    assert requests[GPU_RESOURCE_K8S] == limits[GPU_RESOURCE_K8S]


def test_rayjob_images_run_the_locked_ray(rayjob, locked_ray_version):
    cluster_spec = rayjob["spec"]["rayClusterSpec"]
    assert cluster_spec["rayVersion"] == locked_ray_version
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    images = [
        container["image"]
        for group in groups
        for container in group["template"]["spec"]["containers"]
    ]
    assert images
    for image in images:
        assert_ray_image(image, locked_ray_version)


def test_rayjob_runtime_env_provides_the_project(rayjob):
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    assert runtime_env["working_dir"]  # jobs/train.py must be in the job's working directory
    assert any(requirement.startswith("unet_ray @ ") for requirement in runtime_env["pip"])
