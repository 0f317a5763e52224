# ferry: `make run` starts the platform, `make test` runs the suite. Both install what is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
FERRY_HOME ?= $(CURDIR)/.ferry
export FERRY_HOME
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
INSTALLED := $(VENV)/.installed
FERRY_CLI := $(VENV)/bin/ferry
GEN := build/gen
DESCRIPTOR := build/ferry.pb
PROTOS := $(shell find protos -name '*.proto')

.PHONY: install proto setup run test test-unit lint bench soak clean

install: $(INSTALLED) $(FERRY_CLI)

# uv resolves the pinned set in seconds (pip's resolver backtracks for minutes on it).
$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check uv==0.13.9
	$(UV) pip install -q --python $(PY) -r pyproject.toml --extra dev
	$(PY) -c "import site, pathlib; p = pathlib.Path(site.getsitepackages()[0]) / 'ferry-src.pth'; \
	  p.write_text('$(CURDIR)\n$(CURDIR)/$(GEN)\n')"
	# promtool (Debian's prometheus package) checks the alerting rules; only the binary is kept.
	deploy/install-tools.sh $(CURDIR)/$(VENV)/bin
	# Debian's chromium for the browser tests (Playwright drives it; no browser download).
	deploy/install-chromium.sh
	touch $@

# `ferry keys ...` (gateway/cli.py): on PATH under make, else .venv/bin/ferry. A script rather than a
# [project.scripts] entry: ferry is not an installed package (its sources are on the path via a .pth).
$(FERRY_CLI): $(INSTALLED)
	printf '#!/bin/sh\nexec "$$(dirname "$$0")/python" -m gateway.cli "$$@"\n' > $@
	chmod 0755 $@

proto: $(GEN)/.stamp

GOOGLEAPIS = $$($(PY) -c "import google.api.annotations_pb2 as a, pathlib; print(pathlib.Path(a.__file__).parents[2])")

$(GEN)/.stamp: $(INSTALLED) $(PROTOS)
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -Iprotos -I$(GOOGLEAPIS) \
	  --python_out=$(GEN) --mypy_out=$(GEN) --grpc_python_out=$(GEN) --mypy_grpc_out=$(GEN) $(PROTOS)
	# Envoy's transcoder renders error details (ErrorInfo, BadRequest, RetryInfo) as JSON only when
	# their types are in its descriptor set; without them it passes the raw gRPC error through.
	$(PY) -m grpc_tools.protoc -Iprotos -I$(GOOGLEAPIS) --include_imports --include_source_info \
	  --descriptor_set_out=$(DESCRIPTOR) $(PROTOS) google/rpc/error_details.proto google/rpc/status.proto
	find $(GEN)/ferry -type d -exec touch {}/__init__.py \;
	touch $@

# Runtime assets that are built, not committed: the model file and Triton's backend directory.
setup: proto
	$(PY) -m launcher.setup

run: setup $(FERRY_CLI)
	exec $(PY) -m launcher

test: setup
	$(PY) -m pytest

test-unit: proto
	$(PY) -m pytest -m "not stack"

lint: proto
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy services gateway launcher tests bench backends tools
	# buf lint (protos/buf.yaml) and buf breaking against the previous commit: the protos are a public API.
	$(PY) -m tools.proto_guard

bench: setup
	$(PY) -m bench
	$(PY) -m bench.embeddings

soak: setup
	$(PY) -m bench.soak

clean:
	rm -rf build $(VENV)
