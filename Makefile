# One target per workflow. `make serve` and `make test` build the environment when missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PROTOS  := $(shell find protos -name '*.proto' 2>/dev/null)
ARGS    ?=

.PHONY: setup test lint fmt serve protos wheels clean

setup: $(STAMP) protos

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Stubs are generated, never committed: protos/tandem/v1/*.proto -> tandem/v1/*_pb2*.py
protos: $(STAMP)
	@if [ -n "$(PROTOS)" ]; then \
	  PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iprotos \
	    --python_out=. --grpc_python_out=. \
	    --mypy_out=. --mypy_grpc_out=. $(PROTOS); fi

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python tools/check_imports.py
	$(BIN)/mypy chat gateway tandem decode_svc prefill_svc vision_svc engine/config.py \
	  engine/hub engine/kv_cache engine/kv_transfer engine/roles engine/quantization

fmt: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

serve: setup
	$(BIN)/tandem serve $(ARGS)

# Wheels the GPU machine (Python 3.12) lacks; carry `.whl` with a device run.
wheels:
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl \
	  pyzmq==27.3.0 msgspec==0.22.0 fastapi==0.165.0 starlette uvicorn==0.54.0 \
	  grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
	  protobuf==7.36.2 decord==0.6.0 annotated-types pydantic==2.14.4 pydantic-core \
	  typing-inspection h11 anyio sniffio click

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
