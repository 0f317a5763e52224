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
# The generated `ferry` package lives in ferry-client's source folder (one copy, on the path through
# ferry-client's editable install; a built ferry-client wheel generates its own).
GEN := clients/python/src
PROTO_STAMP := build/.proto-stamp
DESCRIPTOR := build/ferry.pb
PROTOS := $(shell find protos -name '*.proto')

.PHONY: install proto setup run test test-unit lint bench soak fuzz clean

install: $(INSTALLED)

# uv resolves the pinned set in seconds (pip's resolver backtracks for minutes on it). Then ferry and
# ferry-client install as editable projects (no dependencies of their own beyond the pins): ferry puts
# the repository root on the path (pyproject.toml's dev-mode-dirs) and its console scripts in .venv/bin;
# ferry-client puts clients/python/src on it, where `make proto` writes the generated `ferry` package,
# and its console script `ferry` (ferry_client.cli: `ferry keys`, `ferry chat`, ...) in .venv/bin.
$(INSTALLED): pyproject.toml clients/python/pyproject.toml clients/python/hatch_build.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check uv==0.13.9
	$(UV) pip install -q --python $(PY) -r pyproject.toml --extra dev
	# xds-protos ships an old copy of opentelemetry/proto (no InstrumentationScope: the OTLP exporter
	# fails to import) and uv unpacks wheels in parallel, so either copy could win: opentelemetry-proto's goes last.
	$(UV) pip install -q --python $(PY) -r pyproject.toml --extra dev --reinstall-package opentelemetry-proto
	$(UV) pip install -q --python $(PY) --no-deps --reinstall-package ferry --reinstall-package ferry-client \
	  -e . -e ./clients/python
	# The path file of earlier checkouts (repository root and build/gen): the editable installs replace it.
	rm -f "$$($(PY) -c 'import site; print(site.getsitepackages()[0])')/ferry-src.pth"
	# promtool (Debian's prometheus package) checks the alerting rules; only the binary is kept.
	deploy/install-tools.sh $(CURDIR)/$(VENV)/bin
	# Debian's chromium for the browser tests (Playwright drives it; no browser download).
	deploy/install-chromium.sh
	touch $@

proto: $(PROTO_STAMP)

GOOGLEAPIS = $$($(PY) -c "import google.api.annotations_pb2 as a, pathlib; print(pathlib.Path(a.__file__).parents[2])")

# protoc writes into a scratch folder that replaces $(GEN)/ferry whole (processes importing the stubs
# meanwhile never see a half-written package); the mypy stubs (.pyi) and py.typed are for type checkers.
$(PROTO_STAMP): $(INSTALLED) $(PROTOS)
	rm -rf build/gen-new && mkdir -p build/gen-new build
	$(PY) -m grpc_tools.protoc -Iprotos -I$(GOOGLEAPIS) \
	  --python_out=build/gen-new --mypy_out=build/gen-new --grpc_python_out=build/gen-new --mypy_grpc_out=build/gen-new $(PROTOS)
	find build/gen-new/ferry -type d -exec touch {}/__init__.py \;
	touch build/gen-new/ferry/py.typed
	rm -rf $(GEN)/.ferry-old && { test ! -d $(GEN)/ferry || mv $(GEN)/ferry $(GEN)/.ferry-old; } \
	  && mv build/gen-new/ferry $(GEN)/ferry && rm -rf $(GEN)/.ferry-old build/gen-new
	# Envoy's transcoder renders error details (ErrorInfo, BadRequest, RetryInfo) as JSON only when
	# their types are in its descriptor set; without them it passes the raw gRPC error through.
	$(PY) -m grpc_tools.protoc -Iprotos -I$(GOOGLEAPIS) --include_imports --include_source_info \
	  --descriptor_set_out=$(DESCRIPTOR) $(PROTOS) google/rpc/error_details.proto google/rpc/status.proto
	touch $@

# Runtime assets that are built, not committed: the model file and Triton's backend directory.
setup: proto
	$(PY) -m launcher.setup

run: setup
	exec $(PY) -m launcher

test: setup
	$(PY) -m pytest

test-unit: proto
	$(PY) -m pytest -m "not stack"

lint: proto
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy services gateway launcher tests bench backends tools clients/python/src/ferry_client
	# buf lint (protos/buf.yaml) and buf breaking against the previous commit: the protos are a public API.
	$(PY) -m tools.proto_guard

bench: setup
	$(PY) -m bench
	$(PY) -m bench.embeddings
	$(PY) -P -m bench.cache
	$(PY) -P -m bench.prefix
	$(PY) -P -m bench.overload

soak: setup
	$(PY) -m bench.soak

# The hostile-input suite with many more examples than `make test` runs (FUZZ_EXAMPLES per route and method).
FUZZ_EXAMPLES ?= 200
fuzz: setup
	FERRY_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/hostile -p no:cacheprovider -o timeout=1800

clean:
	rm -rf build $(VENV)
