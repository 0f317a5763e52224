"""The engine settings of ferry's model (slots, context, threads), read from its config.pbtxt.

The raw-engine peer must run with exactly what Triton's model runs with, so both sides of the
comparison read the same file. Keys follow llama.cpp's names; each may be absent (engine default).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from services.common.config import REPO_ROOT

MODEL_NAME = "gemma-3-270m"
CONFIG_PATH = REPO_ROOT / "triton_models" / MODEL_NAME / "config.pbtxt"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"

_PARAM = re.compile(r'key:\s*"([^"]+)"\s*value:\s*\{\s*string_value:\s*"((?:[^"\\]|\\.)*)"\s*\}', re.S)


@dataclass(frozen=True)
class EngineParams:
    n_parallel: int
    n_ctx: int
    n_threads: int
    n_batch: int | None = None
    n_ubatch: int | None = None
    # How llama.cpp's OpenMP threads wait (the model sets PASSIVE: spinning collapses decoding on a
    # shared CPU). Read by OpenMP when xllamacpp loads, so it goes into the peer's environment.
    omp_wait_policy: str = "PASSIVE"

    def as_dict(self) -> dict[str, int | str | None]:
        return asdict(self)


def config_parameters(path: Path = CONFIG_PATH) -> dict[str, str]:
    """`parameters { key: ... value: { string_value: ... } }` entries of a config.pbtxt."""
    return {k: v for k, v in _PARAM.findall(path.read_text())} if path.exists() else {}


def _first_int(params: dict[str, str], *keys: str) -> int | None:
    for key in keys:
        value = params.get(key, "").strip()
        if value.lstrip("-").isdigit():
            return int(value)
    return None


def engine_params(path: Path = CONFIG_PATH) -> EngineParams:
    params = config_parameters(path)
    threads = _first_int(params, "n_threads")
    # Defaults are the model's own (triton_models/gemma-3-270m/1/model.py) for keys the file omits.
    return EngineParams(
        n_parallel=_first_int(params, "n_parallel") or 4,
        n_ctx=_first_int(params, "ctx_size") or 16384,
        # llama.cpp's -1 means "the machine's cores"; make it explicit so both sides agree.
        n_threads=threads if threads and threads > 0 else 2,
        n_batch=_first_int(params, "n_batch"),
        n_ubatch=_first_int(params, "n_ubatch"),
        omp_wait_policy=params.get("omp_wait_policy", os.environ.get("OMP_WAIT_POLICY", "PASSIVE")),
    )
