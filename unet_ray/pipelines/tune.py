"""Hyperparameter search on Ray Tune: each trial a Ray Train run; Optuna TPE + ASHA on the best
validation score (``train.best_metric``)."""

from __future__ import annotations

import copy
import csv
import dataclasses
import io as _bytes_io
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import yaml

from unet_ray import io
from unet_ray.core.config import Config
from unet_ray.io.checkpoint import CONFIG_FILE, MODEL_FILE, record_encoder_weights
from unet_ray.pipelines.thresholds import describe_search, search_checkpoint_task
from unet_ray.pipelines.train import build_trainer, required_cpus, resolve_training_data
from unet_ray.pipelines.train_loop import BEST_DIR, BEST_SCORE_METRIC, score_metric
from unet_ray.runtime.cluster import (
    API_SERVER_ENV,
    check_gpu_request,
    init_ray,
    is_verbose,
    quiet_ray_logging,
)

logger = logging.getLogger(__name__)

EXPERIMENT_NAME = "ray_tune"  # Tune's experiment folder under OUTPUT; same OUTPUT -> restore
TRIALS_DIR = "trials"  # OUTPUT/trials/<trial_id>/: each trial's own train outputs
TRIALS_CSV = "trials.csv"
TRIALS_PNG = "trials.png"
BEST_YAML = "best.yaml"
TRIAL_DRIVER_CPUS = 0.01  # the trial function only starts a TorchTrainer and waits (Tune refuses 0)
# What ASHA's rungs and Optuna compare: each trial's best validation score so far, of the metric
# train.best_metric names (train_loop reports it every epoch). The current score would be unfair: the rungs fall at epochs 2, 4, 8, 16,
# where the cyclic schedule is at its minimum learning rate and a warm restart is not, so one
# schedule would be culled systematically; and Optuna would learn from a trial's last epoch.
SEARCH_METRIC = BEST_SCORE_METRIC  # "best_val_score"
# (search-space key, config section, field)
SEARCH_KEYS = (
    ("scheduler", "train", "scheduler"),
    ("max_lr", "train", "max_lr"),
    ("batch_size", "train", "batch_size"),
    ("loss", "train", "loss"),
    ("decoder_batchnorm", "model", "decoder_batchnorm"),
    ("elastic_probability", "data", "elastic_probability"),
)


@dataclass
class TuneSummary:
    output: str
    rows: list[dict[str, Any]]  # one per trial, best validation score first
    table: str  # the same as a markdown table
    best_config: Config


def build_search_space(config: Config) -> dict[str, Any]:
    """Scheduler and batch size from lists, max lr log-uniform; loss, decoder batch-norm and
    elastic probability join the search when their lists in the `tune` section are not empty.
    Batch sizes that do not divide by the workers are left out (each worker gets an equal share)."""
    from ray import tune

    search = config.tune
    workers = config.train.workers
    batch_sizes = [size for size in search.batch_sizes if size % workers == 0]
    if not batch_sizes:
        raise ValueError(
            f"none of tune.batch_sizes {list(search.batch_sizes)} divides by --workers {workers}: "
            f"list multiples of {workers} in the tune section of --config"
        )
    space: dict[str, Any] = {
        "scheduler": tune.choice(list(search.schedulers)),
        "max_lr": tune.loguniform(search.max_lr_min, search.max_lr_max),
        "batch_size": tune.choice(batch_sizes),
    }
    for key, values in (
        ("loss", search.losses),
        ("decoder_batchnorm", search.decoder_batchnorm),
        ("elastic_probability", search.elastic_probabilities),
    ):
        if values:
            space[key] = tune.choice(list(values))
    return space


def trial_config(base: dict[str, Any], sampled: dict[str, Any], output: str) -> Config:
    """The full config of one trial: the base with the sampled values and the trial's output."""
    values = copy.deepcopy(base)
    for key, section, field_name in SEARCH_KEYS:
        if key in sampled:
            values[section][field_name] = sampled[key]
    values["train"]["output"] = output
    values["train"]["epochs"] = values["tune"]["max_epochs"]
    return Config.from_dict(values)


