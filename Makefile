# Everyday targets. The environment (.venv) is created on first use and reused after.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip install --constraint requirements/lock.txt
OVERRIDES ?=

.PHONY: quickstart chat test test-all lint format bench serve clean

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

## chat: instruction tuning (caption_sft) on top of the quickstart checkpoint, so the model answers
## questions about images and sounds; trained once (trains the quickstart first if it is missing)
CHAT := outputs/chat/checkpoints/last.ckpt
chat: $(CHAT)
$(CHAT): | $(VENV)/.installed
	test -f outputs/quickstart/checkpoints/last.ckpt || $(MAKE) quickstart
	rm -rf outputs/chat
	$(BIN)/python train.py experiment=caption_sft init_from=outputs/quickstart/checkpoints/last.ckpt \
		hydra.run.dir=outputs/chat

## serve: the OpenAI-compatible server for the chat checkpoint on 127.0.0.1:8000 (docs/SERVE.md)
serve: $(VENV)/.installed-serve $(CHAT)
	$(BIN)/python serve.py ckpt_path=$(CHAT) $(OVERRIDES)

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
