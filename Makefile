# The two set-up commands of the README: `make demo` (the main job) and `make test` (the suite).
# Both create their own virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/calibflow demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest

bench: $(BIN)/.installed
	$(BIN)/python bench/bench_stack.py
	$(BIN)/python bench/bench_sky.py
	$(BIN)/python bench/bench_flow_overhead.py
	$(BIN)/python bench/sky_accuracy.py

clean:
	rm -rf demo calibrepo
