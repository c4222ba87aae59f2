"""Starting and quieting Ray: ``init_ray`` (local Ray or the cluster in RAY_ADDRESS, token
authentication kept on), the console's log levels (``--verbose``), the worker set-up hook that
every Ray worker process runs, and the state-API address. Nothing here knows about nuclei; every
job (prepare, train, tune, segment) starts Ray through ``init_ray``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import tempfile
from typing import Any

logger = logging.getLogger(__name__)

API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's state API clients find the dashboard
PROGRESS_NOTICE_KEY = "ray_data_progress_manager_disabled"  # Ray Data's log_once key
VERBOSE_ENV = "UNET_RAY_VERBOSE"  # "1": Ray's progress bars and INFO lines on the console


def is_verbose() -> bool:
    """Whether Ray's own progress bars and INFO lines are shown (``--verbose`` sets it)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_ray_logging() -> None:
    """Unless verbose: Ray Data's progress bars off and Ray's INFO lines kept out of the console
    (this process's and, through ``ray.init(logging_config=...)``, the workers'); they stay in
    Ray's session log folder. Our own progress lines are plain prints and still show."""
    if is_verbose():
        return
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    quiet_worker_logging()


def _skip_progress_bar_notice() -> None:
    """Ray Data warns once per process that progress bars are off; we turned them off on
    purpose (``--verbose`` turns them on), so mark that warning as given."""
    from ray.util.debug import log_once

    log_once(PROGRESS_NOTICE_KEY)


# Ray loggers whose warnings are transient noise on an overloaded machine: unless verbose their
# records below ERROR are demoted to DEBUG, which Ray Train's console handler drops and its log
# files keep.
TRANSIENT_RAY_LOGGERS = (
    # Ray Train's controller registers its resources with the autoscaling coordinator; when the
    # CPU is overloaded the request times out, is sent again, and is logged with a traceback
    # that Ray itself calls "safe to ignore" if transient (seen with a load average of 27 here)
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",
)


QUIET_WORKER_HOOK = "unet_ray.runtime.cluster.quiet_worker_logging"  # worker_process_setup_hook


class DemoteToDebug(logging.Filter):
    """A logger filter that lowers records below ERROR to DEBUG. A filter, not a level: Ray Train
    configures its ``ray.train`` loggers with ``dictConfig``, which resets the levels (not the
    filters) of the loggers below it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def quiet_worker_logging() -> None:
    """In a Ray worker (and the driver): Ray's INFO lines (Ray Train logs one per report, Ray
    Data one per execution and write, some under loggers named by file path) go to Ray's log
    files, not the console, and so do the ``TRANSIENT_RAY_LOGGERS``' warnings. Every worker
    process of a quiet run calls it as it starts (``QUIET_WORKER_HOOK``)."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("ray") or f"{os.sep}ray{os.sep}" in name:
            logging.getLogger(name).setLevel(logging.WARNING)
    for name in TRANSIENT_RAY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(one, DemoteToDebug) for one in logger.filters):
            logger.addFilter(DemoteToDebug())
    _skip_progress_bar_notice()


def init_ray(min_cpus: int = 1) -> None:
    """Connect to RAY_ADDRESS when set (a cluster, `ray job submit`); otherwise start local Ray
    with at least ``min_cpus`` logical CPUs, so that e.g. two training workers on a 2-core laptop
    still leave a CPU for Ray Data instead of waiting for one forever. Quiet unless verbose
    (``quiet_ray_logging``); says once where Ray's own logs are."""
    import ray

    quiet_ray_logging()
    if ray.is_initialized():
        return
    with root_logging_kept():
        _start_or_connect(ray, min_cpus)
    # on stderr: stdout is the command's own result (train's JSON)
    api_server = os.environ.get(API_SERVER_ENV)
    if api_server:
        print(f"[unet_ray] Ray dashboard: {api_server}", file=sys.stderr, flush=True)
    if not is_verbose():
        quiet_ray_logging()  # ray.init configured Ray's loggers anew
        print(
            f"[unet_ray] Ray's own logs: {ray_log_folder()} (--verbose shows them)",
            file=sys.stderr,
            flush=True,
        )


@contextlib.contextmanager
def root_logging_kept():
    """The root logger's level and handlers as they were: ``ray.init(logging_config=...)`` sets
    the root logger to Ray's level (WARNING when quiet, so our own INFO lines vanished once Ray
    had started) and adds Ray's handler beside ours (so every warning printed twice). Ray's own
    loggers keep what Ray gave them."""
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    try:
        yield
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


