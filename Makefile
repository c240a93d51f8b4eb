# Everyday targets. The environment (.venv) is created on first use and reused after.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip install --constraint requirements/lock.txt
OVERRIDES ?=

.PHONY: quickstart test test-all lint format bench serve clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# the library and the training app (`pip install autoglm-phone` alone is the inference library)
$(VENV)/.installed: pyproject.toml requirements/lock.txt | $(BIN)/python
	$(PIP) -e '.[train]'
	touch $@

# the default suite includes the export and server tests, so the test install has those extras
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[train,test,export,serve]'
	touch $@

## quickstart: install, train itc_pretrain on the embedded data, evaluate on the test split
quickstart: $(VENV)/.installed
	rm -rf outputs/quickstart
	$(BIN)/python train.py experiment=itc_pretrain hydra.run.dir=outputs/quickstart $(OVERRIDES)
	$(BIN)/python eval.py ckpt_path=outputs/quickstart/checkpoints/last.ckpt \
		output_json=outputs/quickstart/metrics.json hydra.run.dir=outputs/quickstart/eval

## test: install with test and export extras and run the default (fast) suite
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m "not slow and not gpu" -q

## test-all: every test, slow ones included (GPU tests skip themselves without a GPU)
test-all: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

## serve: the OpenAI-compatible server for the quickstart checkpoint on 127.0.0.1:8000 (docs/SERVE.md)
serve: $(VENV)/.installed-serve
	$(BIN)/python serve.py $(OVERRIDES)

$(VENV)/.installed-serve: $(VENV)/.installed
	$(PIP) -e '.[train,serve]'
	touch $@

## bench: every benchmark's quick form (bench/summary.py's registry), then one table of the ratios
## each measured in its run, written to outputs/bench/summary.json
bench: $(VENV)/.installed
	$(BIN)/python bench/summary.py $(OVERRIDES)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(VENV)/.installed-test
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf outputs multirun .cache .pytest_cache
