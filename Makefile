# unet_ray: `make demo` sets up and runs the whole pipeline on built-in synthetic data;
# `make test` sets up and runs the test suite. Both create .venv on first use, installing the
# exact versions locked in constraints.txt; `make lock` regenerates that file.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo_output
STAMP := $(VENV)/.installed

.PHONY: demo test lint lock venv clean benchmark

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip -c constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Two pytest sessions, each with one Ray: the suite (one local Ray for all its tests), then the
# node-loss tests (their own multi-node cluster; tests/conftest.py leaves them out of the first).
test: $(STAMP)
	status=0; \
	$(BIN)/python -m pytest -q --durations=15 tests || status=1; \
	$(BIN)/python -m pytest -q --durations=5 tests/test_node_loss.py || status=1; \
	exit $$status

# Regenerate constraints.txt from a fresh, unconstrained install of '.[test]' (about 4 min).
lock:
	bash scripts/lock.sh $(PYTHON)

lint: $(STAMP)
	$(BIN)/ruff check unet_ray tests jobs benchmarks
	$(BIN)/ruff format --check unet_ray tests jobs benchmarks

demo: $(STAMP)
	bash scripts/demo.sh $(BIN) $(DEMO_DIR)

benchmark: $(STAMP)
	$(BIN)/python benchmarks/run.py --quick

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
