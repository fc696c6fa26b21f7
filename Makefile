# moca-jax: `make test`, `make demo`, `make demo-train` (and `make lint`). Each creates .venv
# from requirements.txt on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo demo-train lint venv clean

# The formatter's check (pyink, configured in pyproject.toml); separate from `make test`.
LINT_DIRS := moca_jax data_pipeline experiments tests

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n 2 --durations=15 tests

lint: $(STAMP)
	$(PY) -m pyink --check --diff $(LINT_DIRS)

# The bundled model (assets/moca-small) on held-out renders: GLBs, previews, grid, router
# maps, metric tables in outputs/demo (under 15 minutes on 2 CPU cores).
demo: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m experiments.demo --mode=bundle --workdir=outputs/demo

# Trains tiny models from scratch on the procedural tiny split, then evaluates them
# (outputs/demo_train).
demo-train: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m experiments.demo --mode=train --workdir=outputs/demo_train

clean:
	rm -rf $(VENV) outputs
