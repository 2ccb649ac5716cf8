# Entry points: `make demo` (set up, then run the main job), `make test` (set up, then everything CI checks)
# and `make docs` (the documentation site into site/).
# Set-up makes a virtual environment in .venv. TORCH picks the PyTorch build: the default CPU wheel
# (torch==2.13.0) keeps a CPU-only machine off the multi-GB CUDA download; on a GPU machine use e.g.
# `make demo TORCH=torch` to let pip choose.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.superdiff-installed

.PHONY: setup browser demo toy test lint docs docs-strict bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,zoo,sweep,plot,app,docs]"
	@touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/superdiff demo --out superdiff-demo

toy: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/superdiff toy --out superdiff-toy

# Everything CI checks (.ci/run is just `make test`): Chromium for the app's browser tests (installed
# with apt-get, through sudo when not root, or a message naming the package), the linter, the suite,
# and the documentation site in strict mode (a broken link or reference fails).
test: setup browser lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest tests
	$(MAKE) --no-print-directory docs-strict

browser:
	@.ci/install-chromium

# ruff's pycodestyle, pyflakes and import-order checks; the settings are in pyproject.toml ([tool.ruff]).
lint: setup
	$(PY) -m ruff check .

# The documentation site (MkDocs + Material + mkdocstrings, mkdocs.yml) into site/.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build

docs-strict: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# The performance table (docs/benchmarks/run_all.md); on a GPU machine: make bench TORCH=torch BENCH_ARGS="--device cuda".
BENCH_ARGS ?= --quick --markdown
bench: setup
	HF_HUB_OFFLINE=1 $(PY) bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) superdiff-toy superdiff-demo .pytest_cache site
