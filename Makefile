# torchgeo-dofa: `make demo` and `make test` create the environment when it is missing.
PYTHON ?= $(shell .ci/find-python)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint typecheck pytest bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "no Python >= 3.12 found" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) demo/run_demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check torchgeo_dofa tests benchmarks
	$(VENV)/bin/ruff format --check torchgeo_dofa tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# tests in parallel: one pytest-xdist worker per core as memory allows (tests/conftest.py);
# PYTEST_WORKERS=0 runs them in this process
PYTEST_WORKERS ?= auto

pytest: $(STAMP)
	$(VENV)/bin/pytest -q -n $(PYTEST_WORKERS) --dist worksteal

test: lint typecheck pytest

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
