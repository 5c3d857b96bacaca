# Developer entry points. Every target installs what it needs into .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_FLAGS ?= -q --disable-pip-version-check
PYTEST_ARGS ?=
SOURCES = $(wildcard libs/*/src services/*/src cli/src)

.PHONY: install test test-hardening lint format typecheck schemas env-example config-docs asyncapi check demo up down bench clean

$(STAMP): constraints.txt requirements-dev.txt $(wildcard libs/*/pyproject.toml services/*/pyproject.toml cli/pyproject.toml)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) -c constraints.txt pip wheel hatchling editables
	$(BIN)/pip install $(PIP_FLAGS) -c constraints.txt --no-build-isolation -r requirements-dev.txt
	touch $@

install: $(STAMP)

# The load and outage tests post FLYWHEEL_LOAD_LABELS / FLYWHEEL_FAULT_LABELS labels: 1 000 and
# 2 000 here (they fit CI's time), 10 000 in test-hardening, which also shows every fault, load
# and security test's figures (-s) and runs the tests marked `hardening` that make test leaves out.
test: install
	./scripts/ensure-servers
	FLYWHEEL_LOAD_LABELS=$${FLYWHEEL_LOAD_LABELS:-1000} FLYWHEEL_FAULT_LABELS=$${FLYWHEEL_FAULT_LABELS:-2000} \
		$(BIN)/pytest -m "not hardening" --durations=15 $(PYTEST_ARGS)

test-hardening: install
	./scripts/ensure-servers
	FLYWHEEL_LOAD_LABELS=$${FLYWHEEL_LOAD_LABELS:-10000} FLYWHEEL_FAULT_LABELS=$${FLYWHEEL_FAULT_LABELS:-10000} \
		$(BIN)/pytest -s tests/faults tests/load tests/security tests/e2e/test_faulty_candidates.py \
		tests/e2e/test_drift.py $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: install
	$(BIN)/mypy $(SOURCES)

schemas: install
	$(BIN)/python -m flywheel_contracts.schemas --write

env-example: install
	$(BIN)/python scripts/env_example.py

config-docs: install
	$(BIN)/python scripts/config_docs.py

asyncapi: install
	FLYWHEEL_WRITE_ASYNCAPI=1 $(BIN)/pytest -q -k asyncapi services

check: lint typecheck test

demo: install
	./scripts/ensure-servers
	$(BIN)/flywheel demo

up: install
	./scripts/ensure-servers
	$(BIN)/flywheel up

down: install
	$(BIN)/flywheel down

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
