"""Envoy's edge configuration (envoy/envoy.yaml.j2 + envoy/ferry.lua) on a real Envoy.

The configuration is validated by Envoy itself. Its error paths and request handling (Retry-After,
mid-stream errors, the OpenAI stream switch, request ids, readiness, CORS, the body limit, how key
refusals reach REST and gRPC clients) are driven here against a small in-process gRPC upstream that
answers on demand, since the real services cannot be made to fail at will. It also stands in for the
gateway's ext_authz check, refusing with the gateway's own refusal (gateway.ext_authz.denied); the
real gateway's decisions are covered by tests/gateway and, through the real stack, tests/auth.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from ferry.auth.v1 import auth_pb2
from ferry.models.v1 import models_pb2, models_pb2_grpc
from ferry.openai.v1 import openai_pb2, openai_pb2_grpc
from google.api import httpbody_pb2
from google.protobuf import descriptor_pb2
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.ext_authz import client_address, denied
from launcher import envoy as envoy_config
from launcher.envoy import (
    ADMIN_SOCKET_MODE,
    DESCRIPTOR,
    admin_socket,
    described_services,
    envoy_program,
    internal_methods,
    render_envoy_config,
    upstreams,
    validate_command,
)
from services.common import access
from services.common.config import Settings
from services.common.errors import (
    CATALOGUE,
    OPENAI_ERROR_METADATA,
    OPENAI_TYPE,
    Reason,
    RpcError,
    invalid_argument,
    openai_error,
    openai_error_json,
    rate_limited,
)
from services.inference.openai_api import sse
from services.inference.openai_api.chunks import openai_stream_error
from tests.stack import RunningStack, stack_settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_NAMES = [
    u.health_service
    for u in upstreams(stack_settings(Path("/nonexistent"), auth={"service_token": "unused"}))
]
SERVICE_TOKEN = "edge-test-service-token"
KEY = "fry_edge-test-key"
READ_ONLY_KEY = "fry_edge-test-read-only"
# The scripted check fails (an error, not a decision) for this key: Envoy answers 503 itself.
BROKEN_CHECK_KEY = "fry_edge-test-broken-check"
ORIGIN = "https://app.example"
MAX_REQUEST_BYTES = 64 * 1024


def edge_settings(home: Path, **envoy: Any) -> Settings:
    settings = stack_settings(home, auth={"service_token": SERVICE_TOKEN})
    return settings.model_copy(update={"envoy": settings.envoy.model_copy(update=envoy)})


def _validate(config: Path) -> None:
    result = subprocess.run(validate_command(config), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_rendered_config_is_valid_and_private(tmp_path: Path) -> None:
    config = render_envoy_config(edge_settings(tmp_path, cors_allow_origins=[ORIGIN, "*"]))
    _validate(config)
    text = config.read_text()
    assert "envoy.filters.http.ext_authz" in text
    assert "envoy.filters.http.cors" in text
    # It holds the service token: readable by its owner only.
    assert f"Bearer {SERVICE_TOKEN}" in text
    assert config.stat().st_mode & 0o777 == 0o600


def test_without_auth_envoy_asks_for_no_key(tmp_path: Path) -> None:
    settings = stack_settings(tmp_path, auth={"enabled": False})
    config = render_envoy_config(settings)
    _validate(config)
    text = config.read_text()
    assert "envoy.filters.http.ext_authz" not in text
    assert "envoy.filters.http.cors" not in text  # off unless origins are configured
    # Nobody can claim to be the edge: a client's x-ferry-edge is dropped.
    assert "request_headers_to_remove: [x-ferry-edge]" in text


def test_auth_without_a_service_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="service_token"):
        render_envoy_config(stack_settings(tmp_path))


def test_the_admin_interface_is_an_owner_only_socket_not_a_port(tmp_path: Path) -> None:
    """The admin interface shows the service token (/config_dump) and can stop Envoy: no TCP address,
    only a unix socket its owner may open. The admin port is a read-only listener in front of it."""
    settings = edge_settings(tmp_path, xff_num_trusted_hops=2)
    config = yaml.safe_load(render_envoy_config(settings).read_text())
    assert config["admin"]["address"] == {
        "pipe": {"path": str(admin_socket(settings)), "mode": ADMIN_SOCKET_MODE}
    }
    assert ADMIN_SOCKET_MODE == 0o600
    listeners = {listener["name"]: listener for listener in config["static_resources"]["listeners"]}
    assert listeners["admin_read_only"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": settings.envoy.admin_port,
    }
    # And the client address is the TCP peer, or what the configured proxies in front say it is.
    edge = listeners["edge"]["filter_chains"][0]["filters"][0]["typed_config"]
    assert (edge["use_remote_address"], edge["xff_num_trusted_hops"]) == (True, 2)


def test_a_home_too_long_for_the_admin_socket_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unix socket"):
        render_envoy_config(edge_settings(tmp_path / ("h" * 120)))


def test_internal_methods_come_from_the_access_option() -> None:
    # Spelt out in launcher/envoy.py, which reads them without ferry's generated stubs.
    assert (envoy_config.INTERNAL, envoy_config.ACCESS_OPTION) == (access.INTERNAL, auth_pb2.access.full_name)
    internal = {f"{s}/{m}" for s, methods in internal_methods(DESCRIPTOR).items() for m in methods}
    assert internal == {
        "ferry.auth.v1.AuthService/Authorize",
        "ferry.auth.v1.AuthService/RecordUsage",
        "ferry.audit.v1.AuditService/AppendEvents",
        "ferry.transactions.v1.TransactionsService/CreateTransaction",
        "ferry.transactions.v1.TransactionsService/CompleteTransaction",
        "ferry.transactions.v1.TransactionsService/BatchCreateTransactions",
        "ferry.transactions.v1.TransactionsService/BatchCompleteTransactions",
        # The jobs service reads a key's webhook signing secret to sign the key's job events.
        "ferry.keys.v1.KeysService/GetWebhookSecret",
    }


def test_services_missing_from_the_descriptor_are_not_transcoded(tmp_path: Path) -> None:
    # Envoy refuses to start when a transcoded service is not in the descriptor set, so a
    # descriptor built before a proto exists must still give a valid configuration.
    full = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR.read_bytes())
    partial = descriptor_pb2.FileDescriptorSet(
        file=[f for f in full.file if not f.name.startswith("ferry/transactions/")]
    )
    descriptor = tmp_path / "partial.pb"
    descriptor.write_bytes(partial.SerializeToString())
    assert "ferry.transactions.v1.TransactionsService" not in described_services(descriptor)

    config = render_envoy_config(edge_settings(tmp_path), descriptor)
    text = config.read_text()
    result = subprocess.run(validate_command(config), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # Still routed natively, and still health checked.
    assert 'prefix: "/ferry.transactions.v1.TransactionsService/"' in text
    assert "service_name: ferry.transactions.v1.TransactionsService" in text


# -- a real Envoy in front of a scripted upstream ------------------------------------------------


class Scripted(openai_pb2_grpc.OpenAIServiceServicer, models_pb2_grpc.ModelsServiceServicer):
    """Answers by the prompt it gets, and remembers the request metadata it saw."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    def _seen(self, context: grpc.ServicerContext) -> None:
        self.metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})

    def CreateCompletion(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._seen(context)
        prompt = request.prompt.string_value
        if prompt == "busy-with-metadata":
            context.set_trailing_metadata((("retry-after", "7"),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
        if prompt == "busy-with-retry-info":
            error = RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", "BUSY", retry_after_seconds=2.5)
            context.abort_with_status(error.to_status())
        if prompt == "busy":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
        if prompt == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "try later")
        if prompt in SERVICE_ERRORS:
            _abort_as_ferry(context, SERVICE_ERRORS[prompt])
        if prompt.startswith("bare-"):
            # An error without ferry's reason or OpenAI JSON (grpc's own, or a relayed one).
            code = grpc.StatusCode[prompt.removeprefix("bare-")]
            context.abort_with_status(RpcError(code, f"bare {code.name}", code.name).to_status())
        return openai_pb2.Completion(id="unary", model=request.model)

    def CreateCompletionStream(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._seen(context)
        if request.prompt.string_value in SERVICE_ERRORS:
            _abort_as_ferry(context, SERVICE_ERRORS[request.prompt.string_value])
        for i in range(3):
            yield sse.event(openai_pb2.Completion(id=f"chunk-{i}", model=request.model))
            if request.prompt.string_value == "fail-midway" and i == 1:
                context.abort(grpc.StatusCode.INTERNAL, "engine died")
            if request.prompt.string_value == "error-event" and i == 1:
                # As chunks.stream_chunks ends a stream that fails after it started.
                error = openai_stream_error(RpcError(grpc.StatusCode.INTERNAL, "engine died", "ENGINE_ERROR"))
                yield sse.event(openai_pb2.Completion(id="chunk-error", error=error))
                context.abort(grpc.StatusCode.INTERNAL, "engine died")
        yield httpbody_pb2.HttpBody(content_type=sse.CONTENT_TYPE, data=sse.DONE)

    def CreateChatCompletion(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._seen(context)
        return openai_pb2.ChatCompletion(id="unary-chat")

    def CreateChatCompletionStream(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._seen(context)
        for i in range(2):
            yield sse.event(openai_pb2.ChatCompletionChunk(id=f"chat-chunk-{i}"))
        yield httpbody_pb2.HttpBody(content_type=sse.CONTENT_TYPE, data=sse.DONE)

    def ListModels(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._seen(context)
        if request.page_token == "busy":
            error = RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", "BUSY", retry_after_seconds=2.5)
            context.abort_with_status(error.to_status())
        if request.page_token == "bad":
            context.abort_with_status(invalid_argument("page_token", "cannot parse").to_status())
        return models_pb2.ListModelsResponse(models=[models_pb2.Model(name="models/scripted")])


def _abort_as_ferry(context: grpc.ServicerContext, error: RpcError) -> None:
    """As the serving interceptor fails an OpenAI call: the rich status and OpenAI's error JSON."""
    status = error.to_status()
    metadata = (*status.trailing_metadata, (OPENAI_ERROR_METADATA, openai_error_json(error)))
    context.abort_with_status(status._replace(trailing_metadata=metadata))


# Errors the scripted OpenAI service answers as a ferry service does, by prompt.
SERVICE_ERRORS = {
    "bad-temperature": invalid_argument("temperature", "must be in [0, 2], got 3"),
    "rate-limited": rate_limited("requests per minute", 2.5),
    # One that quotes a huge input: cut (errors.TEXT_LIMIT), or Envoy would reset the stream.
    "long-message": invalid_argument("messages[0].role", "'" + "x" * 100_000 + "' is not one of user"),
}


class ScriptedCheck(external_auth_pb2_grpc.AuthorizationServicer):
    """The gateway's ext_authz Check with a fixed decision: KEY may do anything, READ_ONLY_KEY
    nothing here, no other key is known. Refusals are the gateway's own (gateway.ext_authz.denied)."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, str], str, dict[str, str]]] = []
        # The client address of each check (what the gateway counts per-address limits by).
        self.sources: list[str] = []

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        http = request.attributes.request.http
        headers = dict(http.headers)
        self.seen.append(({k: v for k, v in context.invocation_metadata()}, http.path, headers))
        self.sources.append(client_address(request))
        presented = headers.get("authorization", "")
        if presented == f"Bearer {BROKEN_CHECK_KEY}":
            context.abort(grpc.StatusCode.INTERNAL, "the key store is broken")
        if presented == f"Bearer {KEY}":
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK), ok_response=external_auth_pb2.OkHttpResponse()
            )
        if presented == f"Bearer {READ_ONLY_KEY}":
            refusal = RpcError(grpc.StatusCode.PERMISSION_DENIED, "this key lacks the admin scope", "SCOPE")
        else:
            refusal = RpcError(grpc.StatusCode.UNAUTHENTICATED, "no valid API key", "MISSING_KEY")
        return denied(refusal)


AUTHORIZED = {"authorization": f"Bearer {KEY}"}
GRPC_AUTHORIZED = (("authorization", f"Bearer {KEY}"),)


class Edge:
    def __init__(
        self,
        settings: Settings,
        upstream: Scripted,
        check: ScriptedCheck,
        health: health.HealthServicer,
    ) -> None:
        self.settings = settings
        self.base = f"http://{settings.envoy.host}:{settings.envoy.port}"
        self.grpc_target = f"{settings.envoy.host}:{settings.envoy.port}"
        self.upstream = upstream
        self.check = check
        self.health = health

    def get(self, path: str, **options: Any) -> httpx.Response:
        """GET with the accepted key (unless the headers say otherwise)."""
        headers = {**AUTHORIZED, **options.pop("headers", {})}
        return httpx.get(f"{self.base}{path}", headers=headers, **options)


def _wait_ready(base: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("Envoy did not become ready")


@contextmanager
def running_edge(settings: Settings) -> Iterator[Edge]:
    """Real Envoy on `settings`, in front of one scripted process standing in for every service."""
    upstream = Scripted()  # type: ignore[abstract]  # the RPCs it does not script answer UNIMPLEMENTED
    check = ScriptedCheck()
    health_servicer = health.HealthServicer()
    for name in HEALTH_NAMES:
        health_servicer.set(name, SERVING)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    openai_pb2_grpc.add_OpenAIServiceServicer_to_server(upstream, server)
    models_pb2_grpc.add_ModelsServiceServicer_to_server(upstream, server)
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(check, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # One process stands in for all the services and the gateway.
    for u in upstreams(settings):
        server.add_insecure_port(u.endpoint.address)
    server.start()
    program = envoy_program(settings)
    log = (settings.log_dir / "envoy.log").open("w")
    envoy = subprocess.Popen(program.argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(f"http://{settings.envoy.host}:{settings.envoy.port}")
        yield Edge(settings, upstream, check, health_servicer)
    finally:
        envoy.terminate()
        envoy.wait(10)
        log.close()
        server.stop(0)


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    settings = edge_settings(
        tmp_path_factory.mktemp("edge"), cors_allow_origins=[ORIGIN], max_request_bytes=MAX_REQUEST_BYTES
    )
    with running_edge(settings) as edge:
        yield edge


def _post(edge: Edge, path: str, body: dict[str, Any] | str, **headers: str) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(
        f"{edge.base}{path}",
        content=content,
        headers={"content-type": "application/json", **AUTHORIZED, **headers},
    )


def test_healthz_answers_while_envoy_is_up(edge: Edge) -> None:
    assert httpx.get(f"{edge.base}/healthz").status_code == 200


def test_readyz_follows_every_cluster_health(edge: Edge) -> None:
    assert httpx.get(f"{edge.base}/readyz").status_code == 200
    edge.health.set("ferry.models.v1.ModelsService", NOT_SERVING)
    try:
        assert _status_within(f"{edge.base}/readyz", 503, seconds=5.0)
    finally:
        edge.health.set("ferry.models.v1.ModelsService", SERVING)
    assert _status_within(f"{edge.base}/readyz", 200, seconds=5.0)


def _status_within(url: str, status: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if httpx.get(url).status_code == status:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize(
    ("body", "streamed"),
    [
        ({"model": "m", "prompt": "hi"}, False),
        ({"model": "m", "prompt": "hi", "stream": False}, False),
        ({"model": "m", "prompt": "hi", "stream": True}, True),
        ('{"model":"m","prompt":"hi","stream" :\n\ttrue}', True),
        # The words inside a string, or in a nested object, are not the flag.
        ({"model": "m", "prompt": 'say "stream": true', "stream": False}, False),
        ({"model": "m", "prompt": '{"stream":true}'}, False),
        ({"model": "m", "prompt": 'escaped \\" "stream": true', "stop": ["stream"]}, False),
        ({"model": "m", "prompt": "hi", "stream_options": {"stream": True}}, False),
        ({"model": "m", "prompt": 'x "stream": true', "stream": True}, True),
    ],
)
def test_openai_stream_flag_selects_the_streaming_rpc(edge: Edge, body: Any, streamed: bool) -> None:
    response = _post(edge, "/v1/completions", body)
    assert response.status_code == 200, response.text
    if streamed:
        assert response.headers["content-type"] == "text/event-stream"
        events = [e for e in response.text.split("\n\n") if e]
        assert [json.loads(e.removeprefix("data: "))["id"] for e in events[:-1]] == [
            "chunk-0",
            "chunk-1",
            "chunk-2",
        ]
        assert events[-1] == "data: [DONE]"
    else:
        assert response.headers["content-type"] == "application/json"
        assert response.json()["id"] == "unary"


def test_openai_bodies_tell_the_service_their_top_level_fields(edge: Edge) -> None:
    """The service logs (debug) the fields its request does not define, which the transcoder drops:
    ferry.lua names every top-level key, as the caller wrote it, and nothing nested."""
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi", "x": 1}],
        "maxTokens": 2,
        "foo": {"bar": 1},
    }
    spoofed = {"x-ferry-body-fields": "forged"}
    assert _post(edge, "/v1/chat/completions", body, **spoofed).status_code == 200
    assert edge.upstream.metadata[-1]["x-ferry-body-fields"] == "model,messages,maxTokens,foo"
    odd = '{"model": "m", "prompt": "hi", "we\\"ird key": 1, "stream": true}'
    assert _post(edge, "/v1/completions", odd).status_code == 200
    assert edge.upstream.metadata[-1]["x-ferry-body-fields"] == "model,prompt,we??ird?key,stream"
    # ferry's own API: not read, and a client's claim is dropped.
    assert edge.get("/api/v1/models", headers=spoofed).status_code == 200
    assert "x-ferry-body-fields" not in edge.upstream.metadata[-1]


def test_chat_completions_stream_as_server_sent_events(edge: Edge) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    response = _post(edge, "/v1/chat/completions", body)
    assert response.headers["content-type"] == "text/event-stream"
    # OpenAI's framing: `data: <json>` and a blank line per event.
    events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert [json.loads(e.removeprefix("data: "))["id"] for e in events[:-2]] == [
        "chat-chunk-0",
        "chat-chunk-1",
    ]


def test_mid_stream_error_reaches_http1_clients_as_trailers(edge: Edge) -> None:
    host, port = edge.grpc_target.split(":")
    body = json.dumps({"model": "m", "prompt": "fail-midway", "stream": True}).encode()
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\n"
        f"TE: trailers\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    text = raw.decode()
    assert text.startswith("HTTP/1.1 200")
    assert "chunk-1" in text
    assert "chunk-2" not in text
    # The chunked body ends with trailers naming the failure, not a silent clean end.
    trailers = text.rsplit("\r\n0\r\n", 1)[1]
    assert "grpc-status: 13" in trailers
    assert "engine died" in trailers


@pytest.mark.parametrize(
    ("prompt", "status", "retry_after"),
    [
        ("busy-with-metadata", 429, "7"),  # the service's own `retry-after` metadata wins
        ("busy-with-retry-info", 429, "3"),  # google.rpc.RetryInfo 2.5 s, rounded up
        ("busy", 429, "1"),  # nothing said: one second
        ("unavailable", 503, None),  # a 503 gets one only when the service says when
    ],
)
def test_retry_after(edge: Edge, prompt: str, status: int, retry_after: str | None) -> None:
    response = _post(edge, "/v1/completions", {"model": "m", "prompt": prompt})
    assert response.status_code == status
    assert response.headers.get("retry-after") == retry_after
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["message"] in {"busy", "try later"}


def test_ferry_api_errors_keep_the_google_rpc_status_json(edge: Edge) -> None:
    """/api/v1/* is ferry's own API: its errors stay google.rpc.Status JSON, details rendered."""
    response = edge.get("/api/v1/models", params={"page_token": "busy"})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert (response.json()["code"], response.json()["message"]) == (8, "busy")
    details = {d["@type"].rsplit("/", 1)[1]: d for d in response.json()["details"]}
    assert details["google.rpc.ErrorInfo"]["reason"] == "BUSY"
    assert details["google.rpc.ErrorInfo"]["domain"] == "ferry.dev"
    assert details["google.rpc.RetryInfo"]["retry_delay"] == "2.500s"


# -- OpenAI's error object on /v1/* (ferry.lua) ----------------------------------------------------

OPENAI_PATHS: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"model": "m", "prompt": "hi"},
}


def _openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The `error` object of an OpenAI error answer, checked for OpenAI's shape."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert OPENAI_ERROR_METADATA not in response.headers
    body = response.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return dict(body["error"])


@pytest.mark.parametrize("path", list(OPENAI_PATHS))
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("body", "code", "param", "words"),
    [
        ('{"model": "m", ', "invalid_json", None, "could not parse the JSON body"),
        ("not json", "invalid_json", None, "Unexpected token"),
        ("[1, 2]", "invalid_type", None, "must be a JSON object"),
        ({"temperature": "hot"}, "invalid_type", "temperature", 'expected a number, got "hot"'),
        ({"max_tokens": 1.5}, "invalid_type", "max_tokens", "expected an integer, got 1.5"),
        ({"model": 5}, "invalid_type", "model", "expected a string, got 5"),
        ({"presence_penalty": True}, "invalid_type", "presence_penalty", "expected a number, got true"),
        ({"seed": 1e30}, "invalid_type", "seed", "expected an integer"),
        ({"stream_options": 3}, "invalid_type", "stream_options", "expected a JSON object"),
        # An array for an object: the transcoder does not say where.
        ({"stream_options": []}, "invalid_type", None, "invalid type in the request body: Proto field"),
        (
            {"stream_options": {"include_usage": "x"}},
            "invalid_type",
            "stream_options.include_usage",
            "boolean",
        ),
        # A map entry is named by its map, as the caller wrote it.
        ({"logit_bias": {"50256": "x"}}, "invalid_type", "logit_bias", "expected a number"),
    ],
)
def test_transcoder_refusals_are_openai_errors(
    edge: Edge, path: str, stream: bool, body: dict[str, Any] | str, code: str, param: str | None, words: str
) -> None:
    if isinstance(body, dict):
        body = json.dumps({**OPENAI_PATHS[path], **body, "stream": stream})
    error = _openai_error(_post(edge, path, body), 400)
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)
    assert words in error["message"]
    if param:
        assert f"'{param}'" in error["message"]


def test_a_wrong_type_deep_in_a_message_names_its_path(edge: Edge) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x", "name": 3}]}
    error = _openai_error(_post(edge, "/v1/chat/completions", body), 400)
    assert (error["code"], error["param"]) == ("invalid_type", "messages[0].name")
    error = _openai_error(_post(edge, "/v1/chat/completions", {"model": "m", "messages": "hi"}), 400)
    assert (error["code"], error["param"]) == ("invalid_type", "messages")


def test_the_edges_own_codes_are_catalogued() -> None:
    """The codes ferry.lua and Envoy's local replies write are the catalogue's edge reasons, so
    docs/errors.md lists every code a caller can get."""
    edge_reasons = [
        Reason.INVALID_JSON,
        Reason.INVALID_TYPE,
        Reason.UNKNOWN_PARAMETER,
        Reason.UNKNOWN_URL,
        Reason.REQUEST_TOO_LARGE,
        Reason.SERVICE_UNREACHABLE,
    ]
    written = envoy_config.LUA_SCRIPT.read_text() + envoy_config.TEMPLATE.read_text()
    for reason in edge_reasons:
        code = CATALOGUE[reason].openai_code
        assert code == reason.lower(), reason
        assert f'"{code}"' in written or f"code: {code}" in written, reason


def test_only_map_entries_end_in_key_or_value() -> None:
    """ferry.lua names `x[0].key` / `x[0].value` by the map `x`: no repeated message field of the
    OpenAI API has a field called `key` or `value`, so that path is always a map entry."""
    seen: set[str] = set()

    def walk(message: Any) -> None:
        if message.full_name in seen:
            return
        seen.add(message.full_name)
        for field in message.fields:
            if field.message_type is None:
                continue
            if field.is_repeated and not field.message_type.GetOptions().map_entry:
                assert not {"key", "value"} & {f.name for f in field.message_type.fields}, field.full_name
            walk(field.message_type)

    for method in openai_pb2.DESCRIPTOR.services_by_name["OpenAIService"].methods:
        walk(method.input_type)


def test_unknown_query_parameters_paths_and_methods_are_openai_errors(edge: Edge) -> None:
    body = json.dumps(OPENAI_PATHS["/v1/completions"])
    error = _openai_error(_post(edge, "/v1/completions?foo=1", body), 400)
    assert (error["code"], error["param"]) == ("unknown_parameter", "foo")
    for method, path in [("POST", "/v1/nothing"), ("GET", "/v1/chat/completions"), ("DELETE", "/v1/models")]:
        response = httpx.request(method, f"{edge.base}{path}", headers=AUTHORIZED)
        error = _openai_error(response, 404)
        assert error == {
            "message": f"Invalid URL ({method} {path})",
            "type": "invalid_request_error",
            "param": None,
            "code": "unknown_url",
        }
    # ferry's own API: the transcoder's answer as google.rpc.Status JSON (it was text/plain).
    lost = edge.get("/api/v1/nothing-here")
    assert lost.headers["content-type"] == "application/json"
    assert (lost.json()["code"], lost.json()["details"][0]["reason"]) == (5, "UNKNOWN_URL")


@pytest.mark.parametrize("prompt", list(SERVICE_ERRORS))
def test_a_service_error_is_the_json_the_service_sent(edge: Edge, prompt: str) -> None:
    expected = SERVICE_ERRORS[prompt]
    for stream in (False, True):
        response = _post(edge, "/v1/completions", {"model": "m", "prompt": prompt, "stream": stream})
        error = _openai_error(response, expected.http_status)
        assert error == openai_error(expected)["error"]
        if expected.retry_after_seconds is not None:
            assert response.headers["retry-after"] == "3"


def test_the_sdk_raises_with_the_error_fields(edge: Edge) -> None:
    sdk = openai.OpenAI(base_url=f"{edge.base}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.completions.create(model="m", prompt="bad-temperature")
    assert (bad.value.param, bad.value.code, bad.value.type) == (
        "temperature",
        "invalid_value",
        "invalid_request_error",
    )
    assert "must be in [0, 2], got 3" in bad.value.message
    with pytest.raises(openai.BadRequestError) as wrong_type:
        sdk.completions.create(model="m", prompt="x", extra_body={"temperature": "hot"})
    assert (wrong_type.value.param, wrong_type.value.code) == ("temperature", "invalid_type")
    with pytest.raises(openai.RateLimitError) as limited:
        sdk.completions.create(model="m", prompt="rate-limited")
    assert limited.value.code == "rate_limit_exceeded"
    assert limited.value.response.headers["retry-after"] == "3"
    with pytest.raises(openai.APIError) as mid_stream:
        list(sdk.completions.create(model="m", prompt="error-event", stream=True))
    assert "engine died" in mid_stream.value.message
    assert mid_stream.value.body == {
        "message": "engine died",
        "type": "server_error",
        "code": "engine_error",
    }


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK])
def test_an_error_without_openai_json_is_typed_by_its_code(edge: Edge, code: grpc.StatusCode) -> None:
    """A gRPC error that is not ferry's own (no reason, no OpenAI JSON) is still OpenAI's object."""
    if code is grpc.StatusCode.CANCELLED:
        pytest.skip("a CANCELLED answer is one nobody receives")
    response = _post(edge, "/v1/completions", {"model": "m", "prompt": f"bare-{code.name}"})
    error = _openai_error(response, RpcError(code, "", "").http_status)
    assert error["message"] == f"bare {code.name}"
    assert error["type"] == OPENAI_TYPE.get(code, "server_error")
    assert error["code"] == code.name.lower()


def test_a_stream_that_fails_after_it_started_ends_with_an_error_event(edge: Edge) -> None:
    response = _post(edge, "/v1/completions", {"model": "m", "prompt": "error-event", "stream": True})
    assert response.status_code == 200
    events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
    assert [json.loads(e).get("id") for e in events] == ["chunk-0", "chunk-1", "chunk-error"]
    assert json.loads(events[-1])["error"] == {
        "message": "engine died",
        "type": "server_error",
        "code": "engine_error",
    }
    # No `[DONE]` after an error, as OpenAI's streams.
    assert "[DONE]" not in response.text


def test_envoys_own_errors_on_v1_are_openai_errors(edge: Edge) -> None:
    """The key check failing (not refusing) is Envoy's own 503, with no body of its own."""
    response = httpx.get(f"{edge.base}/v1/models", headers={"authorization": f"Bearer {BROKEN_CHECK_KEY}"})
    error = _openai_error(response, 503)
    assert error == {
        "message": "the edge answered 503 (service_unreachable)",
        "type": "server_error",
        "param": None,
        "code": "service_unreachable",
    }
    assert response.headers["retry-after"] == "1"


def test_request_id_is_kept_when_well_formed_and_made_otherwise(edge: Edge) -> None:
    # Long ones and UUIDs too: Envoy must not write its trace decision into the 15th character.
    for client_id in ("client-id.1:2", "inference-record-1795619835", "123e4567-e89b-12d3-a456-426614174000"):
        kept = edge.get("/api/v1/models", headers={"x-request-id": client_id})
        assert kept.headers["x-request-id"] == client_id
        assert edge.upstream.metadata[-1]["x-request-id"] == client_id

    for bad in ["has spaces", "x" * 200, "semi;colon"]:
        replaced = edge.get("/api/v1/models", headers={"x-request-id": bad})
        assert replaced.headers["x-request-id"] != bad
        assert len(replaced.headers["x-request-id"]) == 36  # a UUID
        assert edge.upstream.metadata[-1]["x-request-id"] == replaced.headers["x-request-id"]

    made = edge.get("/api/v1/models")
    assert len(made.headers["x-request-id"]) == 36
    assert edge.upstream.metadata[-1]["x-request-id"] == made.headers["x-request-id"]


def test_field_names_and_defaults_are_printed(edge: Edge) -> None:
    model = edge.get("/api/v1/models").json()["models"][0]
    # preserve_proto_field_names and always_print_primitive_fields
    assert model["name"] == "models/scripted"
    assert model["state_reason"] == ""
    assert model["context_length"] == 0


def test_unknown_paths_and_query_parameters(edge: Edge) -> None:
    assert edge.get("/api/v1/nothing-here").status_code == 404
    bad_query = edge.get("/api/v1/models", params={"bogus": "1"})
    assert bad_query.status_code == 400
    assert "bogus" in bad_query.text


def test_native_grpc_passes_through_the_same_listener(edge: Edge) -> None:
    with grpc.insecure_channel(edge.grpc_target) as channel:
        models = models_pb2_grpc.ModelsServiceStub(channel).ListModels(
            models_pb2.ListModelsRequest(),
            metadata=[("x-request-id", "native-1"), *GRPC_AUTHORIZED],
            timeout=5,
        )
        chunks = list(
            openai_pb2_grpc.OpenAIServiceStub(channel).CreateCompletionStream(
                openai_pb2.CreateCompletionRequest(model="m"), metadata=GRPC_AUTHORIZED, timeout=5
            )
        )
    assert [m.name for m in models.models] == ["models/scripted"]
    assert edge.upstream.metadata[-2]["x-request-id"] == "native-1"
    # Native gRPC callers of the streaming RPC get the same Server-Sent Events, one per message.
    assert [c.content_type for c in chunks] == ["text/event-stream"] * 4
    assert [json.loads(c.data.removeprefix(b"data: "))["id"] for c in chunks[:3]] == [
        "chunk-0",
        "chunk-1",
        "chunk-2",
    ]
    assert chunks[3].data == sse.DONE


@pytest.mark.parametrize(
    "method",
    [
        "/ferry.audit.v1.AuditService/AppendEvents",
        "/ferry.transactions.v1.TransactionsService/CreateTransaction",
        "/ferry.transactions.v1.TransactionsService/CompleteTransaction",
        "/ferry.transactions.v1.TransactionsService/BatchCreateTransactions",
        "/ferry.transactions.v1.TransactionsService/BatchCompleteTransactions",
        "/ferry.auth.v1.AuthService/Authorize",
        "/ferry.auth.v1.AuthService/RecordUsage",
    ],
)
def test_internal_record_methods_are_refused_at_the_edge(edge: Edge, method: str) -> None:
    """Only ferry's own processes deliver records (directly to the service port): no forging via Envoy,
    not even with a key the gateway accepts."""
    with grpc.insecure_channel(edge.grpc_target) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            call(b"", metadata=GRPC_AUTHORIZED, timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


# -- API keys at the edge (the gateway's ext_authz check) --------------------------------------------


def test_rest_without_a_valid_key_is_refused_with_openai_error_json(edge: Edge) -> None:
    for headers in ({}, {"authorization": "Bearer fry_unknown"}):
        response = httpx.get(f"{edge.base}/api/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/json"
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "grpc-status" not in response.headers
        assert response.json()["error"]["message"] == "no valid API key"
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_rest_with_a_key_lacking_the_scope_is_forbidden(edge: Edge) -> None:
    response = edge.get("/api/v1/models", headers={"authorization": f"Bearer {READ_ONLY_KEY}"})
    assert response.status_code == 403
    assert response.json()["error"] == {
        "message": "this key lacks the admin scope",
        "type": "permission_error",
        "param": None,
        "code": "scope",
    }


@pytest.mark.parametrize(
    ("metadata", "code", "message"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED, "no valid API key"),
        (
            (("authorization", f"Bearer {READ_ONLY_KEY}"),),
            grpc.StatusCode.PERMISSION_DENIED,
            "this key lacks the admin scope",
        ),
    ],
)
def test_grpc_refusals_carry_the_status_code_and_a_plain_message(
    edge: Edge, metadata: tuple[tuple[str, str], ...], code: grpc.StatusCode, message: str
) -> None:
    with grpc.insecure_channel(edge.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            models_pb2_grpc.ModelsServiceStub(channel).ListModels(
                models_pb2.ListModelsRequest(), metadata=metadata, timeout=5
            )
    assert err.value.code() == code
    # The gateway's JSON body becomes grpc-message; ferry.lua gives gRPC callers its message alone.
    assert err.value.details() == message


def test_envoy_asks_with_the_service_token_about_the_grpc_method(edge: Edge) -> None:
    """ext_authz sits after the transcoder: a REST call is checked as the gRPC method it becomes."""
    assert edge.get("/api/v1/models").status_code == 200
    metadata, path, headers = edge.check.seen[-1]
    assert metadata["authorization"] == f"Bearer {SERVICE_TOKEN}"
    assert path == "/ferry.models.v1.ModelsService/ListModels"
    assert headers["authorization"] == f"Bearer {KEY}"


def test_edge_headers_replace_what_the_client_sent(edge: Edge) -> None:
    spoofed = {"x-ferry-edge": "Bearer forged", "x-ferry-client-address": "203.0.113.9"}
    assert edge.get("/api/v1/models", headers=spoofed).status_code == 200
    seen = edge.upstream.metadata[-1]
    assert seen["x-ferry-edge"] == f"Bearer {SERVICE_TOKEN}"
    assert seen["x-ferry-client-address"] == "127.0.0.1"
    # The key travels on: every service checks it again.
    assert seen["authorization"] == f"Bearer {KEY}"


def test_a_client_sent_x_forwarded_for_is_not_the_client_address(edge: Edge) -> None:
    """Per-address limits count by the address the key check sees and the service is told: both are
    the TCP peer, whatever X-Forwarded-For the client sends (envoy.xff_num_trusted_hops is 0)."""
    assert edge.get("/api/v1/models", headers={"x-forwarded-for": "203.0.113.7"}).status_code == 200
    assert edge.check.sources[-1] == "127.0.0.1"
    assert edge.upstream.metadata[-1]["x-ferry-client-address"] == "127.0.0.1"


def test_behind_a_trusted_proxy_the_forwarded_client_is_the_address(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """With envoy.xff_num_trusted_hops = 1 (a load balancer in front), the client it names is the
    address for the key check's per-address limits and for the service, alike."""
    settings = edge_settings(tmp_path_factory.mktemp("edge-proxied"), xff_num_trusted_hops=1)
    with running_edge(settings) as proxied:
        reply = proxied.get("/api/v1/models", headers={"x-forwarded-for": "203.0.113.7"})
        assert reply.status_code == 200
        assert proxied.check.sources[-1] == "203.0.113.7"
        assert proxied.upstream.metadata[-1]["x-ferry-client-address"] == "203.0.113.7"
        # A client-sent x-ferry-client-address changes nothing.
        proxied.get(
            "/api/v1/models", headers={"x-forwarded-for": "203.0.113.8", "x-ferry-client-address": "10.9.9.9"}
        )
        assert proxied.check.sources[-1] == "203.0.113.8"
        assert proxied.upstream.metadata[-1]["x-ferry-client-address"] == "203.0.113.8"


def test_health_endpoints_need_no_key(edge: Edge) -> None:
    for path in ("/healthz", "/readyz"):
        assert httpx.get(f"{edge.base}{path}").status_code == 200


def test_the_access_log_holds_no_key_or_token(edge: Edge) -> None:
    edge.get("/api/v1/models")
    httpx.get(f"{edge.base}/api/v1/models", headers={"authorization": "Bearer fry_logged-nowhere"})
    log = edge.settings.log_dir / "envoy-access.log"
    deadline = time.monotonic() + 5
    while "/api/v1/models" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)  # Envoy flushes its access log about once a second
    text = log.read_text()
    assert "/api/v1/models" in text
    for secret in (KEY, "fry_logged-nowhere", SERVICE_TOKEN):
        assert secret not in text


# -- CORS and the body limit --------------------------------------------------------------------------


def test_cors_preflight_is_answered_without_a_key(edge: Edge) -> None:
    response = httpx.options(
        f"{edge.base}/v1/chat/completions",
        headers={
            "origin": ORIGIN,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in response.headers["access-control-allow-headers"]
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "retry-after" in response.headers["access-control-expose-headers"]


def test_cors_lets_the_browser_read_refusals_but_only_for_allowed_origins(edge: Edge) -> None:
    refused = httpx.get(f"{edge.base}/api/v1/models", headers={"origin": ORIGIN})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ORIGIN
    other = edge.get("/api/v1/models", headers={"origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in other.headers


def test_a_rest_body_beyond_the_limit_is_413_with_a_clear_message(edge: Edge) -> None:
    response = _post(edge, "/v1/completions", {"model": "m", "prompt": "x" * MAX_REQUEST_BYTES})
    error = _openai_error(response, 413)
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        None,
        "request_too_large",
    )
    assert f"larger than {MAX_REQUEST_BYTES} bytes" in error["message"]
    # Just under the limit passes.
    assert _post(edge, "/v1/completions", {"model": "m", "prompt": "x" * 1000}).status_code == 200


def test_a_grpc_message_beyond_the_limit_is_resource_exhausted(edge: Edge) -> None:
    with grpc.insecure_channel(edge.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            models_pb2_grpc.ModelsServiceStub(channel).ListModels(
                models_pb2.ListModelsRequest(page_token="x" * MAX_REQUEST_BYTES),
                metadata=GRPC_AUTHORIZED,
                timeout=5,
            )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"larger than {MAX_REQUEST_BYTES} bytes" in (err.value.details() or "")


# -- the admin port on the real stack: read-only observability, never the configuration ------------


def test_the_admin_port_serves_metrics_but_not_the_configuration(stack: RunningStack) -> None:
    admin = stack.envoy_admin
    token = stack.stack.settings.auth.service_token
    assert token is not None
    secret = token.get_secret_value()
    assert httpx.get(f"{admin}/config_dump", timeout=5).status_code == 404
    assert httpx.get(f"{admin}/stats/../config_dump", timeout=5).status_code == 404
    assert httpx.post(f"{admin}/quitquitquit", timeout=5).status_code == 404
    assert httpx.post(f"{admin}/logging", params={"level": "trace"}, timeout=5).status_code == 404
    metrics = httpx.get(f"{admin}/stats/prometheus", timeout=5)
    assert metrics.status_code == 200
    assert re.search(r"^envoy_cluster_upstream_rq_total\{", metrics.text, re.MULTILINE)
    for page in ("/stats", "/stats/prometheus", "/clusters", "/server_info"):
        answer = httpx.get(f"{admin}{page}", timeout=5)
        assert answer.status_code == 200, page
        assert secret not in answer.text, page
    # Envoy still answers: nothing above stopped it.
    assert httpx.get(f"{stack.rest}/healthz", timeout=5).status_code == 200
