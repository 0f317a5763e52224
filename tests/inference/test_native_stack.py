"""The native InferenceService on the real stack, through Envoy's listener and on the service port."""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import pytest
from ferry.inference.v1 import inference_pb2 as pb
from ferry.inference.v1 import inference_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.errors import error_details
from tests.stack import RunningStack

pytestmark = pytest.mark.stack


def request(model: str, **sampling: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=f"models/{model}", prompt="The capital of France is", sampling=pb.SamplingParams(**sampling)
    )


def test_generate(native: inference_pb2_grpc.InferenceServiceStub, model: str) -> None:
    reply = native.Generate(request(model, max_tokens=4, ignore_eos=True), timeout=60)
    assert reply.model == f"models/{model}" and reply.request_id and reply.created > 0
    assert reply.text and reply.finish_reason == pb.FINISH_REASON_LENGTH
    assert reply.usage.completion_tokens == 4
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 4


def test_generate_stream(native: inference_pb2_grpc.InferenceServiceStub, model: str) -> None:
    pieces = list(native.GenerateStream(request(model, max_tokens=5, ignore_eos=True), timeout=60))
    assert sum(p.token_count for p in pieces) == 5 and "".join(p.text for p in pieces)
    assert [p.finish_reason for p in pieces][-1] == pb.FINISH_REASON_LENGTH
    assert all(p.finish_reason == pb.FINISH_REASON_UNSPECIFIED for p in pieces[:-1])
    assert pieces[-1].usage.completion_tokens == 5 and pieces[-1].usage.prompt_tokens > 0


def test_generate_from_chat_messages(native: inference_pb2_grpc.InferenceServiceStub, model: str) -> None:
    messages = pb.Messages(messages=[pb.ChatMessage(role="user", content="Say hello.")])
    reply = native.Generate(
        pb.GenerateRequest(
            model=f"models/{model}", messages=messages, sampling=pb.SamplingParams(max_tokens=3)
        ),
        timeout=60,
    )
    assert reply.usage.prompt_tokens > 5  # the template's turn markers are part of the prompt


def test_stop_and_client_request_id(native: inference_pb2_grpc.InferenceServiceStub, model: str) -> None:
    reply = native.Generate(
        pb.GenerateRequest(
            model=f"models/{model}",
            request_id="native-test-0001",
            prompt="1, 2, 3, 4, 5,",
            sampling=pb.SamplingParams(max_tokens=6, temperature=0, stop=[","]),
        ),
        timeout=60,
    )
    assert reply.request_id == "native-test-0001"
    assert "," not in reply.text and reply.finish_reason == pb.FINISH_REASON_STOP


def test_invalid_argument_with_field_violation(
    native: inference_pb2_grpc.InferenceServiceStub, model: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        native.Generate(request(model, temperature=7), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = error_details(err.value)["BadRequest"].field_violations  # type: ignore[attr-defined]
    assert violations[0].field == "sampling.temperature"


def test_unknown_model_is_not_found(native: inference_pb2_grpc.InferenceServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(native.GenerateStream(request("no-such-model", max_tokens=1), timeout=10))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_native_rest_paths(rest: httpx.Client, model: str) -> None:
    body = {"prompt": "Hello", "sampling": {"max_tokens": 2, "ignore_eos": True}}
    reply = rest.post(f"/api/v1/models/{model}:generate", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["finish_reason"] == "FINISH_REASON_LENGTH"
    bad = rest.post(f"/api/v1/models/{model}:generate", json={"prompt": "x", "sampling": {"top_p": 3}})
    assert bad.status_code == 400 and "sampling.top_p" in bad.json()["message"]


def test_mid_stream_failure_ends_the_stream_with_its_status(stack: RunningStack, model: str) -> None:
    """A failure after pieces were sent (the deadline runs out mid-generation) reaches the caller
    as the stream's status, with the service's own error details (not just the client's timer)."""
    stub = inference_pb2_grpc.InferenceServiceStub(stack.channel(stack.service_targets["inference"]))
    pieces = []
    with pytest.raises(grpc.RpcError) as err:
        for piece in stub.GenerateStream(request(model, max_tokens=2000, ignore_eos=True), timeout=3.0):
            pieces.append(piece)
    assert pieces, "the failure must come after the stream started"
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error_details(err.value)["ErrorInfo"].reason == "DEADLINE_EXCEEDED"  # type: ignore[attr-defined]


def test_health_covers_the_model(stack: RunningStack) -> None:
    health = health_pb2_grpc.HealthStub(stack.channel(stack.service_targets["inference"]))
    for service in ("ferry.inference.v1.InferenceService", "ferry.openai.v1.OpenAIService", ""):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