def _start_or_connect(ray, min_cpus: int) -> None:
    logging_config = None if is_verbose() else ray.LoggingConfig(log_level="WARNING")
    if os.environ.get("RAY_ADDRESS"):
        # the cluster's own state API, named for every worker of this job as for local Ray below
        # (a machine may run several clusters, e.g. `ray start` beside a local Ray)
        api_server = os.environ.get(API_SERVER_ENV) or cluster_api_server(os.environ["RAY_ADDRESS"])
        if api_server:
            os.environ[API_SERVER_ENV] = api_server
        runtime_env = worker_runtime_env(api_server)
        ray.init(logging_config=logging_config, runtime_env=runtime_env or None)
    else:
        # Ray Train's placement-group cleaner (an actor) asks the state API, served by the
        # dashboard, without an address: with two local Ray instances on one machine it finds
        # both and gives up. Its address, passed to every worker, names ours.
        with dashboard_port_lock():  # two commands starting at once never pick the same port
            dashboard_port = DASHBOARD_PORT if port_is_free(DASHBOARD_PORT) else free_port()
            api_server = f"http://127.0.0.1:{dashboard_port}"
            os.environ[API_SERVER_ENV] = api_server
            ray.init(
                address="local",  # a new instance of our own, never another command's local Ray
                num_cpus=max(os.cpu_count() or 1, min_cpus),
                logging_config=logging_config,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=dashboard_port,
                runtime_env=worker_runtime_env(api_server),
            )


def worker_runtime_env(api_server: str | None) -> dict[str, Any]:
    """What every worker process of our Ray needs: the state API's address (``API_SERVER_ENV``)
    and, unless verbose, the hook that quiets Ray's console logging as the process starts."""
    runtime_env: dict[str, Any] = {}
    if api_server:
        runtime_env["env_vars"] = {API_SERVER_ENV: api_server}
    if not is_verbose():
        runtime_env["worker_process_setup_hook"] = QUIET_WORKER_HOOK
    return runtime_env


def cluster_api_server(address: str) -> str | None:
    """The state API's URL (the dashboard) of the cluster at a GCS ``address``, as Ray's job
    client finds it; None for a Ray Client address or when the cluster does not say."""
    if address.startswith("ray://"):
        return None
    from ray.dashboard.utils import ray_address_to_api_server_url

    try:
        return ray_address_to_api_server_url(address)
    except Exception as error:  # no dashboard, or not reachable: Ray's own lookup stays
        logger.debug("no state API address for %s: %s", address, error)
        return None


DASHBOARD_PORT = 8265  # Ray's usual dashboard port: local Ray uses it when free
PORT_LOCK_FILE = os.path.join(tempfile.gettempdir(), "unet_ray_dashboard_port.lock")


@contextlib.contextmanager
def dashboard_port_lock():
    """Held while a command picks its dashboard port and starts Ray (the dashboard listens
    once ``ray.init`` returns), so that commands started together take different ports."""
    import fcntl

    with open(PORT_LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def port_is_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port`` now (bindable, as Ray checks it)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ray_log_folder() -> str:
    """The log folder of this Ray session (``/tmp/ray/session_*/logs`` on local Ray)."""
    import ray

    try:
        return ray._private.worker.global_worker.node.get_logs_dir_path()
    except AttributeError:  # private API moved: point at Ray's default place
        return os.path.join(tempfile.gettempdir(), "ray", "session_latest", "logs")


# ----------------------------------------------------------------------------- strict --gpu


def on_cluster() -> bool:
    """Whether this job runs on a Ray cluster (RAY_ADDRESS, `ray job submit`), which may add GPU
    nodes (autoscaling), rather than on local Ray, which has what this machine has."""
    return bool(os.environ.get("RAY_ADDRESS"))


def check_gpu_count(
    needed: float, cluster: dict[str, float], cluster_job: bool, per_what: str, fix: str
) -> None:
    """``--gpu`` asking for ``needed`` GPUs (``per_what``: e.g. "one GPU per worker") of a Ray
    cluster whose resources are ``cluster``. Too few on local Ray is a usage error
    (``ValueError``, exit 2, before any work: Ray would wait for them forever), naming why this
    machine has none when torch sees no CUDA; on a cluster a warning (an autoscaler may add
    GPU nodes)."""
    gpus = float(cluster.get("GPU", 0))
    if gpus + GPU_EPSILON >= needed:
        return
    message = f"--gpu needs {per_what}, {needed:g} in all, but the Ray cluster has {gpus:g}"
    if cluster_job:
        logger.warning("%s: the job waits until the cluster has them", message)
        return
    from unet_ray.inference import cuda_problem

    problem = cuda_problem()
    reason = f" ({problem.removeprefix('--gpu was given but ')})" if problem else ""
    raise ValueError(f"{message}{reason}: drop --gpu or {fix}")


GPU_EPSILON = 1e-6  # Ray counts fractional GPUs in units of 1e-4


def check_local_cuda(use_gpu: bool) -> None:
    """``--gpu`` on local Ray: the workers run on this machine with this torch, so a torch that
    sees no CUDA device is a usage error here and now (``inference.GpuUnavailableError``, exit
    2), never a CPU fall-back. On a cluster the driver may sit on a CPU node: each worker and
    actor checks for itself there (a failed run or failed rows naming the reason)."""
    if not use_gpu or on_cluster():
        return
    from unet_ray.inference import select_device

    select_device(True)


def check_gpu_request(use_gpu: bool, needed: float, per_what: str, fix: str) -> None:
    """Both strict ``--gpu`` checks against the running Ray: enough GPUs
    (``check_gpu_count``), then CUDA in this process's torch on local Ray
    (``check_local_cuda``)."""
    if not use_gpu:
        return
    import ray

    check_gpu_count(needed, ray.cluster_resources(), on_cluster(), per_what, fix)
    check_local_cuda(use_gpu)
