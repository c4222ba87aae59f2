"""Fast checks of the benchmarks' pure helpers: FLOP counting, target checks, the results table."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from torch import nn


@pytest.fixture(scope="module")
def bench_flops(load_benchmark):
    return load_benchmark("bench_flops")


@pytest.fixture(scope="module")
def bench_train(load_benchmark):
    return load_benchmark("bench_train")


@pytest.fixture(scope="module")
def runner(load_benchmark):
    return load_benchmark("run")


def test_count_flops_of_one_convolution_matches_the_formula(bench_flops):
    with torch.device("meta"):
        conv = nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
    forward = bench_flops.count_flops(conv, (2, 3, 16, 16))
    assert forward == 2 * 2 * 8 * 3 * 9 * 16 * 16  # 2 FLOPs per multiply-add, per output pixel
    # backward of a leaf input: only the weight gradient, one more forward's worth
    assert bench_flops.count_flops(conv, (2, 3, 16, 16), backward=True) == 2 * forward


def test_model_flops_scale_with_pixels_and_training_costs_about_three_forwards(bench_flops):
    forward_64, training_64 = bench_flops.count_model_flops(64)
    forward_128, _ = bench_flops.count_model_flops(128)
    assert forward_128 == 4 * forward_64
    assert 2.5 * forward_64 < training_64 <= 3 * forward_64
    # the VGG16 encoder alone is ~15.5 GMAC at 224 px; the U-Net at 256 px must exceed it
    assert forward_64 * 16 > 2 * 15.5e9 * (256 / 224) ** 2


def test_matmul_flops_and_images_per_second(bench_flops, bench_train):
    assert bench_flops.matmul_flops(4) == 128
    assert bench_train.images_per_second([1.0, 0.5, 9.0], batch=4) == 8.0  # fastest step
    assert bench_train.images_per_second([1.0, 0.5, 9.0], 4, statistics.median) == 4.0
    with pytest.raises(ValueError, match="no timed steps"):
        bench_train.images_per_second([], batch=4)


def test_measure_matmul_peak_is_a_positive_rate(bench_flops):
    peak = bench_flops.measure_matmul_peak(torch.device("cpu"), 64, 2, torch.float32)
    assert 1e6 < peak < 1e15


@pytest.mark.parametrize("channels_last", [False, True])  # True: the GPU mode's memory format
def test_train_step_lowers_the_loss_on_a_fixed_tiny_batch(bench_train, channels_last):
    settings = {
        **bench_train.benchmark_settings(quick=True, use_gpu=False),
        "side": 32,
        "batch": 2,
        "channels_last": channels_last,
    }
    model, optimizer, loss_function = bench_train.build_training_objects(
        settings, torch.device("cpu")
    )
    images, masks = bench_train.make_random_batches(settings, torch.device("cpu"))[0]
    losses = [
        bench_train.train_step(model, optimizer, loss_function, images, masks, settings)
        for _ in range(4)
    ]
    assert losses[-1] < losses[0]


def test_compare_rounds_and_turn_order(bench_train):
    compared = bench_train.compare_rounds(
        plain_rounds=[[1.0, 2.0, 2.0], [1.0, 1.0, 1.0]],
        ray_rounds=[[2.0, 2.0, 2.0], [0.5, 1.0, 1.0]],
        batch=2,
    )
    assert compared["plain"] == 2.0 and compared["ray"] == 4.0 and compared["ratio"] == 2.0
    assert compared["ratio_median"] == pytest.approx((1.0 + 1.0) / 2)  # per-round medians
    assert compared["plain_median"] == 2.0
    with pytest.raises(ValueError, match="same, non-zero number of rounds"):
        bench_train.compare_rounds([[1.0]], [], batch=2)
    assert bench_train.next_turn("ray", 0) == ("plain", 0)
    assert bench_train.next_turn("plain", 0) == ("ray", 1)


def test_summarise_data_wait(bench_train):
    summary = bench_train.summarise_data_wait(
        [3.0, 1.0, 0.0], [1.0, 1.0, 2.0], [True, False, False], batch=2
    )
    assert summary["wait_fraction"] == pytest.approx(4.0 / 8.0)
    assert summary["steady_wait_fraction"] == pytest.approx(1.0 / 4.0)
    assert summary["images_per_s"] == pytest.approx(6 / 8.0)
    assert summary["epoch_start_wait_s"] == 3.0
    with pytest.raises(ValueError, match="non-empty"):
        bench_train.summarise_data_wait([], [], [], batch=2)


def test_targets_and_metric_parts(runner):
    assert runner.target_met("train_ray_vs_plain", 0.96, has_gpu=False) is True
    assert runner.target_met("train_data_wait_fraction", 0.2, has_gpu=False) is False
    assert runner.target_met("train_flops_fraction_of_peak", 0.9, has_gpu=False) is None
    assert runner.target_met("train_flops_fraction_of_peak", 0.3, has_gpu=True) is False
    assert runner.target_met("matmul_peak_gflops", 10.0, has_gpu=True) is None
    assert runner.part_of_metric("train_flops_fraction_of_peak") == "flops"
    assert runner.part_of_metric("train_data_wait_fraction") == "train"
    assert {runner.part_of_metric(row[0]) for row in runner.METRICS} == set(runner.PARTS)


def test_format_table_marks_targets_and_failed_parts(runner):
    metrics = {
        "train_ray_vs_plain": 0.5,
        "train_data_wait_fraction": 0.01,
        "augment_images_per_s_per_core": 123.456,
    }
    errors = {"segment": "FileNotFoundError: TODO: bench_segment.py | not written\nmore"}
    table = runner.format_table(metrics, errors, ["train", "augment", "segment"], has_gpu=False)
    lines = table.splitlines()
    ray_row = next(line for line in lines if "`train_ray_vs_plain`" in line)
    assert "| 0.5 | ≥ 0.95 | **no** |" in ray_row
    wait_row = next(line for line in lines if "`train_data_wait_fraction`" in line)
    assert "| 0.01 | ≤ 0.05 | yes |" in wait_row
    assert any("| 123.46 |" in line for line in lines)
    assert lines[-1].startswith("| segment: error | FileNotFoundError: TODO")
    assert not any("`segment_agreement`" in line for line in lines)  # a failed part has no rows
    assert not any("matmul_peak_gflops" in line for line in lines)  # flops part not run


def test_build_report_is_json_with_every_figure_at_top_level(runner, tmp_path):
    machine = {"gpu": None, "cpu": "test CPU"}
    report = runner.build_report(
        {"train_ray_vs_plain": 0.97, "train_device": "cpu"},
        {"segment": "boom"},
        {"train": 1.0, "segment": 0.1},
        machine,
        "quick",
    )
    path = tmp_path / "results.json"
    path.write_text(json.dumps(report))
    loaded = json.loads(path.read_text())
    assert loaded["train_ray_vs_plain"] == 0.97
    assert loaded["mode"] == "quick"
    assert loaded["targets"]["train_ray_vs_plain"]["met"] is True
    assert loaded["errors"] == {"segment": "boom"}
    assert loaded["parts"] == ["train", "segment"]


def test_load_part_names_a_missing_benchmark(runner):
    with pytest.raises(FileNotFoundError, match="bench_nothing.py is not written yet"):
        runner.load_part("nothing")


def test_read_cpu_model(runner, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU @ 1GHz\n")
    assert runner.read_cpu_model(str(cpuinfo)) == "Test CPU @ 1GHz"
    assert runner.read_cpu_model(str(tmp_path / "missing"))  # falls back to platform's answer


def test_recipe_benchmark_configs_are_valid_and_before_is_the_old_recipe(tmp_path, load_benchmark):
    """The two recipes build valid configs; `before` is one step per epoch on 8 tiles at batch
    16 with 10-epoch first cycles and no warm-up, `after` today's defaults scaled in length."""
    from unet_ray.core.config import Config, TrainConfig
    from unet_ray.pipelines.data import tile_copies

    recipe = load_benchmark("recipe")
    defaults = TrainConfig()
    for quick in (True, False):
        configs = recipe.recipes(quick)
        before = Config.from_dict({"train": configs["before"]["train"]}).train
        after = Config.from_dict({"train": configs["after"]["train"]}).train
        assert tile_copies(recipe.TRAIN_IMAGES, 1, recipe.BATCH, before.min_steps_per_epoch) == 1
        assert (before.restart_epochs, before.warmup_epochs) == (10, 0)
        assert (after.warmup_epochs, after.restart_epochs) == (
            defaults.warmup_epochs,
            defaults.restart_epochs,
        )
        assert after.shuffle_buffer_tiles == defaults.shuffle_buffer_tiles
    plot = tmp_path / "lr.png"
    recipe.plot_schedules(plot, steps_per_epoch=5)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = recipe.format_table(
        [
            {
                "recipe": "after",
                "style": "he",
                "epochs": 4,
                "steps": 40,
                "train_seconds": 10.0,
                "pixel_f1": 0.9,
                "dsb_score": 0.5,
                "f1_50": 0.7,
                "n_images": 4,
            }
        ]
    )
    assert table.splitlines()[2] == "| after | he | 4 | 40 | 10.0 | 0.9 | 0.5 | 0.7 | 4 |"


def test_accuracy_summary_averages_styles_then_seeds(load_benchmark):
    accuracy = load_benchmark("accuracy")

    def run(head, seed, dsb_by_mode):
        scores = [
            {"style": style, "mode": mode, "pixel_f1": 0.9, "dsb_score": dsb + offset,
             "f1_50": 0.5, "seconds": 1.0 if mode != "searched+tta" else 8.0}
            for mode, dsb in dsb_by_mode.items()
            for style, offset in (("fluorescence", 0.0), ("he", 0.2))
        ]  # fmt: skip
        chosen = {"threshold": 0.5, "core_ratio": 0.85, "contour_threshold": 0.5, "min_size": 16}
        return {"head": head, "seed": seed, "best_epoch": 3, "train_seconds": 1.0,
                "searched": chosen, "scores": scores}  # fmt: skip

    modes = {"default": 0.2, "searched": 0.4, "searched+tta": 0.5}
    runs = [run("mask", 0, modes), run("mask", 1, {k: v + 0.1 for k, v in modes.items()})]
    summary = accuracy.summarise(runs)
    by_mode = {entry["mode"]: entry for entry in summary}
    assert [entry["head"] for entry in summary] == ["mask"] * 3  # no contour runs: no rows
    # seed 0: styles 0.2 and 0.4 -> 0.3; seed 1: 0.4; mean 0.35, spread sd(0.3, 0.4)
    assert by_mode["default"]["dsb_score"] == pytest.approx(0.35)
    assert by_mode["default"]["dsb_score_sd"] == round(statistics.stdev([0.3, 0.4]), 4)
    assert by_mode["searched+tta"]["seconds"] == 8.0
    table = accuracy.format_tables(runs, summary)
    assert "| mask | searched+tta | 2 | 0.900 ± 0.000 | 0.650 ± 0.071 |" in table
