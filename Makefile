# unet_ray: `make demo` sets up and runs the whole pipeline on built-in synthetic data;
# `make test` sets up and runs the test suite. Both create .venv on first use, installing the
# exact versions locked in constraints.txt; `make lock` regenerates that file.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo_output
STAMP := $(VENV)/.installed

.PHONY: demo test drills lint lock venv wheelhouse clean benchmark gpu-check

# Install knobs (scripts/install.py; README "Ray clusters"), for `make venv` and `make wheelhouse`:
#   WHEELHOUSE=DIR   `make venv` installs from that folder only (no index); `make wheelhouse`
#                    downloads into it (default wheelhouse/)
#   SYSTEM_TORCH=1   use the torch and torchvision that $(PYTHON) already has (a CUDA image's);
#                    torch, torchvision, triton and the nvidia-*/cuda-* wheels are left out
#   PY=3.12 PLATFORM=manylinux_2_28_x86_64   the target of `make wheelhouse`
# They act when the venv is made or updated: after `make clean` on a host that has a venv.
WHEELHOUSE ?=
SYSTEM_TORCH ?=
PY ?= 3.11
PLATFORM ?= manylinux_2_28_x86_64
TORCH_FLAG := $(if $(filter-out 0 no false,$(SYSTEM_TORCH)),--system-torch)

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) scripts/install.py venv --venv $(VENV) $(if $(WHEELHOUSE),--wheelhouse $(WHEELHOUSE)) $(TORCH_FLAG)
	touch $(STAMP)

# Every wheel `make venv` needs, with the project's own, for Python $(PY) on $(PLATFORM), from the
# index into $(WHEELHOUSE) (about 3 GB with torch's CUDA wheels, far less with SYSTEM_TORCH=1).
wheelhouse:
	$(PYTHON) scripts/install.py wheelhouse --dest $(or $(WHEELHOUSE),wheelhouse) --python-version $(PY) --platform $(PLATFORM) $(TORCH_FLAG)

# Two pytest sessions, each with one Ray: the suite (one local Ray for all its tests), then the
# node-loss tests (their own multi-node cluster; tests/conftest.py leaves them out of the first).
test: $(STAMP)
	status=0; \
	$(BIN)/python -m pytest -q --durations=15 tests || status=1; \
	$(BIN)/python -m pytest -q --durations=5 tests/test_node_loss.py || status=1; \
	exit $$status

# The fault drills, each test DRILL_COUNT times in a row (pytest-repeat), in the same two sessions
# as `make test`: killed worker, killed driver resuming from S3, interrupted and scripted searches,
# a failing slide region, job submission, two commands side by side, node loss (about 50 min).
DRILL_COUNT ?= 5
DRILL_TESTS := \
	tests/test_train.py::test_three_workers_survive_a_killed_worker_and_score_every_image_once \
	tests/test_train.py::test_driver_killed_then_rerun_resumes_from_s3 \
	tests/test_tune.py::test_asha_stops_the_worse_trial_not_the_dipping_ones \
	tests/test_tune.py::test_interrupted_search_resumes_and_writes_results \
	tests/test_slides.py::test_a_failing_region_marks_its_slide_error_and_a_rerun_resumes \
	tests/test_jobs.py::test_job_submit_smoke_test \
	tests/test_side_by_side.py::test_two_commands_side_by_side_each_on_its_own_ray
drills: $(STAMP)
	status=0; \
	$(BIN)/python -m pytest -q --count $(DRILL_COUNT) --durations=0 $(DRILL_TESTS) || status=1; \
	$(BIN)/python -m pytest -q --count $(DRILL_COUNT) --durations=0 tests/test_node_loss.py || status=1; \
	exit $$status

# Regenerate constraints.txt from a fresh, unconstrained install of '.[test,slides]' (about 4 min).
lock:
	bash scripts/lock.sh $(PYTHON)

# Style, then the package's shape: import-linter's contracts in pyproject.toml (layers, Ray only
# from the runtime up, a storage-free core, no import cycle).
lint: $(STAMP)
	$(BIN)/ruff check unet_ray tests jobs benchmarks scripts
	$(BIN)/ruff format --check unet_ray tests jobs benchmarks scripts
	$(BIN)/lint-imports

demo: $(STAMP)
	bash scripts/demo.sh $(BIN) $(DEMO_DIR)

benchmark: $(STAMP)
	$(BIN)/python benchmarks/run.py --quick

# One GPU, at most ~8 minutes, no network (issue 22): the environment, a 2-epoch
# `unet-ray train --gpu`, plain-PyTorch bf16 steps at batch 16 and 64, a synthetic collection and
# a 16k x 16k slide segmented with --gpu, GPU utilisation sampled throughout; one table, and JSON
# in $(GPU_CHECK_OUT)/gpu_check.json. DRY_RUN=1: the same steps on the CPU at tiny sizes.
GPU_CHECK_OUT ?= gpu_check
DRY_RUN ?=
gpu-check: $(STAMP)
	GPU_CHECK_OUT=$(GPU_CHECK_OUT) $(BIN)/python benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) $(if $(filter-out 0 no false,$(DRY_RUN)),--dry-run)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
