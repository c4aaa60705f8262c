# listing-vision: `make help` lists the targets. Every target creates the venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install test test-fast test-gpu lint format up demo bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its dev tools

# `make test` runs the suite on TEST_WORKERS pytest-xdist processes, each test file whole on one
# (each process starts its own embedded servers and workers); TEST_WORKERS=0 runs it serially.
TEST_WORKERS ?= 2

test: $(STAMP) ## run the whole test suite (real PostgreSQL, Valkey and worker processes)
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP) ## unit tests only
	$(BIN)/pytest -q tests/unit

test-gpu: $(STAMP) ## GPU-marked tests (skipped without CUDA)
	$(BIN)/pytest -q -m gpu tests/gpu

lint: $(STAMP) ## ruff (lint and format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy contract db producer worker listing_vision bench

format: $(STAMP) ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

up: $(STAMP) ## run the stack in the foreground (embedded servers, worker, Flower); Ctrl-C stops it
	$(BIN)/listing-vision up

demo: $(STAMP) ## the offline demo: a sample catalogue with planted mismatches, scored end to end
	$(BIN)/listing-vision demo

bench: $(STAMP) ## throughput and run benchmarks with plots (results go to bench/results/)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.fetch_cost
	$(BIN)/python -m bench.runs

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
