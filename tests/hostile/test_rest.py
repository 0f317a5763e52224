"""Hostile REST: generated and mutated JSON bodies, odd bytes and content types, fuzzed path
variables and query parameters, with and without a valid key, on every route Envoy exposes.

Each answer: no 5xx but 503, a well-formed error body (OpenAI's error object on /v1/*, a
google.rpc.Status on /api/v1/*), and (checked after each test) no process restarted, every accepted
generation recorded, the key refusals audited.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.hostile.checks import rest_problems
from tests.hostile.conftest import Hostile
from tests.hostile.profiles import FUZZ
from tests.hostile.routes import Route, is_generation, rest_routes
from tests.hostile.strategies import Wire, json_values, mutated, text, wire

ROUTES = rest_routes()
# Query parameters ferry's requests define somewhere, and whatever else.
QUERY_NAMES = [
    "page_size",
    "page_token",
    "filter",
    "order_by",
    "show_inactive",
    "state",
    "all_versions",
    "update_mask",
    "grammar_id",
    "request_id",
    "etag",
    "pageSize",
]
# How much of an answer is read (a streamed generation is short: the keys cap max_tokens).
READ_LIMIT = 1 << 20


@pytest.fixture(scope="module")
def client(hostile: Hostile) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hostile.stack.rest, timeout=60) as http:
        yield http


@st.composite
def hostile_request(draw: st.DrawFn, route: Route, hostile: Hostile) -> dict[str, Any]:
    valid_path, valid_body = route.valid(hostile.subjects)
    if route.variables and draw(st.booleans()):
        path = route.fuzzed_path([draw(text) for _ in range(route.variables)])
    else:
        path = valid_path
    source = draw(st.sampled_from(["mutated", "mutated", "valid", "json"]))
    if source == "json" or valid_body is None:
        body: Any = draw(json_values()) if draw(st.booleans()) else None
    elif source == "valid":
        body = valid_body
    else:
        body = draw(mutated(valid_body))
    sent: Wire | None = None if body is None and source != "json" else draw(wire(body))
    query = draw(st.dictionaries(st.sampled_from(QUERY_NAMES) | text, text, max_size=3))
    return {
        "verb": draw(st.sampled_from([route.verb, route.verb, "PUT", "GET"])),
        "path": path,
        "wire": sent,
        "query": query if draw(st.booleans()) else {},
        "key": draw(st.sampled_from(list(hostile.keys))),
    }


def send(client: httpx.Client, hostile: Hostile, route: Route, request: dict[str, Any]) -> None:
    request_id = f"hostile-{uuid.uuid4().hex}"
    headers = {"x-request-id": request_id}
    key = hostile.keys[request["key"]]
    if key:
        headers["authorization"] = f"Bearer {key}"
    sent: Wire | None = request["wire"]
    content = None
    if sent is not None:
        content = sent.content
        if sent.content_type is not None:
            headers["content-type"] = sent.content_type
    # The query as a hostile client writes it: anything percent-encoded, lone surrogates included.
    query = "&".join(
        f"{quote(name.encode('utf-8', 'surrogatepass'))}={quote(value.encode('utf-8', 'surrogatepass'))}"
        for name, value in request["query"].items()
    )
    url = request["path"] + (f"?{query}" if query else "")
    with client.stream(request["verb"], url, content=content, headers=headers) as response:
        body = b""
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > READ_LIMIT:
                break
    hostile.examples += 1
    if response.headers.get("content-type", "").startswith("application/grpc"):
        # A gRPC content type gets a gRPC answer (HTTP 200, the outcome in grpc-status).
        # (Envoy's own endpoints, /healthz, /readyz and the / redirect, say UNKNOWN to a gRPC
        # caller: not ferry methods, left as they are. A JSON body is no gRPC frame: grpc itself
        # answers INTERNAL for the broken framing, before any ferry code.)
        status = response.headers.get("grpc-status", "0")
        if route.rpc is not None or request["path"].startswith("/ferry."):
            assert status not in ("2", "15"), f"{request['path']}: grpc-status {status}"
        return
    problems = rest_problems(request["path"], response.status_code, response.headers, body)
    how = sent.how if sent is not None else "no body"
    assert not problems, f"{request['verb']} {request['path']} ({how}, key {request['key']}): {problems}"
    if response.status_code == 200 and is_generation(route) and request["verb"] == route.verb:
        hostile.accepted.append((request_id, f"{route.id} {how}"))
    if response.status_code == 401 and route.rpc is not None and request["key"] in ("none", "bogus"):
        hostile.refused.append((request_id, f"{route.id} key {request['key']}"))


@pytest.mark.parametrize("route", ROUTES, ids=[route.id for route in ROUTES])
def test_rest_route(route: Route, checked: Hostile, client: httpx.Client) -> None:
    @FUZZ
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        send(client, checked, route, data.draw(hostile_request(route, checked)))

    fuzz()
