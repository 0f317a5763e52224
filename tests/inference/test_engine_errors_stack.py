"""An error the engine (the llamacpp backend) reports reaches every kind of client with the code that
docs/errors.md documents for it. The engine's PROMPT_TOO_LONG is the one a request can cause on
demand: only the engine knows the prompt's token count. (MODEL_UNLOADING is covered end to end by
test_engine_stopping.py; the mapping of every engine error is tested in test_engine_errors.py.)"""

from __future__ import annotations

import grpc
import openai
import pytest
from ferry.inference.v1 import inference_pb2 as pb
from ferry.inference.v1 import inference_pb2_grpc

from services.common.errors import CATALOGUE, Reason, error_details, http_status

pytestmark = pytest.mark.stack

# Gemma's context per slot is 4096 tokens; this is about 5000.
TOO_LONG = "word " * 5000


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_too_long_on_native_grpc(
    native: inference_pb2_grpc.InferenceServiceStub, model: str, stream: bool
) -> None:
    request = pb.GenerateRequest(
        model=f"models/{model}", prompt=TOO_LONG, sampling=pb.SamplingParams(max_tokens=1)
    )
    with pytest.raises(grpc.RpcError) as err:
        if stream:
            list(native.GenerateStream(request, timeout=120))
        else:
            native.Generate(request, timeout=120)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(err.value)
    info = details["ErrorInfo"]
    assert info.reason == Reason.PROMPT_TOO_LONG  # type: ignore[attr-defined]
    assert int(info.metadata["prompt_tokens"]) > int(info.metadata["context_length"]) == 4096  # type: ignore[attr-defined]
    assert details["BadRequest"].field_violations[0].field == "prompt"  # type: ignore[attr-defined]


def test_prompt_too_long_in_the_openai_sdk(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": TOO_LONG}], max_tokens=1
        )
    assert err.value.status_code == http_status(grpc.StatusCode.INVALID_ARGUMENT) == 400
    # OpenAI's error object: the message names both counts, the code is OpenAI's own for it.
    assert "4096" in err.value.message
    assert (err.value.code, err.value.param) == (CATALOGUE[Reason.PROMPT_TOO_LONG].openai_code, "messages")
    assert err.value.code == "context_length_exceeded"
