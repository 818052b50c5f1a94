# registry-migrator developer and CI entry points. `make test` is what CI runs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# uv from PATH, else a private copy installed with pip into .state/tools (Debian's system
# Python refuses a global pip install).
TOOLS_DIR := $(CURDIR)/.state/tools
UV := $(or $(shell command -v uv 2>/dev/null),$(TOOLS_DIR)/bin/uv)
STACK := deploy/local/stack
PYTEST_ARGS ?=
DEMO_ARGS ?=
IMAGE_ARGS ?=

.PHONY: help venv stack test lint demo image clean

help:
	@echo "make venv    install uv if missing, then the locked dependencies (.venv)"
	@echo "make stack   start PostgreSQL, etcd and RabbitMQ on loopback ($(STACK) up)"
	@echo "make test    venv + stack, then pytest; extra arguments: PYTEST_ARGS='--long -k lease'"
	@echo "make lint    ruff check, ruff format --check, mypy"
	@echo "make demo    venv + stack, then registry-migrator demo; options: DEMO_ARGS='--count 2000 --no-live'"
	@echo "make image   build deploy/Containerfile with podman (deploy/local/image build); options: IMAGE_ARGS='--no-cache'"
	@echo "make clean   stop the stack, remove .state and caches"

$(TOOLS_DIR)/bin/uv:
	python3 -m venv $(TOOLS_DIR)
	$(TOOLS_DIR)/bin/pip install --quiet --disable-pip-version-check uv

venv: $(UV)
	$(UV) sync --frozen

stack:
	$(STACK) up

test: venv stack
	$(UV) run pytest --durations=25 $(PYTEST_ARGS)

lint: venv
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run mypy

demo: venv stack
	eval "$$($(STACK) env)" && $(UV) run registry-migrator demo $(DEMO_ARGS)

image:
	deploy/local/image build $(IMAGE_ARGS)

clean:
	-$(STACK) down
	rm -rf .state .pytest_cache .ruff_cache .mypy_cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
