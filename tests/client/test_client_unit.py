"""ferry_client against a tiny in-process server that answers with ferry's own rich errors: retries
(gRPC's on UNAVAILABLE, ferry's retry hints), typed errors, key and deadline, streams that cancel,
pagination. The same behaviours against the real stack: test_client_package.py."""

from __future__ import annotations

from collections.abc import Iterator

import ferry_client
import grpc
import pytest
from ferry.inference.v1 import inference_pb2
from ferry.models.v1 import models_pb2
from ferry_client import errors

from services.common.errors import Reason, invalid_argument, rate_limited, rpc_error
from tests.client.fake import Script, self_signed, serve, wait_for


@pytest.fixture
def fake() -> Iterator[tuple[Script, str]]:
    script = Script()
    server, target = serve(script)
    yield script, target
    server.stop(grace=None)


def generate() -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(model="models/m", prompt="hi")


def test_unavailable_generation_is_retried_under_one_request_id(fake: tuple[Script, str]) -> None:
    script, target = fake
    script.plan(
        "Generate", rpc_error(Reason.ENGINE_UNAVAILABLE, "engine restarting", retry_after_seconds=0.0)
    )
    with ferry_client.Client(target, api_key="k") as client:
        reply = client.inference.Generate(generate())
    tries = script.calls("Generate")
    assert reply.text == "ok" and len(tries) == 2
    # The client gave the generation a request id; both tries carried it (field and header).
    assert tries[0].request_id and tries[0].request_id == tries[1].request_id == reply.request_id
    assert tries[0].metadata["x-request-id"] == tries[1].metadata["x-request-id"] == reply.request_id


def test_a_callers_own_request_id_is_kept(fake: tuple[Script, str]) -> None:
    script, target = fake
    with ferry_client.Client(target) as client:
        request = generate()
        request.request_id = "my-id-1"
        client.inference.Generate(request)
    assert script.calls("Generate")[0].metadata["x-request-id"] == "my-id-1"


def test_without_retry_the_error_is_typed_with_its_retry_delay(fake: tuple[Script, str]) -> None:
    script, target = fake
    script.plan(
        "Generate", rpc_error(Reason.ENGINE_UNAVAILABLE, "engine restarting", retry_after_seconds=2.5)
    )
    with ferry_client.Client(target, retry=False) as client, pytest.raises(errors.Unavailable) as raised:
        client.inference.Generate(generate())
    err = raised.value
    assert isinstance(err, ferry_client.FerryError) and isinstance(err, grpc.RpcError)
    assert err.code() == grpc.StatusCode.UNAVAILABLE and err.reason == "ENGINE_UNAVAILABLE"
    assert err.retry_delay == 2.5 and err.retryable and err.domain == "ferry.dev"
    assert err.request_id == script.calls("Generate")[0].request_id
    assert len(script.calls("Generate")) == 1


def test_field_violations_are_typed(fake: tuple[Script, str]) -> None:
    script, target = fake
    script.plan("GetModel", invalid_argument("name", "must look like models/{model}"))
    with ferry_client.Client(target) as client, pytest.raises(errors.InvalidArgument) as raised:
        client.models.GetModel(models_pb2.GetModelRequest(name="nope"))
    err = raised.value
    assert err.reason == "INVALID_ARGUMENT" and err.field == "name"
    assert err.field_violations == [("name", "must look like models/{model}")]
    assert err.field_violations[0].description == "must look like models/{model}"
    assert err.metadata == {"field": "name"} and err.retry_delay is None and not err.retryable
    assert len(script.calls("GetModel")) == 1  # not retried: nothing would change


def test_ferrys_retry_hint_is_waited_for_then_tried_again(fake: tuple[Script, str]) -> None:
    script, target = fake
    script.plan("GetModel", rate_limited("1 request per minute", 0.4))
    with ferry_client.Client(target) as client:
        assert client.models.GetModel(models_pb2.GetModelRequest(name="models/m")).name == "models/m"
    first, second = script.calls("GetModel")
    assert second.at - first.at >= 0.35  # the delay ferry asked for (RetryInfo), not gRPC's backoff


def test_a_retry_hint_longer_than_the_policy_allows_is_raised(fake: tuple[Script, str]) -> None:
    script, target = fake
    script.plan("GetModel", rate_limited("1 request per minute", 30))
    with ferry_client.Client(target) as client, pytest.raises(errors.ResourceExhausted) as raised:
        client.models.GetModel(models_pb2.GetModelRequest(name="models/m"))
    assert raised.value.reason == "RATE_LIMITED" and raised.value.retry_delay == 30
    assert raised.value.metadata == {"limit": "1 request per minute"}
    assert len(script.calls("GetModel")) == 1