def run_trial(trial: dict[str, Any]) -> None:
    """Tune's function trainable: one Ray Train run, reporting every epoch through the callback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    quiet_ray_logging()  # this trial's Ray Data progress bars and INFO lines, unless verbose
    trial_id = tune.get_context().get_trial_id()
    output = io.join_uri(trial["output"], TRIALS_DIR, trial_id)
    config = trial_config(trial["base"], trial["sampled"], output)
    io.make_dirs(output)
    result = build_trainer(
        config,
        trial["prepared"],
        callbacks=[TuneReportCallback()],
        gpus_per_worker=gpus_per_worker(config),
    ).fit()
    if result.error is not None:
        raise RuntimeError(f"trial {trial_id} failed: {result.error}") from result.error


def gpus_per_worker(config: Config) -> float:
    """GPUs each training worker of a trial holds with ``--gpu``: one, or with
    ``--gpus-per-trial G`` the trial's ``G`` shared among its workers (``G`` below one lets
    several small-batch trials share a GPU; DDP ranks of one trial cannot share one)."""
    shared = config.tune.gpus_per_trial
    workers = config.train.workers
    if shared == 0:
        return 1.0
    if shared < 0:
        raise ValueError(f"--gpus-per-trial {shared:g} must be positive (0: one per worker)")
    if workers > 1 and shared / workers < 1:
        raise ValueError(
            f"--gpus-per-trial {shared:g} gives each of the {workers} workers of a trial less "
            "than a GPU, and DDP ranks cannot share one: use --workers 1 or at least "
            f"--gpus-per-trial {workers}"
        )
    return shared / workers


def trial_gpus(config: Config) -> float:
    """GPUs one trial holds (0 without ``--gpu``)."""
    return gpus_per_worker(config) * config.train.workers if config.train.use_gpu else 0.0


def trial_cpus(config: Config) -> float:
    """CPUs one trial holds: its driver's fraction, its Train workers' and one for Ray Data."""
    return TRIAL_DRIVER_CPUS + required_cpus(config)


def required_search_cpus(config: Config) -> int:
    """Logical CPUs a local Ray needs for the search: every trial that runs at once gets all it
    holds, so no Ray Data task waits forever for a CPU that a trial's driver keeps a sliver of."""
    return math.ceil(max(1, config.tune.max_concurrent) * trial_cpus(config))


def max_concurrent_trials(config: Config, cluster: dict[str, float]) -> int:
    """Trials that fit at once: each needs its driver's CPU fraction, its Train workers'
    CPUs/GPUs and one CPU for data."""
    if config.tune.max_concurrent > 0:
        return config.tune.max_concurrent
    train = config.train
    cpus_per_trial = trial_cpus(config)
    # Ray counts resources in units of 1e-4; the rounding keeps e.g. 4.02 // 2.01 at 2
    fits = math.floor(round(cluster.get("CPU", 1) / cpus_per_trial, 6))
    if train.use_gpu:
        fits = min(fits, math.floor(round(cluster.get("GPU", 0) / trial_gpus(config), 6)))
    if fits < 1:
        raise ValueError(
            f"one trial needs {cpus_per_trial} CPUs"
            + (f" and {trial_gpus(config):g} GPUs" if train.use_gpu else "")
            + f" but the cluster has {cluster}; lower --workers"
        )
    return fits


def build_asha(config: Config):
    """ASHA early stopping, or None when no rung falls before the last epoch (no early stopping).

    At each rung (grace period x reduction factor^k epochs) a trial below the top
    1/reduction_factor of those that reached the rung before it is stopped. The rungs lie before
    the last epoch and ASHA never stops a trial there (``stop_last_trials=False``): a trial that
    reached its last epoch ends by itself, so its Train run writes its last outputs and releases
    its placement group. A trial that Tune stops leaves that to Ray Train's PlacementGroupCleaner,
    which asks the state API first.
    """
    from ray.tune.schedulers import ASHAScheduler

    last_rung = config.tune.max_epochs - 1
    if config.tune.grace_period > last_rung:
        return None
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=SEARCH_METRIC,
        mode="max",
        max_t=last_rung,
        grace_period=config.tune.grace_period,
        reduction_factor=config.tune.reduction_factor,
        stop_last_trials=False,
    )


def build_search_algorithm(config: Config):
    """Optuna's TPE sampler, seeded, told each finished trial's best validation score."""
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(metric=SEARCH_METRIC, mode="max", seed=config.tune.seed)


