"""Clients of the real stack for the embeddings tests (the inference tests' own), and the in-process
reference: the same ONNX file and tokenizer run directly by onnxruntime and tokenizers
(backends.onnx.encoder, as the backend runs them)."""

from __future__ import annotations

import numpy as np
import pytest

from backends.onnx.encoder import Encoder
from launcher.setup import onnx_models
from services.common.config import REPO_ROOT, Settings

# The SDK and REST clients of the inference tests (admin key, through Envoy).
from tests.inference.conftest import client, rest  # noqa: F401

EMBEDDER = "all-minilm-l6-v2"
CHAT_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def reference() -> Encoder:
    """The model run in this process, straight from the files its config.pbtxt names."""
    return Encoder.load(onnx_models(REPO_ROOT / "triton_models")[EMBEDDER], Settings().home)


def cosine(a: np.ndarray | list[float], b: np.ndarray | list[float]) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
