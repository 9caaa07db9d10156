# `make run`, `make test` and `make lint` create or reuse .venv and install what each needs:
# run only the package and its runtime dependencies, test adds the test extras, lint ruff and mypy
# and the optional plugin extras (otlp, nats) whose imports mypy checks.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
# A .venv is used only once this marker exists, and the marker is written only for a .venv
# whose Python is >= 3.11 and has pip: one made by an older Python, or half made by an
# interrupted run, is deleted and made again, never reused. Each install has its own stamp,
# written only when pip succeeded, so a failed install is retried by the next run.
# pip is upgraded first: the one Python bundles installed our dependencies in twice the time.
VENV_OK := $(VENV)/.checked
USABLE := import sys, pip; sys.exit(sys.version_info < (3, 11))
# pip's output goes to .venv/pip.log and is shown only when it fails: a working install is one
# line, not pages of build-backend notes.
LOG := $(VENV)/pip.log
QUIETLY = > $(LOG) 2>&1 || { cat $(LOG) >&2 2>/dev/null; echo "error: $@ failed; pip's output is above and in $(LOG)" >&2; exit 1; }
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
LINT_STAMP := $(VENV)/.installed-lint

.PHONY: run test lint install bench clean

$(VENV_OK):
	@if ! $(BIN)/python -c '$(USABLE)' 2>/dev/null; then \
	  $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	    echo "error: sidecar-agent needs Python >= 3.11; '$(PY)' is $$($(PY) -V 2>&1 || echo missing)." \
	         "Try: make $(or $(MAKECMDGOALS),run) PY=python3.11" >&2; exit 1; }; \
	  echo "$(PY) -m venv $(VENV)"; rm -rf $(VENV) && $(PY) -m venv $(VENV) && $(BIN)/python -c '$(USABLE)' && \
	  $(PIP) install --quiet --upgrade pip $(QUIETLY); \
	fi
	@touch $@

$(RUN_STAMP): $(VENV_OK) pyproject.toml
	@echo "$(PIP) install -e .  (output: $(LOG))"
	@$(PIP) install -e . $(QUIETLY)
	@touch $@

$(TEST_STAMP): $(VENV_OK) pyproject.toml
	@echo "$(PIP) install -e '.[test]'  (output: $(LOG))"
	@$(PIP) install -e '.[test]' $(QUIETLY)
	@touch $@

$(LINT_STAMP): $(VENV_OK) pyproject.toml
	@echo "$(PIP) install -e '.[lint,otlp,nats]'  (output: $(LOG))"
	@$(PIP) install -e '.[lint,otlp,nats]' $(QUIETLY)
	@touch $@

install: $(RUN_STAMP)

# The agent with the embedded defaults, or CONFIG=path/to/agent.toml; Ctrl-C stops it.
run: $(RUN_STAMP)
	$(BIN)/sidecar-agent run $(if $(CONFIG),--config $(CONFIG))

test: $(TEST_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff (lint and format check) and mypy over the agent and the built-in plugins: 0 errors.
lint: $(LINT_STAMP)
	$(BIN)/ruff check agent plugins
	$(BIN)/ruff format --check agent plugins
	$(BIN)/mypy

bench: $(TEST_STAMP)
	$(BIN)/python bench/record_overhead.py

clean:
	rm -rf $(VENV) .sidecar-agent .pytest_cache