def build_tuner(config: Config, prepared: str):
    """A new Tuner, or the interrupted one restored when OUTPUT already holds this experiment."""
    import ray
    from ray import tune

    output = config.train.output
    filesystem, storage_path = io.resolve_filesystem(output)
    storage_filesystem = filesystem if io.is_s3(output) else None
    trainable = tune.with_resources(run_trial, {"CPU": TRIAL_DRIVER_CPUS})
    experiment_path = f"{storage_path.rstrip('/')}/{EXPERIMENT_NAME}"
    if tune.Tuner.can_restore(experiment_path, storage_filesystem=storage_filesystem):
        logger.info("resuming the interrupted search in %s", experiment_path)
        return tune.Tuner.restore(
            experiment_path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=storage_filesystem,
        )
    concurrent = max_concurrent_trials(config, ray.cluster_resources())
    logger.info("searching %d trials, %d at a time", config.tune.num_samples, concurrent)
    return tune.Tuner(
        trainable,
        param_space={
            "sampled": build_search_space(config),
            "base": config.to_dict(),
            "output": output,
            "prepared": prepared,
        },
        tune_config=tune.TuneConfig(
            search_alg=build_search_algorithm(config),
            scheduler=build_asha(config),
            num_samples=config.tune.num_samples,
            max_concurrent_trials=concurrent,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT_NAME,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=tune.FailureConfig(max_failures=1),
            # Tune's status tables only with --verbose: the console shows our epoch lines and,
            # at the end, our table of the trials
            verbose=None if is_verbose() else 0,
        ),
    )


STATE_API_TIMEOUT_S = 10


def state_api_problem() -> str:
    """Why Ray's state API cannot be reached, or "" when it can.

    Ray Train V2 releases the placement group of a run whose controller died (a trial that ASHA
    stopped, or one that crashed) only after asking the state API, which the dashboard serves;
    without it the stopped trials' CPUs and GPUs stay reserved until the search ends. Asks the
    connected cluster's own state API (several local Ray instances may run on one machine).
    """
    import ray
    from ray.util.state import list_nodes

    address = os.environ.get(API_SERVER_ENV) or ray.get_runtime_context().gcs_address
    try:
        list_nodes(address=address, limit=1, timeout=STATE_API_TIMEOUT_S)
    except Exception as error:  # the state API raises several types, all meaning "unreachable"
        message = str(error).strip()
        return message.splitlines()[0] if message else type(error).__name__
    return ""


def run_tuning(config: Config) -> TuneSummary:
    """Prepare the data once, run (or resume) the search, write the tables, plot and best config.

    Before any work: OUTPUT must be writable, and the encoder weights are resolved once (an
    offline machine without them is exit 2, not a crash in every trial) and recorded, so every
    trial's workers check theirs against the same SHA-256 prefix."""
    io.check_writable(config.train.output)
    build_search_space(config)  # batch sizes that fit the workers, before Ray starts
    gpus_per_worker(config)  # a --gpus-per-trial that cannot work, before Ray starts
    config = dataclasses.replace(config, model=record_encoder_weights(config.model))
    init_ray(required_search_cpus(config))
    check_gpu_request(
        config.train.use_gpu,
        trial_gpus(config),
        "the GPUs of one trial",
        "lower --workers or --gpus-per-trial",
    )
    problem = state_api_problem()
    if problem:
        logger.warning(
            "Ray's state API (served by the dashboard) is unreachable (%s): trials that ASHA "
            "stops will keep their CPUs/GPUs reserved until the search ends. Start Ray with the "
            "dashboard (install ray[default]; do not pass --include-dashboard=false).",
            problem,
        )
    io.make_dirs(config.train.output)
    prepared = resolve_training_data(config)
    results = build_tuner(config, prepared).fit()
    rows = summarise_trials(results, config.tune.max_epochs, config.train.best_metric)
    if not rows or rows[0]["best_val_score"] is None:
        raise RuntimeError(f"no trial of the search in {config.train.output} reported a result")
    return write_tune_outputs(config, prepared, rows, results)


