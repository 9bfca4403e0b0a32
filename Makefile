# actstore: `make test` and `make demo` set everything up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test demo lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch pin first, so nothing pulls the CUDA wheels
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[demo,dev]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check actstore tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/actstore demo --out demo-out

lint: $(STAMP)
	$(BIN)/ruff check actstore tests bench
	$(BIN)/ruff format --check actstore tests bench
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format actstore tests bench
	$(BIN)/ruff check --fix actstore tests bench

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache
