"""An embeddings request's answer in each API's shape: OpenAI's list of `embedding` objects (floats or
base64 of little-endian float32) and the native EmbedResponse."""

from __future__ import annotations

import base64

import numpy as np
from ferry.inference.v1 import inference_pb2
from ferry.openai.v1 import openai_pb2
from google.protobuf import struct_pb2

from services.inference.embeddings.record import EmbeddingCall
from services.inference.embeddings.request import EncodingFormat


def _openai_vector(vector: np.ndarray, encoding: EncodingFormat) -> struct_pb2.Value:
    value = struct_pb2.Value()
    if encoding is EncodingFormat.BASE64:
        value.string_value = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    else:
        value.list_value.extend(vector.tolist())
    return value


def openai_response(call: EmbeddingCall) -> openai_pb2.CreateEmbeddingResponse:
    request, outcome = call.request, call.outcome
    assert outcome.vectors is not None
    tokens = outcome.prompt_tokens
    return openai_pb2.CreateEmbeddingResponse(
        object="list",
        data=[
            openai_pb2.Embedding(
                object="embedding", index=i, embedding=_openai_vector(vector, request.encoding_format)
            )
            for i, vector in enumerate(outcome.vectors)
        ],
        model=request.model,
        usage=openai_pb2.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
    )


def native_response(call: EmbeddingCall) -> inference_pb2.EmbedResponse:
    request, outcome = call.request, call.outcome
    assert outcome.vectors is not None
    tokens = outcome.prompt_tokens
    return inference_pb2.EmbedResponse(
        request_id=call.request_id,
        model=f"models/{request.model}",  # the model that served it (an alias's model)
        embeddings=[
            inference_pb2.Embedding(index=i, values=vector.tolist())
            for i, vector in enumerate(outcome.vectors)
        ],
        usage=inference_pb2.Usage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens),
    )