def test_key_from_the_environment_and_a_default_deadline(
    fake: tuple[Script, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    script, target = fake
    monkeypatch.setenv("FERRY_API_KEY", "fry_from_env")
    with ferry_client.Client(target, timeout=7.0, metadata=[("x-extra", "1")]) as client:
        client.models.GetModel(models_pb2.GetModelRequest(name="models/m"))
        client.models.GetModel(models_pb2.GetModelRequest(name="models/m"), timeout=120)
    short, long = script.calls("GetModel")
    assert short.metadata["authorization"] == "Bearer fry_from_env" and short.metadata["x-extra"] == "1"
    assert short.time_remaining is not None and 0 < short.time_remaining <= 8.0
    assert long.time_remaining is not None and 7.0 < long.time_remaining <= 121  # gRPC rounds deadlines up


def test_breaking_out_of_a_stream_cancels_the_call(fake: tuple[Script, str]) -> None:
    script, target = fake
    with ferry_client.Client(target) as client:
        for n, _piece in enumerate(client.inference.GenerateStream(generate())):
            if n == 2:
                break
        assert wait_for(script.stream_cancelled.is_set), "the server never saw the cancellation"
        script.stream_cancelled.clear()
        with ferry_client.stream(client.inference.GenerateStream(generate())) as pieces:
            held = pieces  # still referenced after the block: the block's exit cancels, not GC
            next(pieces)
        assert wait_for(script.stream_cancelled.is_set) and held.done()


def test_a_mid_stream_error_is_typed(fake: tuple[Script, str]) -> None:
    script, target = fake
    script.plan("GenerateStream:mid", rpc_error(Reason.GENERATION_ABORTED, "engine ended early"))
    with ferry_client.Client(target) as client, pytest.raises(errors.Aborted) as raised:
        for _piece in client.inference.GenerateStream(generate()):
            pass
    assert raised.value.reason == "GENERATION_ABORTED"


def test_paginate_walks_every_page(fake: tuple[Script, str]) -> None:
    script, target = fake
    request = models_pb2.ListModelsRequest(page_size=2)
    with ferry_client.Client(target) as client:
        names = [m.name for m in ferry_client.paginate(client.models.ListModels, request, lambda p: p.models)]
        by_field = [m.name for m in ferry_client.paginate(client.models.ListModels, request, "models")]
    assert names == by_field == [f"models/m{i}" for i in range(5)]
    assert request.page_token == ""  # the caller's request is left alone
    assert len(script.calls("ListModels")) == 6


async def test_async_client_retries_types_errors_cancels_and_paginates(fake: tuple[Script, str]) -> None:
    script, target = fake
    script.plan(
        "Generate", rpc_error(Reason.ENGINE_UNAVAILABLE, "engine restarting", retry_after_seconds=0.0)
    )
    script.plan("GetModel", invalid_argument("name", "bad"), rate_limited("rpm", 0.2))
    async with ferry_client.AsyncClient(target, api_key="k", timeout=20) as client:
        reply = await client.inference.Generate(generate())
        assert reply.text == "ok" and len(script.calls("Generate")) == 2
        assert script.calls("Generate")[0].metadata["authorization"] == "Bearer k"
        with pytest.raises(errors.InvalidArgument) as raised:
            await client.models.GetModel(models_pb2.GetModelRequest(name="x"))
        assert raised.value.field_violations == [("name", "bad")]
        assert (await client.models.GetModel(models_pb2.GetModelRequest(name="models/m"))).name == "models/m"
        stream: ferry_client.AsyncStream[inference_pb2.GenerateStreamResponse]
        async with ferry_client.astream(client.inference.GenerateStream(generate())) as stream:
            async for _piece in stream:
                break
        assert wait_for(script.stream_cancelled.is_set)
        names = [
            m.name
            async for m in ferry_client.apaginate(
                client.models.ListModels, models_pb2.ListModelsRequest(page_size=2), lambda p: p.models
            )
        ]
        assert names == [f"models/m{i}" for i in range(5)]


def test_tls_with_the_servers_certificate_and_refused_without_it() -> None:
    key, cert = self_signed()
    script = Script()
    server, target = serve(script, tls=(key, cert))
    try:
        with ferry_client.Client(target, root_certificates=cert) as client:
            assert client.models.GetModel(models_pb2.GetModelRequest(name="models/m")).name == "models/m"
        # The system's roots do not know this certificate: the channel never connects.
        with ferry_client.Client(target, tls=True, timeout=3, retry=False) as client:
            with pytest.raises((errors.Unavailable, errors.DeadlineExceeded)):
                client.models.GetModel(models_pb2.GetModelRequest(name="models/m"))
    finally:
        server.stop(grace=None)
    assert len(script.calls("GetModel")) == 1
