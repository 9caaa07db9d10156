# `make run` and `make test` create or reuse .venv and install everything they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINT_STAMP := $(VENV)/.lint-installed

.PHONY: run test lint install bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

$(LINT_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,lint]'
	touch $(LINT_STAMP)

run: $(STAMP)
	$(BIN)/sidecar-agent run $(if $(CONFIG),--config $(CONFIG))

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff (lint and format check) and mypy over the agent and the built-in plugins: 0 errors.
lint: $(LINT_STAMP)
	$(BIN)/ruff check agent plugins
	$(BIN)/ruff format --check agent plugins
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/record_overhead.py

clean:
	rm -rf $(VENV) .sidecar-agent .pytest_cache
