"""Ray Tune search: trials, ASHA early stopping, result files, resume after interruption."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unet_ray.cli import build_parser, config_from_args, tune_config_from_args
from unet_ray.core.config import Config
from unet_ray.pipelines.train_loop import score_metric
from unet_ray.pipelines.tune import (
    EXPERIMENT_NAME,
    SEARCH_METRIC,
    build_asha,
    build_search_algorithm,
    build_search_space,
    build_tuner,
    max_concurrent_trials,
    required_search_cpus,
    run_tuning,
    state_api_problem,
    summarise_trials,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
TILE = 64


@pytest.fixture
def prepared(training_prepared) -> str:
    return training_prepared


SEARCH_YAML = """
data:
  elastic_probability: 0.0
tune:
  grace_period: 1
  reduction_factor: 2
  max_lr_min: 0.0001
  max_lr_max: 0.2
  batch_sizes: [2, 4]
  seed: 0
"""
TRIALS, EPOCHS = 2, 2  # one trial interrupted and resumed, one run after the restore


def created_placement_groups() -> set[str]:
    import ray

    table = ray.util.placement_group_table()
    return {group for group, info in table.items() if info["state"] == "CREATED"}


def wait_for(condition, seconds: float, message) -> None:
    """Poll ``condition`` until it holds; after ``seconds`` fail with ``message()``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"after {seconds} s: {message()}")
        time.sleep(0.5)


def test_trials_never_oversubscribe_the_cluster():
    config = Config.from_dict({"train": {"workers": 2}})
    # (0.01 driver + 2 workers + 1 data CPU) per trial
    assert max_concurrent_trials(config, {"CPU": 8.0}) == 2
    assert max_concurrent_trials(config, {"CPU": 6.02}) == 2
    # 2 x (1 worker + 1 data CPU) = 4 CPUs would leave the second trial's Ray Data 0.98 of a CPU
    one_worker = Config.from_dict({"train": {"workers": 1}})
    assert max_concurrent_trials(one_worker, {"CPU": 4.0}) == 1
    gpu = Config.from_dict({"train": {"workers": 2, "use_gpu": True}})
    assert max_concurrent_trials(gpu, {"CPU": 64.0, "GPU": 4.0}) == 2
    with pytest.raises(ValueError, match="lower --workers"):
        max_concurrent_trials(Config.from_dict({"train": {"workers": 4}}), {"CPU": 2.0})


def test_local_ray_holds_every_concurrent_trial():
    """`unet-ray tune` starts local Ray with at least this many CPUs; one 1-worker trial holds
    2.01 of them, so a 2-core laptop's 2 would leave its Ray Data waiting forever."""
    one_worker = Config.from_dict({"train": {"workers": 1}})
    assert required_search_cpus(one_worker) == 3
    assert max_concurrent_trials(one_worker, {"CPU": 3.0}) == 1
    two_at_once = Config.from_dict({"train": {"workers": 2}, "tune": {"max_concurrent": 2}})
    assert required_search_cpus(two_at_once) == 7  # ceil(2 x 3.01)


def test_search_algorithm_is_seeded_optuna(ray_local, tmp_path):
    """The Tuner that `unet-ray tune` builds samples with Optuna's TPE, seeded from the config,
    and both Optuna and ASHA compare trials on the best-so-far validation F1."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    config = Config.from_dict({"train": {"output": str(tmp_path)}, "tune": {"seed": 7}})
    tuner = build_tuner(config, prepared=str(tmp_path / "prepared"))
    tune_config = tuner._local_tuner._tune_config  # Tuner has no public accessor
    assert isinstance(tune_config.search_alg, OptunaSearch)
    assert tune_config.search_alg._seed == 7
    assert tune_config.search_alg.metric == SEARCH_METRIC
    assert isinstance(tune_config.scheduler, ASHAScheduler)
    assert tune_config.scheduler.metric == SEARCH_METRIC

    def first_suggestions(seed: int) -> list[dict]:
        seeded = Config.from_dict({"tune": {"seed": seed}})
        searcher = build_search_algorithm(seeded)
        searcher.set_search_properties(
            SEARCH_METRIC, "max", {"sampled": build_search_space(seeded)}
        )
        return [searcher.suggest(f"trial_{index}") for index in range(3)]

    assert first_suggestions(7) == first_suggestions(7)
    assert first_suggestions(7) != first_suggestions(8)


# Scripted validation F1 per epoch (None: the trial crashes). The cyclic-like curves dip at the
# rung epochs 2 and 4, where a cyclic schedule sits at its minimum learning rate, yet their best
# so far is the highest; the steady curve is genuinely worse (it never reaches their best).
SCRIPTED_CURVES = {
    "cyclic-a": [0.50, 0.30, 0.70, 0.40, 0.80, 0.50, 0.85, 0.55],
    "steady-worse": [0.40, 0.45, 0.48, 0.50, 0.52, 0.53, 0.54, 0.55],
    "cyclic-b": [0.55, 0.35, 0.72, 0.45, 0.78, 0.50, 0.84, 0.60],
    "crashes": [0.60, None],
}
SCRIPTED_EPOCHS = 8  # ASHA rungs at epochs 2 and 4 (grace period 2, reduction factor 2)


FINALISE_S = 1.0  # what train.py does after its last report: plots, best checkpoint, shutdown


def make_scripted_trainable(curves: dict[str, list], event_log: Path):
    """A function trainable that reports a fixed F1 curve the way train.py's epochs do, and
    appends "started NAME" and, once it has finalised after its last report, "finished NAME"
    to ``event_log``."""

    def scripted_trainable(trial):
        import time

        from ray import tune

        name = trial["sampled"]["scheduler"]
        with open(event_log, "a") as log:
            log.write(f"started {name}\n")
        best = 0.0
        for f1 in curves[name]:
            if f1 is None:
                raise RuntimeError("scripted crash")
            best = max(best, f1)
            tune.report({score_metric("dsb_score"): f1, SEARCH_METRIC: best})
        time.sleep(FINALISE_S)
        with open(event_log, "a") as log:
            log.write(f"finished {name}\n")

    return scripted_trainable  # defined in a function so Ray pickles it by value


def test_no_early_stopping_without_a_rung_before_the_last_epoch():
    for max_epochs in (1, 2):  # the default grace period is 2 epochs
        assert build_asha(Config.from_dict({"tune": {"max_epochs": max_epochs}})) is None
    assert build_asha(Config.from_dict({"tune": {"max_epochs": 3}})) is not None


def test_asha_stops_the_worse_trial_not_the_dipping_ones(ray_local, tmp_path):
    """The product's ASHA, fed scripted curves one trial after another: the steady trial below
    the cyclic ones' best at the first rung is stopped there; the cyclic ones, whose current F1
    at each rung is below the steady trial's, run to the end and finish by themselves; a crash
    is not an early stop."""
    from ray import tune

    event_log = tmp_path / "events.txt"
    config = Config.from_dict({"tune": {"max_epochs": SCRIPTED_EPOCHS}})
    assert (config.tune.grace_period, config.tune.reduction_factor) == (2, 2)
    tuner = tune.Tuner(
        make_scripted_trainable(SCRIPTED_CURVES, event_log),
        param_space={"sampled": {"scheduler": tune.grid_search(list(SCRIPTED_CURVES))}},
        tune_config=tune.TuneConfig(scheduler=build_asha(config), max_concurrent_trials=1),
        run_config=tune.RunConfig(name="scripted", storage_path=str(tmp_path), verbose=0),
    )
    results = tuner.fit()

    events = event_log.read_text().splitlines()
    # one at a time, in this order: ASHA's outcome depends on who reaches a rung first
    assert [event.split()[1] for event in events if event.startswith("started")] == list(
        SCRIPTED_CURVES
    )
    rows = {
        row["scheduler"]: row for row in summarise_trials(results, SCRIPTED_EPOCHS, "dsb_score")
    }
    worse = rows["steady-worse"]
    assert worse["epochs"] == config.tune.grace_period < SCRIPTED_EPOCHS  # stopped at rung 1
    assert worse["stopped_early"] and worse["error"] == ""
    for name in ("cyclic-a", "cyclic-b"):
        assert rows[name]["epochs"] == SCRIPTED_EPOCHS and not rows[name]["stopped_early"]
        assert rows[name]["error"] == ""
    # not stopped at the last epoch either: they finalised (train.py: outputs, placement group)
    assert {event for event in events if event.startswith("finished")} == {
        "finished cyclic-a",
        "finished cyclic-b",
    }
    crashed = rows["crashes"]
    assert crashed["epochs"] == 1 < SCRIPTED_EPOCHS
    assert not crashed["stopped_early"]
    assert crashed["error"] == "RuntimeError: scripted crash"


def test_state_api_that_frees_stopped_trials_is_reachable(ray_local):
    """The session's Ray runs the dashboard like users' Ray does, so `unet-ray tune` finds the
    state API that Ray Train needs to release a stopped trial's placement group."""
    assert state_api_problem() == ""


