# Two commands for a newcomer: `make demo` and `make test` (both create .venv and install).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit integration netns proto proto-check clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m dfly.cli.demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench tools
	$(BIN)/ruff format --check src tests bench tools

typecheck: $(STAMP)
	$(BIN)/mypy

# Includes tests/netns (root: network namespaces, tc, nginx, aria2c; skipped with the reason elsewhere).
test: $(STAMP) proto-check lint typecheck
	$(BIN)/pytest -q tests

netns: $(STAMP)
	$(BIN)/pytest -q -s tests/netns

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit tests/sim

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

# Regenerate the gRPC/protobuf code under src/dfly/api from its .proto files.
proto: $(STAMP)
	cd src && PATH=$(abspath $(BIN)):$$PATH $(abspath $(BIN))/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. \
	  --mypy_out=. --mypy_grpc_out=. dfly/api/scheduler.proto dfly/api/daemon.proto

# CI: fail if the generated code is not current with the .proto files.
proto-check: $(STAMP)
	$(BIN)/python tools/check_proto.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
