# Two commands: `make serve` (set up, then serve the built-in model on 127.0.0.1:8000) and `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip

.PHONY: install serve test bench proto clean

install: $(VENV)/.installed

# torch is pinned before anything else can ask for it: a looser spec would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,ray]'
	touch $@

serve: install
	$(VENV)/bin/imagegen serve

# In random order (pytest-randomly): the header prints the seed; --randomly-seed=N replays an order.
test: install
	$(PYTHON) -m pytest

bench: install
	$(PYTHON) bench/bench_serving.py

# The gRPC worker contract: regenerate the committed Python code after changing workers/hosts/proto/worker.proto.
proto: install
	$(PYTHON) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. workers/hosts/proto/worker.proto

clean:
	rm -rf $(VENV) build *.egg-info
