"""Clients of the real stack for the embeddings tests, and the in-process reference: the same ONNX file
and tokenizer run directly by onnxruntime and tokenizers (backends.onnx.encoder, as the backend)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from backends.llamacpp.config import ferry_home
from backends.onnx.encoder import Encoder
from launcher.setup import onnx_models
from services.common.config import REPO_ROOT
from tests.stack import RunningStack

EMBEDDER = "all-minilm-l6-v2"
CHAT_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def reference() -> Encoder:
    """The model run in this process, straight from the files its config.pbtxt names."""
    params = onnx_models(REPO_ROOT / "triton_models")[EMBEDDER]
    home = ferry_home(str(REPO_ROOT / "triton_models" / EMBEDDER))
    return Encoder(params, params.onnx_path(home), params.tokenizer_path(home))


@pytest.fixture(scope="session")
def client(stack: RunningStack) -> Iterator[openai.OpenAI]:
    """The official SDK, unmodified, pointed at Envoy with the admin key."""
    with openai.OpenAI(
        base_url=f"{stack.rest}/v1", api_key=stack.admin_key, max_retries=0, timeout=60
    ) as sdk:
        yield sdk


@pytest.fixture(scope="session")
def rest(stack: RunningStack) -> Iterator[httpx.Client]:
    with stack.http() as http:
        yield http


def cosine(a: np.ndarray | list[float], b: np.ndarray | list[float]) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
