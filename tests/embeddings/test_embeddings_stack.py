"""Embeddings on the real stack: the OpenAI SDK and REST through Envoy, native gRPC through Envoy and on
the service's port, against all-MiniLM-L6-v2 on the onnx backend in Triton."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import grpc
import httpx
import numpy as np
import openai
import pytest
from ferry.inference.v1 import inference_pb2, inference_pb2_grpc
from ferry.models.v1 import models_pb2, models_pb2_grpc

from backends.onnx.encoder import Encoder
from tests.embeddings.conftest import CHAT_MODEL, EMBEDDER, cosine
from tests.stack import RunningStack

SENTENCES = ["a cat sits on the mat", "a kitten is on the rug", "stock prices fell"]
LONG = "word " * 300  # 302 tokens with [CLS] and [SEP]: over the model's 256


@pytest.fixture(scope="module", params=["envoy", "service"])
def native(request: pytest.FixtureRequest, stack: RunningStack) -> inference_pb2_grpc.InferenceServiceStub:
    target = stack.grpc_target if request.param == "envoy" else stack.service_targets["inference"]
    return inference_pb2_grpc.InferenceServiceStub(stack.channel(target))


def test_the_sdk_embeds_one_input_as_onnxruntime_does(client: openai.OpenAI, reference: Encoder) -> None:
    answer = client.embeddings.create(model=EMBEDDER, input=SENTENCES[0], encoding_format="float")
    assert answer.object == "list" and answer.model == EMBEDDER and len(answer.data) == 1
    vector = answer.data[0].embedding
    assert answer.data[0].index == 0 and len(vector) == 384
    assert cosine(vector, reference.encode([SENTENCES[0]])[0]) >= 0.999
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-3
    # [CLS] a cat sits on the mat [SEP]
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == 8


def test_the_sdk_embeds_many_inputs_in_order_with_its_default_base64(
    client: openai.OpenAI, reference: Encoder
) -> None:
    # The SDK asks for base64 unless told otherwise and decodes it itself.
    answer = client.embeddings.create(model=EMBEDDER, input=SENTENCES)
    expected = reference.encode(SENTENCES)
    assert [item.index for item in answer.data] == [0, 1, 2]
    for item, want in zip(answer.data, expected, strict=True):
        assert cosine(item.embedding, want) >= 0.999
    cat, kitten, stocks = (np.asarray(item.embedding) for item in answer.data)
    assert cosine(cat, kitten) > cosine(cat, stocks) + 0.3
    assert answer.usage.prompt_tokens == 8 + 8 + 5


def test_base64_is_the_float_vector_as_little_endian_float32(rest: httpx.Client) -> None:
    body = {"model": EMBEDDER, "input": SENTENCES[1]}
    floats = rest.post("/v1/embeddings", json={**body, "encoding_format": "float"}).json()
    packed = rest.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert decoded.shape == (384,)
    assert np.allclose(decoded, floats["data"][0]["embedding"], atol=1e-6)
    assert packed["data"][0]["object"] == "embedding" and packed["usage"] == floats["usage"]


def test_native_embed_gives_the_same_vectors(
    native: inference_pb2_grpc.InferenceServiceStub, reference: Encoder
) -> None:
    answer = native.Embed(
        inference_pb2.EmbedRequest(model=f"models/{EMBEDDER}", inputs=SENTENCES), timeout=30
    )
    assert answer.model == f"models/{EMBEDDER}" and answer.request_id
    assert [e.index for e in answer.embeddings] == [0, 1, 2]
    for embedding, want in zip(answer.embeddings, reference.encode(SENTENCES), strict=True):
        assert cosine(list(embedding.values), want) >= 0.999
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (21, 0)


def test_native_embed_refuses_a_long_input_unless_asked_to_truncate(
    native: inference_pb2_grpc.InferenceServiceStub, reference: Encoder
) -> None:
    request = inference_pb2.EmbedRequest(model=f"models/{EMBEDDER}", inputs=["short", LONG])
    with pytest.raises(grpc.RpcError) as refused:
        native.Embed(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("inputs[1]: has 302 tokens")
    request.truncate = True
    answer = native.Embed(request, timeout=30)
    assert answer.usage.prompt_tokens == 3 + 256
    assert cosine(list(answer.embeddings[1].values), reference.encode([LONG])[0]) >= 0.999


def test_more_inputs_than_one_triton_batch_keep_their_order_and_names(
    rest: httpx.Client, reference: Encoder
) -> None:
    """150 inputs travel as three Triton requests (max_batch_size 64): answers and refusals still
    follow the caller's numbering."""
    texts = [f"sentence number {i} about {SENTENCES[i % 3]}" for i in range(150)]
    reply = rest.post("/v1/embeddings", json={"model": EMBEDDER, "input": texts, "encoding_format": "float"})
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    assert [item["index"] for item in data] == list(range(150))
    for i in (0, 63, 64, 149):
        assert cosine(data[i]["embedding"], reference.encode([texts[i]])[0]) >= 0.999
    texts[130] = LONG
    refused = rest.post("/v1/embeddings", json={"model": EMBEDDER, "input": texts})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "input[130]"


