"""Build the runtime assets that are not committed: every model's GGUF file and Triton's backend directory.

Run as `python -m launcher.setup` (`make setup` does). Idempotent: when everything is in place it
compares each GGUF file's size (not a hash: they are hundreds of MB) and each backend file's bytes (a
few MB, so an edited model.py is copied again even at the same size), and returns in tens of
milliseconds.

Each directory of the model repository whose config.pbtxt says `backend: "llamacpp"` names where its
GGUF file comes from (parameters gguf_source, gguf_package, gguf_file; see backends/llamacpp/README.md),
so a new model is a new directory. Directories with `backend: "onnx"` (embedding models) name their
`.onnx` and tokenizer files the same way (see backends/onnx/README.md); setup checks they are there.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from backends.llamacpp.config import BACKEND_NAME, ModelParameters
from backends.llamacpp.gguf import ensure_gguf, gguf_path
from backends.onnx.config import BACKEND_NAME as ONNX_BACKEND
from backends.onnx.config import EmbeddingParameters, check_files
from launcher.triton import BACKEND_DIR, PYTRITON_DIR
from services.common.config import REPO_ROOT, Settings, get_settings

DEFAULT_MODEL = "gemma-3-270m"
# The backend's Triton entry point; its other modules are imported from the repository (the venv's
# .pth puts the repository root on sys.path for the stub's interpreter too).
LLAMACPP_MODEL_PY = REPO_ROOT / "backends" / "llamacpp" / "model.py"
ONNX_MODEL_PY = REPO_ROOT / "backends" / "onnx" / "model.py"


def read_model_config(model_dir: Path) -> model_config_pb2.ModelConfig:
    """A model directory's config.pbtxt, parsed as Triton parses it."""
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _backend_parameters(repository: Path, backend: str) -> dict[str, dict[str, str]]:
    """The `parameters` of every model of the repository served by `backend`, by model name."""
    models = {}
    for config_file in sorted(repository.glob("*/config.pbtxt")):
        config = read_model_config(config_file.parent)
        if config.backend != backend:
            continue
        name = config.name or config_file.parent.name
        models[name] = {key: value.string_value for key, value in config.parameters.items()}
    return models


def llamacpp_models(repository: Path) -> dict[str, ModelParameters]:
    """Every model of the repository served by the llamacpp backend, by model name."""
    return {
        name: ModelParameters.from_strings(name, values)
        for name, values in _backend_parameters(repository, BACKEND_NAME).items()
    }


def onnx_models(repository: Path) -> dict[str, EmbeddingParameters]:
    """Every model of the repository served by the onnx backend, by model name."""
    return {
        name: EmbeddingParameters.from_strings(name, values)
        for name, values in _backend_parameters(repository, ONNX_BACKEND).items()
    }


def model_path(settings: Settings, model: str = DEFAULT_MODEL) -> Path:
    """The GGUF file a model of the repository loads."""
    return gguf_path(llamacpp_models(settings.triton.repository)[model], settings.home)


def ensure_model(settings: Settings) -> str:
    """Assemble or find the GGUF file of every llamacpp model in the repository, and the files of
    every onnx model."""
    repository, home = settings.triton.repository, settings.home
    done = [
        f"model {name}: {ensure_gguf(params, home)}" for name, params in llamacpp_models(repository).items()
    ]
    done += [f"model {name}: {check_files(params, home)}" for name, params in onnx_models(repository).items()]
    return "; ".join(done)


def _copy_if_changed(source: Path, target: Path) -> bool:
    if target.is_file() and target.read_bytes() == source.read_bytes():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    shutil.copy2(source, partial)
    os.replace(partial, target)
    return True


def ensure_backend() -> str:
    """Lay out `<build>/triton/backends/` the way tritonserver looks for backends.

    `python/` holds the Python backend (library, stub, utils); `llamacpp/model.py` and `onnx/model.py`
    make llamacpp and onnx python-based backends: Triton runs each with the Python backend's stub for
    every model that names it.
    """
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = {
        "python/libtriton_python.so": PYTRITON_DIR / "backends/python/libtriton_python.so",
        "python/triton_python_backend_utils.py": PYTRITON_DIR
        / "backends/python/triton_python_backend_utils.py",
        # The stub must match the interpreter that runs model.py (found as `python3` on PATH).
        "python/triton_python_backend_stub": PYTRITON_DIR
        / f"python_backend_stubs/{minor}/triton_python_backend_stub",
        f"{BACKEND_NAME}/model.py": LLAMACPP_MODEL_PY,
        f"{ONNX_BACKEND}/model.py": ONNX_MODEL_PY,
    }
    copied = [name for name, source in sources.items() if _copy_if_changed(source, BACKEND_DIR / name)]
    if copied:
        return f"triton backends: copied {', '.join(copied)} to {BACKEND_DIR}"
    return f"triton backends: {BACKEND_DIR} present"


def main() -> None:
    settings = get_settings()
    started = time.monotonic()
    for step in (lambda: ensure_model(settings), ensure_backend):
        print(f"setup: {step()}", flush=True)
    print(f"setup: done in {time.monotonic() - started:.2f} s", flush=True)


if __name__ == "__main__":
    main()
