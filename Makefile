# Two entry points (README Quickstart): `make demo` and `make test`. Both create .venv on first use.
# TORCH pins the CPU build that this project's machines carry on disk; on a GPU cluster set
# e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126".
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo test test-fast install clean clean-runs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m dpg_lightning fit --config configs/tiny/demo.yaml

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q -ra

# The edit loop: everything but the tests marked slow (learning runs, Slurm, subprocess fits).
test-fast: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q -ra -m "not slow"

# Caches only. Runs (checkpoints, metrics) are results: `make clean-runs` deletes them, after
# asking (CONFIRM=yes skips the question).
clean:
	rm -rf .pytest_cache .ruff_cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +

clean-runs:
	@echo "This deletes every run under runs/, lightning_logs/ and wandb/ (checkpoints, metrics)."
	@if [ "$(CONFIRM)" != yes ]; then read -p "Type yes to delete them: " answer; \
	  [ "$$answer" = yes ] || { echo "kept"; exit 1; }; fi
	rm -rf runs lightning_logs wandb