# (body changes, status, OpenAI `param`, words the message must have)
BAD_REST_REQUESTS = [
    ({"input": ""}, 400, "input", "must not be empty"),
    ({"input": []}, 400, "input", "empty list"),
    ({"input": ["fine", ""]}, 400, "input[1]", "must not be empty"),
    ({"input": ["fine", 3]}, 400, "input[1]", "must be a string"),
    ({"input": [101, 7592, 102]}, 400, "input", "token-id input is not supported"),
    ({"input": [[101, 102]]}, 400, "input", "token-id input is not supported"),
    ({"input": None}, 400, "input", "is required"),
    ({"input": ["x"] * 2049}, 400, "input", "at most 2048 inputs"),
    ({"input": ["a" * 600_000, "b" * 600_000]}, 400, "input", "more than the 1000000 allowed"),
    ({"input": "ok", "encoding_format": "hex"}, 400, "encoding_format", "'float' or 'base64'"),
    ({"input": "ok", "dimensions": 128}, 400, "dimensions", "only gives 384-dimensional"),
    ({"input": ["ok", LONG]}, 400, "input[1]", "302 tokens"),
    # OpenAI's model_not_found names no param either.
    ({"model": "no-such-model", "input": "ok"}, 404, None, "no-such-model"),
    ({"model": CHAT_MODEL, "input": "ok"}, 400, "model", "does not support embedding"),
]