@pytest.mark.timeout(900)  # 3 short Ray Train runs: 90-350 s on a 2-core machine
def test_interrupted_search_resumes_and_writes_results(prepared, tmp_path, ray_local):
    """A search started as a job is killed mid-way; the same command again resumes it (Tuner
    restore), finishes every trial with ASHA stopping some early, and writes the results."""
    config_file = tmp_path / "search.yaml"
    config_file.write_text(SEARCH_YAML)
    output = tmp_path / "search"
    flags = [
        "--config", str(config_file), "--data", prepared, "--output", str(output),
        "--image-size", str(TILE), "--workers", "1", "--encoder-weights", "none",
        "--min-steps-per-epoch", "1", "--warmup-epochs", "0",
        "--num-samples", str(TRIALS), "--max-epochs", str(EPOCHS),
        # one trial at a time: a 4-CPU test cluster then always has CPUs left for Ray Data,
        # even while the killed run's placement groups are still being cleaned up
        "--max-concurrent", "1",
    ]  # fmt: skip
    created_before = created_placement_groups()  # other tests' runs may still hold some
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    driver = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "tune.py"), *flags], env=env, start_new_session=True
    )
    trials = output / "trials"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(trials.glob("*/metrics.csv")):
            time.sleep(1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    started = {path.name for path in trials.iterdir()}
    assert started and not (output / "trials.csv").exists()  # really interrupted mid-search
    time.sleep(2)

    args = build_parser().parse_args(["tune", *flags])
    summary = run_tuning(tune_config_from_args(args, config_from_args(args)))

    assert (output / EXPERIMENT_NAME).is_dir()
    assert started <= {row["trial_id"] for row in summary.rows}  # continued, not replaced
    rows = list(csv.DictReader((output / "trials.csv").read_text().splitlines()))
    assert len(rows) == TRIALS
    scores = [float(row["best_val_score"]) for row in rows]
    assert scores == sorted(scores, reverse=True)  # sorted by best validation score
    assert {row["best_metric"] for row in rows} == {"dsb_score"}  # the default --best-metric
    assert {row["scheduler"] for row in rows} <= {"warm-restart", "cyclic"}
    assert {int(row["batch_size"]) for row in rows} <= {2, 4}
    # whether ASHA stops one of these real trials depends on their noisy curves: the stopping
    # rule itself is shown with scripted curves (test_asha_stops_the_worse_trial_...); here
    # every trial ran cleanly and "stopped early" means exactly "fewer epochs than the maximum"
    assert all(row["error"] == "" for row in rows)
    for row in rows:
        assert 1 <= int(row["epochs"]) <= EPOCHS
        assert (row["stopped_early"] == "True") == (int(row["epochs"]) < EPOCHS)
    assert (output / "trials.png").read_bytes()[:4] == b"\x89PNG"
    assert (output / "best" / "model.pt").exists()
    assert summary.table.startswith("| trial_id")
    # best.yaml is a config `unet-ray train --config` accepts, holding the best trial's values
    best = build_parser().parse_args(
        ["train", "--config", str(output / "best.yaml"), "--epochs", "1"]
    )
    config = config_from_args(best)
    assert config.train.scheduler == rows[0]["scheduler"]
    assert config.train.max_lr == pytest.approx(float(rows[0]["max_lr"]))
    assert config.train.epochs == 1
    # trials stopped by ASHA and the killed search give their CPUs back to the cluster (Ray
    # Train's cleaner releases a dead run's placement group asynchronously, once the state API
    # says its controller died)
    wait_for(
        lambda: created_placement_groups() <= created_before,
        seconds=60,
        message=lambda: (
            f"still reserved: {created_placement_groups() - created_before}; "
            f"state API: {state_api_problem() or 'reachable'}"
        ),
    )


def test_batch_sizes_that_do_not_divide_by_the_workers_are_left_out():
    base = Config.from_dict({"train": {"workers": 8, "batch_size": 8}})
    space = build_search_space(base)
    assert sorted(space["batch_size"].categories) == [8, 16]  # 4 over 8 workers is left out
    three = Config.from_dict({"train": {"workers": 3, "batch_size": 6}})
    with pytest.raises(ValueError, match=r"none of tune.batch_sizes \[4, 8, 16\] divides by"):
        build_search_space(three)
