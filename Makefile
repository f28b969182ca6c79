# README command 1: `make demo`   README command 2: `make test`
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# BEIR datasets live in IR_DATA_DIR (never in the repo); next to a checkout with ../shared/data
# that one is used, else ./data (make demo downloads SciFact there when online).
IR_DATA_DIR ?= $(if $(wildcard ../shared/data/scifact/corpus.jsonl),$(abspath ../shared/data),$(abspath data))
export IR_DATA_DIR
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test lint clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes. torch is installed first, pinned, so the
# CPU wheel is used here; on a GPU host install the CUDA build of torch==2.13.0 beforehand.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,test]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/distributed-ir pipeline --config jobs/configs/scifact_minilm.yaml

test: setup
	$(PY) -m pytest tests

lint: setup
	$(VENV)/bin/ruff check distributed_ir jobs tests benchmarks

clean:
	rm -rf outputs .pytest_cache
