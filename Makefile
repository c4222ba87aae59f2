# unet_ray: `make demo` sets up and runs the whole pipeline on built-in synthetic data;
# `make test` sets up and runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo_output
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean benchmark

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check unet_ray tests jobs benchmarks
	$(BIN)/ruff format --check unet_ray tests jobs benchmarks

demo: $(STAMP)
	bash scripts/demo.sh $(BIN) $(DEMO_DIR)

benchmark: $(STAMP)
	$(BIN)/python benchmarks/run.py --quick

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
