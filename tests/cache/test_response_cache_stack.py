"""The response cache against the real stack (Envoy, the services, Triton with Gemma, PostgreSQL).

Every test uses its own prompt (a fresh marker), so that entries of other tests (or of an earlier run
on the same stack) never make its first request a hit.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import grpc
import httpx
import pytest
from ferry.inference.v1 import inference_pb2, inference_pb2_grpc

from tests.stack import RunningStack

CACHE_HEADER = "x-ferry-cache"


@pytest.fixture(scope="module")
def model(stack: RunningStack) -> str:
    return stack.settings.triton.default_model


@pytest.fixture(scope="module")
def rest(stack: RunningStack) -> Any:
    with stack.http() as client:
        yield client


def fresh_prompt(what: str) -> str:
    return f"Note {uuid.uuid4().hex[:8]} about {what}:"


def completion(
    rest: httpx.Client, model: str, prompt: str, headers: dict[str, str] | None = None, **fields: Any
) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0, **fields}
    reply = rest.post("/v1/completions", json=body, headers=headers or {})
    assert reply.status_code == 200, reply.text
    return reply


def sse_text(reply: httpx.Response) -> tuple[str, list[dict[str, Any]]]:
    events = [line.removeprefix("data: ") for line in reply.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", reply.text
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(choice["text"] for chunk in chunks for choice in chunk.get("choices", ()))
    return text, chunks


def test_an_identical_deterministic_request_is_a_hit_and_any_difference_a_miss(
    rest: httpx.Client, model: str
) -> None:
    prompt = fresh_prompt("rivers")
    first = completion(rest, model, prompt)
    second = completion(rest, model, prompt)
    assert first.headers[CACHE_HEADER] == "miss"
    assert second.headers[CACHE_HEADER] == "hit"
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["usage"] == first.json()["usage"]  # the original token counts
    assert second.json()["id"] != first.json()["id"]  # a response of its own
    # Any difference in the prompt or in a parameter is another entry.
    assert completion(rest, model, prompt + " ").headers[CACHE_HEADER] == "miss"
    assert completion(rest, model, prompt, max_tokens=5).headers[CACHE_HEADER] == "miss"
    assert completion(rest, model, prompt, stop=["\n\n"]).headers[CACHE_HEADER] == "miss"
    assert completion(rest, model, prompt, logprobs=2).headers[CACHE_HEADER] == "miss"


def test_a_streamed_request_is_served_from_an_answer_kept_from_a_unary_one_and_back(
    rest: httpx.Client, model: str
) -> None:
    prompt = fresh_prompt("lakes")
    unary = completion(rest, model, prompt)
    streamed = completion(rest, model, prompt, stream=True, stream_options={"include_usage": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.headers[CACHE_HEADER] == "hit"
    text, chunks = sse_text(streamed)
    assert text == unary.json()["choices"][0]["text"]
    assert chunks[-1]["usage"] == unary.json()["usage"]
    reasons = [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]]
    assert reasons[-1] == unary.json()["choices"][0]["finish_reason"]

    # A stream's answer serves a later unary request.
    other = fresh_prompt("hills")
    first = completion(rest, model, other, stream=True)
    assert first.headers[CACHE_HEADER] == "miss"
    later = completion(rest, model, other)
    assert later.headers[CACHE_HEADER] == "hit"
    assert later.json()["choices"][0]["text"] == sse_text(first)[0]


def test_a_fixed_seed_is_cached_and_sampling_without_one_never(rest: httpx.Client, model: str) -> None:
    prompt = fresh_prompt("clouds")
    seeded = [completion(rest, model, prompt, temperature=0.9, seed=1234) for _ in range(2)]
    assert [r.headers[CACHE_HEADER] for r in seeded] == ["miss", "hit"]
    assert seeded[0].json()["choices"] == seeded[1].json()["choices"]
    for _ in range(2):
        sampled = completion(rest, model, prompt, temperature=0.9)
        assert CACHE_HEADER not in sampled.headers  # not cacheable: neither hit nor miss


def test_cache_control_opts_out_on_rest(rest: httpx.Client, model: str) -> None:
    prompt = fresh_prompt("winds")
    assert completion(rest, model, prompt).headers[CACHE_HEADER] == "miss"
    for directive in ("no-cache", "no-store", "max-age=0"):
        fresh = completion(rest, model, prompt, headers={"cache-control": directive})
        assert fresh.headers[CACHE_HEADER] == "bypass", directive
    assert completion(rest, model, prompt).headers[CACHE_HEADER] == "hit"
    # no-store keeps nothing: a later request is still a miss.
    kept_nothing = fresh_prompt("tides")
    completion(rest, model, kept_nothing, headers={"cache-control": "no-store"})
    assert completion(rest, model, kept_nothing).headers[CACHE_HEADER] == "miss"


def test_native_grpc_hits_and_cache_policy_opts_out(stack: RunningStack, model: str) -> None:
    stub = inference_pb2_grpc.InferenceServiceStub(stack.channel())

    def request(prompt: str, **fields: Any) -> inference_pb2.GenerateRequest:
        return inference_pb2.GenerateRequest(
            model=f"models/{model}",
            prompt=prompt,
            sampling=inference_pb2.SamplingParams(temperature=0, max_tokens=6),
            **fields,
        )

    def generate(req: inference_pb2.GenerateRequest) -> tuple[str, inference_pb2.GenerateResponse]:
        reply, call = stub.Generate.with_call(req, timeout=120)
        return dict(call.initial_metadata()).get(CACHE_HEADER, ""), reply

    prompt = fresh_prompt("stones")
    (state1, first), (state2, second) = generate(request(prompt)), generate(request(prompt))
    assert (state1, state2) == ("miss", "hit")
    assert second.text == first.text and second.usage == first.usage

    stream = stub.GenerateStream(request(prompt), timeout=120)
    pieces = list(stream)
    assert dict(stream.initial_metadata())[CACHE_HEADER] == "hit"
    assert "".join(p.text for p in pieces) == first.text
    assert pieces[-1].usage == first.usage

    for policy in (inference_pb2.CACHE_POLICY_NO_CACHE, inference_pb2.CACHE_POLICY_NO_STORE):
        state, fresh = generate(request(prompt, cache_policy=policy))
        # Generated again (not compared with the first text: at temperature 0 llama.cpp is not
        # bit-exact across slots and batches, and a clean-clone run got another answer).
        assert state == "bypass" and fresh.text and fresh.usage.completion_tokens > 0
    # The gRPC spelling of the REST header works too.
    _reply, call = stub.Generate.with_call(
        request(prompt), metadata=[("cache-control", "no-cache")], timeout=120
    )
    assert dict(call.initial_metadata())[CACHE_HEADER] == "bypass"


def transaction(rest: httpx.Client, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = rest.get(f"/api/v1/transactions/{request_id}")
        if found.status_code == 200 and found.json()["status"] == "STATUS_SUCCEEDED":
            record: dict[str, Any] = found.json()
            return record
        time.sleep(0.2)
    raise AssertionError(f"no final transaction record for {request_id}")


def test_the_transaction_record_marks_the_hit_and_keeps_its_usage(rest: httpx.Client, model: str) -> None:
    prompt = fresh_prompt("bridges")
    ids = [f"cache-record-{uuid.uuid4().hex[:12]}" for _ in range(2)]
    replies = [completion(rest, model, prompt, headers={"x-request-id": rid}) for rid in ids]
    assert [r.headers[CACHE_HEADER] for r in replies] == ["miss", "hit"]
    missed, hit = (transaction(rest, rid) for rid in ids)
    assert missed["cache_hit"] is False
    assert hit["cache_hit"] is True
    assert hit["output"] == missed["output"]
    assert hit["usage"] == missed["usage"] and int(hit["usage"]["completion_tokens"]) > 0


def test_a_hit_is_still_refused_without_the_scope_or_past_the_rate_limit(
    stack: RunningStack, rest: httpx.Client, model: str
) -> None:
    prompt = fresh_prompt("towers")
    completion(rest, model, prompt)
    assert completion(rest, model, prompt).headers[CACHE_HEADER] == "hit"
    body = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0}

    read_only = stack.create_key(["read"], display_name="cache-read-only")
    with stack.http(read_only) as http:
        refused = http.post("/v1/completions", json=body)
    assert refused.status_code == 403, refused.text
    assert CACHE_HEADER not in refused.headers
    stub = inference_pb2_grpc.InferenceServiceStub(stack.channel())
    with pytest.raises(grpc.RpcError) as denied:
        stub.Generate(
            inference_pb2.GenerateRequest(
                model=f"models/{model}",
                prompt=prompt,
                sampling=inference_pb2.SamplingParams(temperature=0, max_tokens=6),
            ),
            metadata=[("authorization", f"Bearer {read_only}")],
            timeout=60,
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # Answers are kept per key (inference.response_cache.sharing): this key's own first request is a
    # miss, its second a hit, and its third, which would be a hit too, is past its limit.
    two_a_minute = stack.create_key(["inference"], display_name="cache-rpm", requests_per_minute=2)
    with stack.http(two_a_minute) as http:
        assert http.post("/v1/completions", json=body).headers[CACHE_HEADER] == "miss"
        served = http.post("/v1/completions", json=body)
        assert served.status_code == 200 and served.headers[CACHE_HEADER] == "hit"
        limited = http.post("/v1/completions", json=body)
    assert limited.status_code == 429, limited.text
    assert int(limited.headers["retry-after"]) >= 1


def test_a_hit_is_counted_as_usage_and_in_metrics(
    stack: RunningStack, rest: httpx.Client, model: str
) -> None:
    prompt = fresh_prompt("gardens")
    # 6 tokens a minute: the fresh answer's 4 leave room for one more request, and the hit's 4 (the
    # kept answer's count) spend the rest; were hits free, every later request would be served.
    key = stack.create_key(["inference"], display_name="cache-tpm", tokens_per_minute=6)
    body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    with stack.http(key) as http:
        fresh = http.post("/v1/completions", json=body)
        assert fresh.status_code == 200 and fresh.headers[CACHE_HEADER] == "miss"
        hit = http.post("/v1/completions", json=body)
        assert hit.status_code == 200 and hit.headers[CACHE_HEADER] == "hit"
        deadline = time.monotonic() + 10
        while (refused := http.post("/v1/completions", json=body)).status_code == 200:
            assert time.monotonic() < deadline, "a hit's tokens were not counted against the key's limit"
            time.sleep(0.1)
    assert refused.status_code == 429, refused.text

    exported = httpx.get(stack.metrics_urls["inference"], timeout=10).text
    hits = [
        line
        for line in exported.splitlines()
        if line.startswith("ferry_inference_response_cache_hits_total") and f'model="{model}"' in line
    ]
    assert hits and float(hits[0].rsplit(" ", 1)[1]) >= 1
    assert "ferry_inference_response_cache_entries " in exported