def summarise_trials(results, max_epochs: int, best_metric: str) -> list[dict[str, Any]]:
    """One row per trial (sampled values, best and last validation score of ``best_metric``,
    epochs), best first."""
    rows, key = [], score_metric(best_metric)
    for result in results:
        history = result.metrics_dataframe
        scores = [] if history is None or key not in history else list(history[key])
        sampled = result.config["sampled"]
        rows.append(
            {
                "trial_id": _trial_id(result),
                **{key: sampled.get(key) for key, _, _ in SEARCH_KEYS if key in sampled},
                "best_metric": best_metric,
                "best_val_score": max(scores) if scores else None,
                "last_val_score": scores[-1] if scores else None,
                "epochs": len(scores),
                "stopped_early": bool(scores) and len(scores) < max_epochs and result.error is None,
                "error": "" if result.error is None else error_message(result.error),
                "curve": scores,
            }
        )
    rows.sort(
        key=lambda row: -1.0 if row["best_val_score"] is None else row["best_val_score"],
        reverse=True,
    )
    return rows


ERROR_MESSAGE_CHARS = 200  # the trials table's error column holds one line of this length


def error_message(error: BaseException) -> str:
    """One line saying why a trial failed: the trial's own exception, not Ray's wrapper (whose
    first line is only "ray::ImplicitFunc.train() (pid=..., ip=...)")."""
    cause = getattr(error, "cause", None) or error  # a RayTaskError carries the raised exception
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"[:ERROR_MESSAGE_CHARS]


def _trial_id(result) -> str:
    return str(result.metrics.get("trial_id") or result.path.rstrip("/").split("/")[-1])


def write_tune_outputs(config: Config, prepared: str, rows, results) -> TuneSummary:
    output = config.train.output
    best = rows[0]
    best_config = trial_config(config.to_dict(), best, io.join_uri(output, "best_run"))
    best_config.data.source = prepared
    io.write_bytes_atomic(
        io.join_uri(output, BEST_YAML),
        yaml.safe_dump(best_config.to_dict(), sort_keys=False).encode(),
    )
    io.write_bytes_atomic(io.join_uri(output, TRIALS_CSV), trials_csv(rows).encode())
    io.write_bytes_atomic(io.join_uri(output, TRIALS_PNG), plot_trials(rows))
    trial_best = io.join_uri(output, TRIALS_DIR, best["trial_id"], BEST_DIR)
    for name in (MODEL_FILE, CONFIG_FILE):
        io.write_bytes_atomic(
            io.join_uri(output, BEST_DIR, name), io.read_bytes(io.join_uri(trial_best, name))
        )
    if config.train.search_instances:  # the winner's instance settings, on its validation images
        record = search_checkpoint_task(
            io.join_uri(output, BEST_DIR),
            prepared,
            config.train.use_gpu,
            config.train.cpus_per_worker,
            metric=config.train.best_metric,
        )
        logger.info(describe_search(record))
    return TuneSummary(output=output, rows=rows, table=trials_table(rows), best_config=best_config)


TABLE_COLUMNS = (
    "trial_id",
    "scheduler",
    "max_lr",
    "batch_size",
    "best_metric",
    "best_val_score",
    "last_val_score",
    "epochs",
    "stopped_early",
)


def _columns(rows) -> list[str]:
    extra = [key for key, _, _ in SEARCH_KEYS[3:] if key in rows[0]]
    return [*TABLE_COLUMNS[:4], *extra, *TABLE_COLUMNS[4:], "error"]


def trials_csv(rows) -> str:
    text = _bytes_io.StringIO()
    writer = csv.DictWriter(text, fieldnames=_columns(rows), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def trials_table(rows) -> str:
    columns = _columns(rows)[:-1]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_format_cell(row.get(column)) for column in columns) + " |")
    return "\n".join(lines)


def _format_cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def plot_trials(rows) -> bytes:
    """Each trial's validation score (its ``best_metric``) against epochs, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if row["curve"]:
            label = f"{row['trial_id']}: {row.get('scheduler')}, lr {row.get('max_lr', math.nan):.3g}, bs {row.get('batch_size')}"
            axes.plot(range(1, len(row["curve"]) + 1), row["curve"], "o-", label=label)
    axes.set_xlabel("epoch")
    axes.set_ylabel(f"validation {rows[0]['best_metric']}" if rows else "validation score")
    axes.set_ylim(0, 1)
    axes.legend(fontsize=7)
    figure.tight_layout()
    buffer = _bytes_io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
