# Echo: two commands do all the set-up on a fresh machine.
#   make demo   set up .venv, build the built-in corpus, run the cpu preset into runs/demo
#   make test   set up .venv and run the whole test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0
PRESET ?= cpu
RUN ?= runs/demo

.PHONY: demo test lint setup clean-venv bench
SHELL := /bin/bash

setup: $(VENV)/.installed

# A torch that the creating Python already has (a GPU user's CUDA build) is reused through
# --system-site-packages and never replaced; otherwise the pinned CPU wheel is installed
# first, so that no dependency can pull a multi-GB CUDA build.
$(BIN)/python:
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "using the torch that $(PY) already has"; \
	  $(PY) -m venv --system-site-packages $(VENV); \
	else \
	  $(PY) -m venv $(VENV); \
	fi

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_CPU)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@# headless Chromium (Debian's) for the web page's browser tests; never a downloaded one
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
	  >/dev/null; } || echo "chromium missing: the browser tests will skip (and say so)"
	@touch $@

demo: setup
	$(BIN)/echolm data builtin
	$(BIN)/echolm run --preset $(PRESET) --out $(RUN)
	@echo ""
	@echo "Done. What the run made:   $(RUN)/summary.json, $(RUN)/report/, $(RUN)/metrics.jsonl"
	@echo "See how text becomes tokens: $(BIN)/echolm tokenizer show --run $(RUN) 'Hello, world!'"

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15

lint: setup
	$(BIN)/ruff check .

# Every benchmark against its peer (TRL and transformers come with the `bench` extra), each
# printing its comparison and a last JSON line; the output is also kept in runs/bench/.
BENCHES := muon_step.py pretrain_throughput.py "pretrain_throughput.py --preset cpu" decode_speed.py \
	grpo_step.py dpo_step.py serve_load.py gpu_mfu.py

$(VENV)/.bench: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	@touch $@

bench: $(VENV)/.bench
	@mkdir -p runs/bench
	@set -e; for b in $(BENCHES); do \
	  name=$$(echo $$b | sed 's/\.py//; s/ --/_/g; s/ /_/g'); echo "== bench/$$b"; \
	  $(BIN)/python bench/$$b 2>&1 | tee runs/bench/$$name.log; \
	  test $${PIPESTATUS[0]} -eq 0; done

clean-venv:
	rm -rf $(VENV)
