# Two entry points: `make demo` (set up, then run the main job) and `make test` (set up, then run the tests).
# Set-up makes a virtual environment in .venv. TORCH picks the PyTorch build: the default CPU wheel
# (torch==2.13.0) keeps a CPU-only machine off the multi-GB CUDA download; on a GPU machine use e.g.
# `make demo TORCH=torch` to let pip choose.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.superdiff-installed

.PHONY: setup demo toy test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,zoo,sweep,plot,app]"
	@touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/superdiff demo --out superdiff-demo

toy: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/superdiff toy --out superdiff-toy

test: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest tests

# ruff's pycodestyle, pyflakes and import-order checks; the settings are in pyproject.toml ([tool.ruff]).
lint: setup
	$(PY) -m ruff check .

# The README's performance table; on a GPU machine: make bench TORCH=torch BENCH_ARGS="--device cuda".
BENCH_ARGS ?= --quick
bench: setup
	HF_HUB_OFFLINE=1 $(PY) bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) superdiff-toy superdiff-demo .pytest_cache
