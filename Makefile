# The two set-up commands of the README: `make demo` (the main job) and `make test` (the suite).
# Both create their own virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench install warm lock clean

# The dependencies come from docker/requirements.lock (the image's exact versions and file hashes), so
# the tests run on what the image installs (--no-deps: the lock is the whole set, and a new venv's old
# pip has no resolution to get wrong); then the project, editable, with its test extras.
$(BIN)/.installed: pyproject.toml docker/requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r docker/requirements.lock
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

# the numba kernels compiled and cached before the first build (calibflow/warmup.py); again after
# the numeric core changes, since numba's cache is keyed on the source files
$(VENV)/.warm: $(BIN)/.installed $(wildcard calib_core/*.py calib_core/*/*.py)
	$(BIN)/python -m calibflow.warmup
	touch $@

warm: $(VENV)/.warm

# after changing pyproject.toml's dependencies: install them, then pin what is installed
lock: $(BIN)/.installed
	$(BIN)/python docker/lock.py

demo: $(VENV)/.warm
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