@pytest.mark.parametrize(("change", "status", "param", "words"), BAD_REST_REQUESTS)
def test_bad_embeddings_requests_are_refused_naming_the_field(
    rest: httpx.Client, change: dict[str, Any], status: int, param: str | None, words: str
) -> None:
    reply = rest.post("/v1/embeddings", json={"model": EMBEDDER, **change})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_the_sdk_sees_a_chat_model_refuse_embeddings(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=CHAT_MODEL, input="hello")
    message = refused.value.message
    assert CHAT_MODEL in message and "embedding" in message
    assert (
        isinstance(refused.value.body, dict)
        and refused.value.body["code"] == "MODEL_CAPABILITY_MISSING".lower()
    )


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (inference_pb2.EmbedRequest(model=f"models/{EMBEDDER}"), "inputs"),
        (inference_pb2.EmbedRequest(model=f"models/{EMBEDDER}", inputs=["fine", ""]), "inputs[1]"),
        (inference_pb2.EmbedRequest(model=f"models/{CHAT_MODEL}", inputs=["fine"]), "model"),
        (inference_pb2.EmbedRequest(model="bad model", inputs=["fine"]), "model"),
    ],
)
def test_bad_native_embed_requests_are_invalid_argument_naming_the_field(
    native: inference_pb2_grpc.InferenceServiceStub, request_: inference_pb2.EmbedRequest, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        native.Embed(request_, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith(f"{field}: ")


def test_chat_and_completions_to_the_embedding_model_are_refused_naming_it(
    rest: httpx.Client, native: inference_pb2_grpc.InferenceServiceStub
) -> None:
    chat = rest.post(
        "/v1/chat/completions", json={"model": EMBEDDER, "messages": [{"role": "user", "content": "hi"}]}
    )
    completion = rest.post("/v1/completions", json={"model": EMBEDDER, "prompt": "hi"})
    for reply, capability in ((chat, "chat"), (completion, "completion")):
        assert reply.status_code == 400, reply.text
        message = reply.json()["error"]["message"]
        assert f"model '{EMBEDDER}' does not support {capability}" in message and "/v1/embeddings" in message
    with pytest.raises(grpc.RpcError) as refused:
        native.Generate(inference_pb2.GenerateRequest(model=f"models/{EMBEDDER}", prompt="hi"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"model '{EMBEDDER}' does not support completion" in refused.value.details()


def test_the_model_is_listed_as_an_embedding_model(client: openai.OpenAI, stack: RunningStack) -> None:
    assert EMBEDDER in {model.id for model in client.models.list()}
    models = models_pb2_grpc.ModelsServiceStub(stack.channel())
    model = models.GetModel(models_pb2.GetModelRequest(name=f"models/{EMBEDDER}"), timeout=10)
    assert model.state == models_pb2.Model.STATE_READY and model.backend == "onnx"
    assert list(model.capabilities) == ["embedding"] and model.dimensions == 384
    assert model.context_length == 256


def test_an_embeddings_request_is_recorded_once_without_its_vectors(rest: httpx.Client) -> None:
    request_id = f"embedding-record-{time.time_ns()}"
    body = {"model": EMBEDDER, "input": SENTENCES[:2], "user": "u-9"}
    reply = rest.post("/v1/embeddings", json=body, headers={"x-request-id": request_id})
    assert reply.status_code == 200
    deadline = time.monotonic() + 15
    record: dict[str, Any] = {}
    while time.monotonic() < deadline:
        found = rest.get(f"/api/v1/transactions/{request_id}")
        if found.status_code == 200 and found.json()["status"] == "STATUS_SUCCEEDED":
            record = found.json()
            break
        time.sleep(0.2)
    assert record, "the transaction record did not arrive"
    assert record["model"] == EMBEDDER and record["operation"].endswith("/CreateEmbedding")
    assert json.loads(record["prompt"]) == SENTENCES[:2]
    assert record["parameters"]["api"] == "embedding" and record["parameters"]["user"] == "u-9"
    assert (
        int(record["usage"]["promptTokens" if "promptTokens" in record["usage"] else "prompt_tokens"]) == 16
    )
    assert not record.get("output"), "vectors are not recorded unless inference.embeddings.record_vectors"


async def test_concurrent_requests_share_onnx_runtime_runs(stack: RunningStack) -> None:
    """Single-input requests sent at once: Triton's dynamic batcher runs several in one execution."""
    triton = stack.triton()

    def counts() -> tuple[int, int]:
        stats = triton.get_inference_statistics(EMBEDDER, as_json=True)["model_stats"][0]
        return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))

    inferences, executions = counts()
    async with stack.aio_channel(stack.service_targets["inference"]) as channel:
        native = inference_pb2_grpc.InferenceServiceStub(channel)
        requests = [
            native.Embed(inference_pb2.EmbedRequest(model=f"models/{EMBEDDER}", inputs=[f"sentence {i}"]))
            for i in range(32)
        ]
        answers = await asyncio.gather(*requests)
    assert all(len(answer.embeddings) == 1 for answer in answers)
    after_inferences, after_executions = counts()
    triton.close()
    assert after_inferences - inferences == 32
    assert after_executions - executions < 32, "every request ran alone: Triton batched none"
