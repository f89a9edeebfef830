# Set-up on a fresh machine is part of every target: `make demo` and `make test` need nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The demo needs the default install only (permissive decoders); the tests add the test extras, among them
# pylibjpeg-libjpeg (GPL-3.0) for the JPEG lossless / JPEG-LS test files.
BASE := $(VENV)/.installed-base-1
STAMP := $(VENV)/.installed-2

.PHONY: demo test test-fast lint bench bytecode clean

$(BASE): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $(BASE)

$(STAMP): $(BASE)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# NB: gpucnr's bytecode, as `pip install` writes it for an installed package: an editable install gets none where
# PYTHONDONTWRITEBYTECODE is set, and every process started (each ingest worker too) would compile every module it
# imports, ~0.1-0.2 s each. Up-to-date files are skipped; a changed module's stale file is never used.
bytecode: $(BASE)
	$(BIN)/python -m compileall -q gpucnr

demo: $(BASE) bytecode
	$(BIN)/gpucnr demo --out out/demo -n 2000
	$(BIN)/gpucnr report out/demo/results.zarr out/demo/report

test: $(STAMP) lint bytecode
	$(BIN)/python -m pytest --nbmake tests notebooks

test-fast: $(STAMP) lint bytecode
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python scripts/bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
