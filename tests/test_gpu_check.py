"""`make gpu-check DRY_RUN=1`: every step of the GPU check (environment, a 2-epoch `unet-ray
train`, plain training steps, a collection and a slide segmented) on the CPU at tiny sizes, one
table printed and the JSON written (issue 22)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DRY_RUN_TIMEOUT_S = 900  # ~2 min on an idle 2-core machine; far more under a loaded one


def test_make_gpu_check_runs_the_script_with_dry_run_and_the_output_folder():
    plan = subprocess.run(
        ["make", "-n", "gpu-check", "DRY_RUN=1", "GPU_CHECK_OUT=/tmp/somewhere"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "benchmarks/gpu_check.py --out /tmp/somewhere --dry-run" in plan
    real = subprocess.run(
        ["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "benchmarks/gpu_check.py --out gpu_check" in real and "--dry-run" not in real


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(DRY_RUN_TIMEOUT_S)
def test_gpu_check_dry_run_measures_every_step_and_writes_the_table(
    tmp_path, ray_local, monkeypatch, capsys, load_benchmark
):
    """The dry run as on a cluster (RAY_ADDRESS: its `unet-ray train` subprocess and its
    segmentations join the session's Ray instead of starting two of their own)."""
    monkeypatch.setenv("RAY_ADDRESS", ray_local.get_runtime_context().gcs_address)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "gpu_check"
    assert load_benchmark("gpu_check").main(["--dry-run", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    results = json.loads((out / "gpu_check.json").read_text())
    assert results["dry_run"] is True
    assert results["environment"]["torch"] and "shm_gib" in results["environment"]
    assert results["train"]["images_per_s"] > 0 and len(results["train"]["epoch_s"]) == 2
    assert set(results["plain"]) == {"2", "4"}
    assert all(figures["images_per_s"] > 0 for figures in results["plain"].values())
    for name in ("collection", "slide"):
        assert results["segmentation"][name]["megapixels_per_s"] > 0
    manifest = (out / "slide_out" / "manifest.csv").read_text()
    assert "slide.ome.tif" in manifest and ",ok," in manifest
    assert len(list((out / "collection_out").glob("*.labels.tif"))) == 2
    for line in ("train img/s, Ray", "plain PyTorch step, batch 4", "segment MP/s, slide"):
        assert line in stdout and line in results["table"]
