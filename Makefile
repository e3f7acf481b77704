# `make demo` and `make test` each set up everything they need on a fresh machine.
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)

.PHONY: demo test bench

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable ".[test]"
	touch $@

# `dvc repro` prints each stage's summary; `dvc metrics show` lists every figure (a wide table).
demo: $(VENV)/.installed
	dvc repro

test: $(VENV)/.installed
	ruff check .
	ruff format --check .
	python -m pytest -q

bench: $(VENV)/.installed
	python bench/extract.py
