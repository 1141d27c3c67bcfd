# wsi-pipeline: every target installs what it needs first, so each one works alone on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned to the release this project is tested with; pip takes it from the local wheel cache when present.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: install test lint demo bench clean help

help:
	@echo "make install  create $(VENV) and install wsi-pipeline with its dependencies"
	@echo "make test     run the test suite (installs first when needed)"
	@echo "make demo     run the pipeline on a built-in synthetic slide and say where the outputs are"
	@echo "make lint     ruff check + format check"
	@echo "make bench    benchmarks (JSON in benchmarks/results/)"

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH_SPEC)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check wsi_pipeline tests benchmarks
	$(BIN)/ruff format --check wsi_pipeline tests benchmarks

demo: $(STAMP)
	$(BIN)/python -m wsi_pipeline.demo --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache build *.egg-info

bench: $(STAMP)
	$(BIN)/python benchmarks/foundation.py
	$(BIN)/python benchmarks/engine.py
