# pkisvc — `make run` serves the API on 127.0.0.1:8800; `make test` installs and runs everything.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
BIND   ?= 127.0.0.1:8800
DATA_DIR ?= ./pkisvc-data
PYTEST_ARGS ?=

DIST ?= dist

.PHONY: run test lint deps system-deps bench clean wheel

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip 'setuptools>=70' wheel

$(VENV)/.run-installed: setup.py | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check -e .
	touch $@

$(VENV)/.test-installed: setup.py | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,vault,salt]'
	touch $@ $(VENV)/.run-installed

run: $(VENV)/.run-installed
	PKISVC_DATA_DIR=$(DATA_DIR) $(BIN)/pkisvc serve --bind $(BIND)

deps: $(VENV)/.test-installed

system-deps:
	bash .ci/system-deps.sh

lint: deps
	$(BIN)/ruff check pkisvc backends ext_pillar tests bench
	bash .ci/typecheck.sh

test: deps system-deps lint
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest $(PYTEST_ARGS)

$(VENV)/.bench-installed: $(VENV)/.test-installed
	$(BIN)/pip install -q --disable-pip-version-check matplotlib
	touch $@

# Side-by-side benchmarks (not tests): writes bench/results/latest.{json,md,png}.
bench: $(VENV)/.bench-installed system-deps
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/run.py

# The Salt master's install: the service, the ext_pillar, the runner and the formula with its
# orchestration in one wheel, $(DIST)/pkisvc-VERSION-py3-none-any.whl (README "Salt master").
wheel: | $(BIN)/python
	rm -rf build
	$(BIN)/pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w $(DIST) .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache
