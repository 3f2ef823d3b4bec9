# The two commands a newcomer needs:  make run   and   make test
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu-tiny
PIP_EXTRA ?=
# pytest-xdist: one file per worker at a time (a module's fixtures are built once); WORKERS=1 runs serially
WORKERS ?= 2
PYTEST_WORKERS := $(if $(filter 1,$(WORKERS)),,-n $(WORKERS) --dist loadfile)

.PHONY: setup setup-legacy run test test-slow test-gpu test-legacy lab clean

setup:  ## .venv, pinned packages, Jupyter kernel, libaio-dev (quick when done)
	@bash scripts/setup.sh requirements.txt $(VENV) $(PIP_EXTRA)

setup-legacy:  ## pinned legacy env (.venv-legacy): DeepSpeed's BLOOM kernel injection on CUDA GPUs
	@bash scripts/setup.sh requirements-legacy.txt .venv-legacy $(PIP_EXTRA)

run: setup  ## execute every notebook headless with PROFILE; results under runs/$(PROFILE)/
	@$(PY) -m bloomkit.notebooks --profile $(PROFILE) --out runs/$(PROFILE)

test: setup  ## the CPU test suite, 2 workers (tests marked slow, gpu or legacy are deselected: see below)
	@$(PY) -m pytest $(PYTEST_WORKERS) -m "not gpu and not legacy and not slow" --durations=25 tests

test-slow: setup  ## the tests marked slow (second models through the notebooks, benchmarks, TP=4, 2 nodes); CI runs them after make test
	@$(PY) -m pytest $(PYTEST_WORKERS) -m "slow and not gpu and not legacy" --durations=25 tests

test-gpu: setup  ## tests marked gpu, on a machine with a CUDA GPU
	@$(PY) -m pytest -m "gpu and not legacy" tests

test-legacy: setup-legacy  ## the legacy stack (.venv-legacy): AutoTP + pre-shards on CPU; kernel injection on a GPU
	@.venv-legacy/bin/python -m pytest -m legacy tests/test_legacy.py

lab: setup  ## JupyterLab on the notebooks, with the bloomkit kernel (the recipes' thread settings)
	@OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf runs .pytest_cache
