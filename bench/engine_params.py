"""The engine settings of ferry's model, read from its config.pbtxt as the backend reads them.

The raw-engine peer must run with exactly what Triton's model runs with, so both sides of the
comparison read the same file through the same code (`launcher.setup.llamacpp_models`).
"""

from __future__ import annotations

from backends.llamacpp.config import ModelParameters
from launcher.setup import llamacpp_models
from services.common.config import REPO_ROOT

MODEL_NAME = "gemma-3-270m"
REPOSITORY = REPO_ROOT / "triton_models"


def engine_params(model: str = MODEL_NAME) -> ModelParameters:
    return llamacpp_models(REPOSITORY)[model]


def engine_summary(params: ModelParameters) -> dict[str, object]:
    """What a results file records of the engine's settings."""
    return {
        "n_parallel": params.n_parallel,
        "n_ctx": params.ctx_size,
        "n_threads": params.n_threads,
        "prompt_cache_mib": params.prompt_cache_mib,
        "omp_wait_policy": params.omp_wait_policy,
    }
