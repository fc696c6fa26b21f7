# moca-jax: `make test`, `make demo` (and `make lint`). Each creates .venv from
# requirements.txt on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo lint venv clean

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

demo: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m experiments.demo --workdir=outputs

clean:
	rm -rf $(VENV) outputs
