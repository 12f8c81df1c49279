# The two commands of the README:
#   make pipeline   the whole pipeline (dvc repro) on Fashion-MNIST
#   make test       the test suite
# Each sets itself up: a virtual environment in .venv with the pinned stack, and (for the
# pipeline) the Debian package of Fashion-MNIST when apt can install it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: pipeline test install dataset lint bench

pipeline: install dataset
	dvc repro

test: install
	python -m pytest

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-c requirements.lock -e '.[dev]'
	touch $@

# Offline Fashion-MNIST: Debian's package ships the IDX files. Without apt (or root), `vae
# prepare` falls back to torchvision's download and says so if that fails too.
dataset:
	@if [ -d data/raw/fashion_mnist ] || [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
		|| echo "apt-get failed; vae prepare will try torchvision's download"; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		(sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist) \
		|| echo "apt-get failed; vae prepare will try torchvision's download"; \
	else \
		echo "cannot apt-get install dataset-fashion-mnist here; vae prepare will try torchvision's download"; \
	fi

lint: install
	ruff check . && ruff format --check .

bench: install dataset
	dvc repro prepare
	python benchmarks/throughput.py
