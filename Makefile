# Two commands do all the set-up on a fresh machine:
#   make run    create .venv, install everything, prepare the starter model, chat with it
#   make test   the same set-up, then the whole test suite
# The first install compiles llama.cpp (about 10-15 minutes on 2 cores); pip caches the wheel.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EXTRAS ?= starter,native,test

.PHONY: run test setup clean bench

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/localllm pull starter --quiet
	$(VENV)/bin/localllm chat starter

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/llamacpp_overhead.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
