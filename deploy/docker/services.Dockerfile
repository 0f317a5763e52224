# syntax=docker/dockerfile:1
# The ferry services image: one image, four processes (`python -m services.<name>`), chosen by the
# command; $FERRY_SERVICE names the service for the HEALTHCHECK. Build from the repository root:
#   docker build -f deploy/docker/services.Dockerfile -t ferry/services .
# (deploy/docker/services.Dockerfile.dockerignore keeps .venv, build/ and .ferry/ out of the context.)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment with the runtime pins, and the generated gRPC code ----------------
FROM ${PYTHON_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# uv: the same installer and version as `make install`.
RUN pip install uv==0.13.9
COPY pyproject.toml ./
COPY deploy/docker/requirements.py deploy/docker/
# Runtime dependencies only (no engine, model, Triton, Envoy or embedded PostgreSQL: see requirements.py).
RUN python deploy/docker/requirements.py services > /tmp/runtime.txt \
    && python deploy/docker/requirements.py protoc > /tmp/protoc.txt \
    && python -m venv /opt/venv \
    && uv pip install --python /opt/venv/bin/python --no-cache -r /tmp/runtime.txt \
    && python -m venv /opt/protoc \
    && uv pip install --python /opt/protoc/bin/python --no-cache -r /tmp/protoc.txt
COPY protos/ protos/
# The stubs command of `make proto` (Makefile), less the mypy stubs: typing is not needed at run time.
# (tests/deploy checks the two stay the same command.)
RUN mkdir -p build/gen \
    && find protos -name '*.proto' -print0 | xargs -0 /opt/protoc/bin/python -m grpc_tools.protoc -Iprotos \
       -I"$(/opt/protoc/bin/python -c 'import google.api.annotations_pb2 as a, pathlib; print(pathlib.Path(a.__file__).parents[2])')" \
       --python_out=build/gen --grpc_python_out=build/gen \
    && find build/gen/ferry -type d -exec touch {}/__init__.py \;

# --- runtime: the interpreter, the venv, the code; nothing to compile, no build tools -------------
FROM ${PYTHON_IMAGE} AS runtime
# A fixed numeric id, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --system --gid 10001 ferry \
    && useradd --system --uid 10001 --gid ferry --home-dir /var/lib/ferry --create-home \
       --shell /usr/sbin/nologin ferry \
    && install -d -o ferry -g ferry /var/lib/ferry/spool
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src/build/gen /app/build/gen
COPY services/ /app/services/
COPY gateway/ /app/gateway/
# The engine contract (backends/llamacpp/contract.py) the inference service shares with the Triton backend.
COPY backends/ /app/backends/
COPY deploy/docker/healthcheck.py /app/healthcheck.py
COPY --chmod=0755 deploy/docker/entrypoint.sh /usr/local/bin/ferry-entrypoint
# FERRY_HOME holds the runtime data; the recording spool (spool/) is the part to keep on a volume.
# The directory exists, owned by ferry, so a fresh named volume mounted on it inherits that owner.
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONPATH=/app:/app/build/gen \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FERRY_HOME=/var/lib/ferry \
    FERRY_LOG_FORMAT=json
WORKDIR /app
USER 10001:10001
EXPOSE 50051 50052 50053 50054 50056 50057 50058 8095 9101 9102 9103 9104 9106 9107 9108 9110
# Standard grpc.health.v1 Check against this container's service ($FERRY_SERVICE), port from Settings.
# Probed every 2 s while starting (Docker 25+) so `depends_on: service_healthy` moves on quickly;
# failures count only after 180 s, time for its dependencies (Triton and the model, PostgreSQL) to come up.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --start-interval=2s --retries=3 \
    CMD ["python", "/app/healthcheck.py"]
ENTRYPOINT ["ferry-entrypoint"]
ENV FERRY_SERVICE=inference
CMD ["python", "-m", "services.inference"]
