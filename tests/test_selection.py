"""The best checkpoint is chosen by a validation metric (`--best-metric`), by default an instance
metric: planted epoch histories where pixel F1, DSB score and F1@0.5 peak at different epochs."""

import pytest

from unet_ray.cli import build_parser, config_from_args
from unet_ray.core.config import BEST_METRICS, Config
from unet_ray.pipelines.train_loop import BEST_SCORE_METRIC, LEGACY_SEARCH_METRIC, _record_epoch

# (pixel_f1, dsb_score, f1_50) per epoch: the young model of `make demo` scores well on pixels
# while it merges nuclei (epoch 2), then counts them better (epochs 3 and 4)
PLANTED = [
    (0.40, 0.00, 0.00),
    (0.70, 0.04, 0.25),  # pixel F1's best
    (0.66, 0.27, 0.57),  # DSB score's best
    (0.65, 0.26, 0.60),  # F1@0.5's best
]
PLANTED_BEST = {"pixel_f1": 2, "dsb_score": 3, "f1_50": 4}


def run_epochs(planted, best_metric):
    state = {"epoch": 0, "history": []}
    best_epochs = []
    for epoch, (pixel_f1, dsb, f1_50) in enumerate(planted):
        summary = {
            "loss": 0.1,
            "pixel_f1": pixel_f1,
            "pixel_iou": pixel_f1 / (2 - pixel_f1),
            "dsb_score": dsb,
            "f1_50": f1_50,
            "n_images": 3,
        }
        metrics, is_best = _record_epoch(state, epoch, 0.1, 0.5, summary, 0.0, best_metric)
        if is_best:
            best_epochs.append(metrics["epoch"])
    return state, best_epochs


@pytest.mark.parametrize("best_metric", BEST_METRICS)
def test_the_selection_metric_picks_its_planted_best_epoch(best_metric):
    state, best_epochs = run_epochs(PLANTED, best_metric)
    assert best_epochs[-1] == PLANTED_BEST[best_metric]
    column = {"pixel_f1": 0, "dsb_score": 1, "f1_50": 2}[best_metric]
    running = [max(row[column] for row in PLANTED[: epoch + 1]) for epoch in range(len(PLANTED))]
    assert [row[BEST_SCORE_METRIC] for row in state["history"]] == running  # what ASHA compares
    # searches started before `best_metric` ranked by the running best pixel F1: still reported,
    # whatever the run selects by, so their restored schedulers find it
    assert [row[LEGACY_SEARCH_METRIC] for row in state["history"]] == [0.40, 0.70, 0.70, 0.70]


def test_the_default_is_the_dsb_score_and_ties_go_to_pixel_f1():
    assert Config().train.best_metric == "dsb_score"
    # DSB 0.0 for the first three epochs (no nucleus matched yet): the best pixel F1 of them
    _, best_epochs = run_epochs([(0.3, 0.0, 0.0), (0.6, 0.0, 0.0), (0.5, 0.0, 0.0)], "dsb_score")
    assert best_epochs == [1, 2]


def test_the_flag_sets_it_and_an_unknown_metric_is_refused():
    args = build_parser().parse_args(["train", "--best-metric", "f1_50"])
    assert config_from_args(args).train.best_metric == "f1_50"
    with pytest.raises(ValueError, match="train.best_metric 'loss' is not one of"):
        Config.from_dict({"train": {"best_metric": "loss"}})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--best-metric", "loss"])
