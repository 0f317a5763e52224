"""Prompt lengths in the model's own tokens: the llamacpp backend's `count_tokens` mode (llama.cpp's
tokenizer, reached through Triton; backends/llamacpp/contract.py COUNT_TOKENS_INPUT). Nothing is
generated and no engine slot is taken."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from tritonclient.grpc import InferInput
from tritonclient.grpc import aio as triton_aio

from backends.llamacpp.contract import COUNT_TOKENS_INPUT
from services.common.config import TritonSettings
from services.common.errors import RpcError
from services.common.triton_client import ModelInfo, connect, engine_unavailable, model_info, string_input

COUNT_SECONDS = 10.0


class TokenCounter:
    """One Triton client per process, made on first use (it belongs to the running event loop)."""

    def __init__(self, triton: TritonSettings) -> None:
        self.triton = triton
        self._client: triton_aio.InferenceServerClient | None = None

    def _connect(self) -> triton_aio.InferenceServerClient:
        if self._client is None:
            self._client = connect(self.triton)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def model(self, model_id: str) -> ModelInfo | None:
        """The model's metadata (context length, chat template); None when Triton does not serve it."""
        try:
            return await model_info(self._connect(), model_id)
        except RpcError:
            raise
        except Exception:
            return None

    async def count(self, model_id: str, prompt: str) -> int:
        """The prompt's length in `model_id`'s tokens; ENGINE_UNAVAILABLE when the engine cannot say."""
        text = string_input("text_input", prompt)
        flag = InferInput(COUNT_TOKENS_INPUT, [1], "BOOL")
        flag.set_data_from_numpy(np.array([True], dtype=np.bool_))

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": model_id, "inputs": [text, flag]}

        try:
            async for result, error in self._connect().stream_infer(requests(), stream_timeout=COUNT_SECONDS):
                if error is not None:
                    raise _unavailable(model_id, error.message())
                count = result.as_numpy("num_input_tokens")
                if count is not None:
                    return int(count.reshape(-1)[0])
        except RpcError:
            raise
        except Exception as err:  # Triton unreachable, timed out, or the stream broke
            raise _unavailable(model_id, str(err)) from err
        raise _unavailable(model_id, "the engine ended the count without an answer")


def _unavailable(model: str, why: str) -> RpcError:
    return engine_unavailable(model, "count the conversation's tokens", why)
