# wsi-pipeline: every target installs what it needs first, so each one works alone on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned to the release this project is tested with; pip takes it from the local wheel cache when present.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_out
DATA   ?= ../shared/data
MODELS := wsi_pipeline/models/defaults
MODELS_WORK ?= build/models

.PHONY: install test lint demo bench bench-peers bench-embed device-kit models models-domain models-mpp models-ablations clean help

help:
	@echo "make install  create $(VENV) and install wsi-pipeline with its dependencies"
	@echo "make test     run the test suite (installs first when needed)"
	@echo "make demo     run the pipeline on a built-in synthetic slide and say where the outputs are"
	@echo "make lint     ruff check + format check + import contracts (lint-imports) + type check (mypy)"
	@echo "make bench    benchmarks (JSON in benchmarks/results/)"
	@echo "make bench-peers  TIAToolbox 1.3.2 and WSInfer 0.6.1 beside wsi-pipeline predict (builds their venvs first)"
	@echo "make bench-embed  tile embeddings (ViT-S/16, ViT-B/16) beside TIAToolbox's feature extractor"
	@echo "make device-kit  wheels (.whl) and a slide (.device-data) for benchmarks/device/check.sh on a GPU machine"
	@echo "make models   retrain the three shipped models from $(DATA), with cross-source studies (CPU: about 70 min)"

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH_SPEC)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

# two processes (pytest-xdist), each test module whole in one of them (its module fixtures are built once); a
# SLURM or subprocess test waiting on its jobs leaves the CPU to the other
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check wsi_pipeline tests benchmarks
	$(BIN)/ruff format --check wsi_pipeline tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/wsi-pipeline demo --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache build *.egg-info

bench: $(STAMP)
	$(BIN)/python benchmarks/foundation.py
	$(BIN)/python benchmarks/engine.py
	$(BIN)/python benchmarks/read.py
	$(BIN)/python benchmarks/cpu_model.py
	$(BIN)/python benchmarks/domain_guard.py
	$(BIN)/python benchmarks/shipped.py
	$(BIN)/python benchmarks/verify.py
	$(BIN)/python benchmarks/epithelium_nuclei.py

# TIAToolbox 1.3.2 in its own venv (it pins numpy < 1.24 and shapely < 2), beside the same torch; then both tools
# side by side (benchmarks/results/peers.json).
PEERS_VENV := build/peers-venv
$(PEERS_VENV)/.installed:
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install $(TORCH_SPEC)
	$(PEERS_VENV)/bin/python -m pip install "tiatoolbox==1.3.2" "setuptools<81" openslide-bin "timm==1.0.31"
	touch $@

# WSInfer 0.6.1 in its own venv too (it needs zarr < 3 and tiffslide < 3; it runs TorchScript files only)
WSINFER_VENV := build/wsinfer-venv
$(WSINFER_VENV)/.installed:
	$(PYTHON) -m venv $(WSINFER_VENV)
	$(WSINFER_VENV)/bin/python -m pip install --upgrade pip
	$(WSINFER_VENV)/bin/python -m pip install $(TORCH_SPEC)
	$(WSINFER_VENV)/bin/python -m pip install "wsinfer==0.6.1" "zarr<3" "tiffslide<3" openslide-python openslide-bin
	touch $@

bench-peers: $(STAMP) $(PEERS_VENV)/.installed $(WSINFER_VENV)/.installed
	$(BIN)/python benchmarks/peers.py

# tile embeddings (ViT-S/16, ViT-B/16) beside TIAToolbox's feature extractor (benchmarks/results/embed.json)
bench-embed: $(STAMP) $(PEERS_VENV)/.installed
	$(BIN)/python benchmarks/embed.py

# what benchmarks/device/check.sh needs on a lent GPU machine that reaches no registry (docs/benchmarks.md)
device-kit: $(STAMP)
	WSI_SHARED_DATA=$(DATA) bash benchmarks/device/prepare.sh

