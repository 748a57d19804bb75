# Two entry points (README Quickstart): `make demo` and `make test`. Both create .venv on first use.
# TORCH pins the CPU build that this project's machines carry on disk; on a GPU cluster set
# e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126".
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo test test-fast install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m dpg_lightning fit --config configs/tiny/l2_norm.yaml

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q -ra

# The edit loop: everything but the tests marked slow (learning runs, Slurm, subprocess fits).
test-fast: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q -ra -m "not slow"

clean:
	rm -rf runs lightning_logs wandb .pytest_cache