# The shipped defaults are the output of this target: each model trains in $(MODELS_WORK) (resumable), is
# evaluated on data it never saw, and only then replaces its folder in $(MODELS) (weights, card, evaluation).
# Epithelium/stroma and mitosis first pass a cross-source study (train on one centre, measure on the other, for
# every recipe variant); the chosen variant is then trained on all sources (wsi_pipeline/training/study.py).
EPI    := $(DATA)/epithelium_stroma
EPI_CLASSES := --class epithelium=01_TUMOR,06_MUCOSA,epithelial --class stroma=02_STROMA,fibroblast
models: $(STAMP)
	$(BIN)/wsi-pipeline train metastasis $(DATA)/metastasis/pcam/train --val-data $(DATA)/metastasis/pcam/valid \
		-c configs/models/metastasis.yaml -o $(MODELS_WORK)/metastasis
	$(BIN)/wsi-pipeline evaluate metastasis $(MODELS_WORK)/metastasis $(DATA)/metastasis/pcam/valid \
		--class tumour=1 --class normal=0 --positive tumour -o $(MODELS_WORK)/metastasis/evaluation
	$(BIN)/wsi-pipeline study configs/models/epithelium_study.yaml --data $(DATA) \
		-o $(MODELS_WORK)/epithelium_study --final $(MODELS_WORK)/epithelium_stroma
	$(BIN)/wsi-pipeline evaluate epithelium_stroma $(MODELS_WORK)/epithelium_stroma $(EPI)/kather2016 \
		$(EPI)/crchistophenotypes/train $(EPI)/crchistophenotypes/validation --held-out $(EPI_CLASSES) \
		-o $(MODELS_WORK)/epithelium_stroma/evaluation
	$(BIN)/wsi-pipeline study configs/models/mitosis_study.yaml --data $(DATA) \
		-o $(MODELS_WORK)/mitosis_study --final $(MODELS_WORK)/mitosis
	$(BIN)/wsi-pipeline evaluate mitosis $(MODELS_WORK)/mitosis $(DATA)/mitosis/amibr_tupac16 \
		$(DATA)/mitosis/mitos2012_scannerA --held-out -o $(MODELS_WORK)/mitosis/evaluation
	$(BIN)/wsi-pipeline publish $(MODELS_WORK) $(MODELS)
	$(MAKE) models-domain
	$(MAKE) models-mpp

# Each shipped model's domain (its card) and domain guard, fitted on tiles like its training data and measured on
# tissue it must not answer on (docs/models.md, "Domain guard"; about 10 min)
# (mitosis: the two deeper blocks only, chosen by fitting on one TUPAC16 side and measuring the other: docs/models.md)
models-domain: $(STAMP)
	$(BIN)/wsi-pipeline calibrate-domain $(MODELS)/metastasis --domain configs/models/domains/metastasis.yaml \
		$(DATA)/metastasis/pcam/train --val-data $(DATA)/metastasis/pcam/valid --per-image 1 --max-tiles 3000 \
		--outside skin=$(DATA)/slides/CMU-1-Small-Region.svs \
		--outside squamous=$(DATA)/slides/TCGA-CR-7395-01A-01-TS1.svs@1.0 \
		--outside colon=$(EPI)/crchistophenotypes@0.55
	$(BIN)/wsi-pipeline calibrate-domain $(MODELS)/epithelium_stroma \
		--domain configs/models/domains/epithelium_stroma.yaml \
		$(EPI)/crchistophenotypes/train@0.55 $(EPI)/kather2016/01_TUMOR $(EPI)/kather2016/02_STROMA \
		$(EPI)/kather2016/06_MUCOSA --val-data $(EPI)/crchistophenotypes/validation@0.55 --per-image 25 \
		--held-out nct=$(EPI)/nct_crc_he_100k_samples@0.5 --outside lymph_node=$(DATA)/metastasis/pcam/valid@0.972 \
		--outside skin=$(DATA)/slides/CMU-1-Small-Region.svs \
		--outside squamous=$(DATA)/slides/TCGA-CR-7395-01A-01-TS1.svs@1.0
	$(BIN)/wsi-pipeline calibrate-domain $(MODELS)/mitosis --domain configs/models/domains/mitosis.yaml \
		$(DATA)/mitosis/amibr_tupac16 $(DATA)/mitosis/mitos2012_scannerA --card-split --per-image 16 \
		--max-tiles 800 --layer 12 --layer 22 --outside skin=$(DATA)/slides/CMU-1-Small-Region.svs \
		--outside squamous=$(DATA)/slides/TCGA-CR-7395-01A-01-TS1.svs@1.0 \
		--outside colon=$(EPI)/crchistophenotypes@0.55 --outside lymph_node=$(DATA)/metastasis/pcam/valid@0.972

# The µm/px estimator (docs/mpp.md): each source of known µm/px left out in turn and measured, then fitted on all
models-mpp: $(STAMP)
	$(BIN)/wsi-pipeline train-mpp-estimator configs/models/mpp_estimator.yaml --data $(DATA) \
		-o $(MODELS)/mpp_estimator

# Study variants measured once and not chosen (configs/models/ablations/: same sources as the studies above); each
# is trained on one source and measured on the other, and nothing is published.
models-ablations: $(STAMP)
	$(BIN)/wsi-pipeline study configs/models/ablations/epithelium.yaml --data $(DATA) \
		-o $(MODELS_WORK)/ablations/epithelium
	$(BIN)/wsi-pipeline study configs/models/ablations/mitosis.yaml --data $(DATA) \
		-o $(MODELS_WORK)/ablations/mitosis
