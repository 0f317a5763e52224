"""Conversations on the real stack (Triton with SmolLM2, Envoy, PostgreSQL): turns over REST and gRPC,
edits and regenerations that keep every version, ownership (another key's conversation is NOT_FOUND),
and context limits counted with the model's own tokenizer (the oldest turns left out, nothing deleted)."""

from __future__ import annotations

import json
import time
from typing import Any

import grpc
import httpx
import pytest
from ferry.conversations.v1 import conversations_pb2, conversations_pb2_grpc

from services.common.errors import error_details
from tests.stack import RunningStack, keyed_channel

pytestmark = pytest.mark.stack

MODEL = "smollm2-135m-instruct"
SHORT = {"max_tokens": 12, "temperature": 0}


def _create(http: httpx.Client, **fields: Any) -> dict[str, Any]:
    response = http.post("/api/v1/conversations", json={"model": MODEL, **fields})
    assert response.status_code == 200, response.text
    return dict(response.json())


def _send(http: httpx.Client, name: str, **body: Any) -> dict[str, Any]:
    response = http.post(f"/api/v1/{name}:send", json={"sampling": SHORT, **body})
    assert response.status_code == 200, response.text
    return dict(response.json())


def _messages(http: httpx.Client, name: str, **params: Any) -> list[dict[str, Any]]:
    response = http.get(f"/api/v1/{name}/messages", params=params)
    assert response.status_code == 200, response.text
    return list(response.json().get("messages", []))


def _record(http: httpx.Client, request_id: str) -> dict[str, Any]:
    """The turn's transaction record, once delivered (records are spooled, then written)."""
    deadline = time.monotonic() + 30
    while True:
        response = http.get(f"/api/v1/transactions/{request_id}")
        if response.status_code == 200 or time.monotonic() > deadline:
            assert response.status_code == 200, response.text
            return dict(response.json())
        time.sleep(0.2)


def _reason(response: httpx.Response) -> str:
    return next((str(d["reason"]) for d in response.json().get("details", []) if "reason" in d), "")


def test_turns_edit_and_regenerate_keep_every_version(stack: RunningStack) -> None:
    with stack.http() as http:
        conversation = _create(http, system_prompt="You are terse.", metadata={"topic": "test"})
        name = conversation["name"]
        first = _send(http, name, content="Say hello.")
        assert first["user_message"]["content"] == "Say hello."
        answer = first["assistant_message"]
        assert answer["role"] == "ROLE_ASSISTANT" and answer["content"].strip()
        assert answer["parent"] == first["user_message"]["name"]
        assert answer["usage"]["completion_tokens"] > 0
        assert _record(http, answer["request_id"])["model"], "each turn is a normal inference request"

        got = http.get(f"/api/v1/{name}").json()
        assert got["current_message"] == answer["name"] and got["title"] == "Say hello."

        second = _send(http, name, content="And goodbye?")
        again = _send(http, name, regenerate={"message": second["assistant_message"]["name"]})
        assert again["user_message"]["name"] == second["user_message"]["name"]
        assert again["assistant_message"]["version"] == 2 and again["assistant_message"]["version_count"] == 2
        current = _messages(http, name)
        assert [m["name"] for m in current][-1] == again["assistant_message"]["name"]
        assert len(current) == 4

        edited = _send(http, name, edit={"message": first["user_message"]["name"], "content": "Say hi."})
        assert edited["user_message"]["content"] == "Say hi." and edited["user_message"]["version"] == 2
        assert "parent" not in edited["user_message"] or not edited["user_message"]["parent"]
        current = _messages(http, name)
        assert next(m["content"] for m in current) == "Say hi." and len(current) == 2

        everything = _messages(http, name, all_versions=True)
        assert len(everything) == 7, "the earlier versions stay retrievable"
        contents = {m["name"]: m["content"] for m in everything}
        assert contents[second["assistant_message"]["name"]] == second["assistant_message"]["content"]
        old_branch = _messages(http, name, leaf=second["assistant_message"]["name"])
        assert [m["content"] for m in old_branch][:3] == ["Say hello.", answer["content"], "And goodbye?"]

        listed = http.get("/api/v1/conversations").json()["conversations"]
        assert listed[0]["name"] == name, "most recently updated first"
        assert http.delete(f"/api/v1/{name}").status_code == 200
        gone = http.get(f"/api/v1/{name}")
        assert gone.status_code == 404 and _reason(gone) == "CONVERSATION_NOT_FOUND"


def test_bad_turns_are_refused_naming_the_field(stack: RunningStack) -> None:
    with stack.http() as http:
        name = _create(http)["name"]
        for body, field in [
            ({"content": "  "}, "content"),
            ({}, "content"),
            ({"regenerate": {"message": "nope"}}, "regenerate.message"),
            ({"edit": {"message": f"{name}/messages/999999", "content": "x"}}, "edit.message"),
        ]:
            response = http.post(f"/api/v1/{name}:send", json=body)
            assert response.status_code in (400, 404), response.text
            assert field in response.text
        missing_model = http.post("/api/v1/conversations", json={"system_prompt": "x"})
        assert missing_model.status_code == 400 and "conversation.model" in missing_model.text
        assert http.get("/api/v1/conversations/Not_A_Name").status_code == 400


def test_another_keys_conversation_is_not_found(stack: RunningStack) -> None:
    alice, bob = stack.create_key(["inference"]), stack.create_key(["inference"])
    reader = stack.create_key(["read"])
    with stack.http(alice) as as_alice, stack.http(bob) as as_bob, stack.http(reader) as as_reader:
        name = _create(as_alice)["name"]
        for response in (
            as_bob.get(f"/api/v1/{name}"),
            as_bob.get(f"/api/v1/{name}/messages"),
            as_bob.post(f"/api/v1/{name}:send", json={"content": "hi"}),
            as_bob.delete(f"/api/v1/{name}"),
        ):
            assert response.status_code == 404 and _reason(response) == "CONVERSATION_NOT_FOUND", (
                response.text
            )
        assert name not in {
            c["name"] for c in as_bob.get("/api/v1/conversations").json().get("conversations", [])
        }
        assert as_reader.post(f"/api/v1/{name}:send", json={"content": "hi"}).status_code == 403
        assert as_reader.post("/api/v1/conversations", json={"model": MODEL}).status_code == 403
    with stack.http() as admin:
        assert admin.get(f"/api/v1/{name}").status_code == 200, "admin sees every conversation"
    stub = conversations_pb2_grpc.ConversationsServiceStub(keyed_channel(stack.grpc_target, bob))
    with pytest.raises(grpc.RpcError) as refused:
        stub.GetConversation(conversations_pb2.GetConversationRequest(name=name), timeout=10)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_details(refused.value)["ErrorInfo"]
    assert getattr(info, "reason", "") == "CONVERSATION_NOT_FOUND"


def test_oldest_turns_are_left_out_to_fit_a_small_context_limit(stack: RunningStack) -> None:
    limit = 120
    with stack.http() as http:
        name = _create(http, system_prompt="You answer in one word.", context_limit_tokens=limit)["name"]
        left_out: list[int] = []
        for i in range(5):
            sent = _send(
                http,
                name,
                content=f"Question {i}: name a colour that is found in a rainbow, and only one please.",
            )
            left_out.append(sent.get("left_out_turns", 0))
            assert sent["assistant_message"].get("left_out_turns", 0) == left_out[-1]
            # The engine's own count of the prompt it read (the transaction record holds the same).
            prompt_tokens = sent["assistant_message"]["usage"]["prompt_tokens"]
            assert 0 < prompt_tokens <= limit, "the prompt the engine read fits the limit"
        assert left_out[0] == 0 and left_out[-1] > 0 and left_out == sorted(left_out)
        assert len(_messages(http, name)) == 10, "nothing stored is deleted by pruning"


def test_streamed_turn_over_grpc(stack: RunningStack) -> None:
    stub = conversations_pb2_grpc.ConversationsServiceStub(stack.channel())
    conversation = stub.CreateConversation(
        conversations_pb2.CreateConversationRequest(conversation=conversations_pb2.Conversation(model=MODEL)),
        timeout=10,
    )
    request = conversations_pb2.SendMessageRequest(conversation=conversation.name, content="Count to five.")
    request.sampling.max_tokens = 16
    events = list(stub.StreamMessage(request, timeout=60))
    assert events[0].HasField("user_message") and events[0].user_message.content == "Count to five."
    texts = [e.text for e in events if e.WhichOneof("event") == "text"]
    assert texts, "the answer streams in pieces"
    assert events[-1].HasField("assistant_message")
    assert events[-1].assistant_message.content == "".join(texts)


def test_streamed_turn_over_rest_is_server_sent_events(stack: RunningStack) -> None:
    with stack.http() as http:
        name = _create(http)["name"]
        body = {"content": "Say yes.", "sampling": SHORT}
        with http.stream("POST", f"/api/v1/{name}:stream", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [
                json.loads(line[len("data: ") :])
                for line in response.iter_lines()
                if line.startswith("data: ")
            ]
    assert events[0]["user_message"]["content"] == "Say yes."
    texts = [e["text"] for e in events if "text" in e]
    assert texts and events[-1]["assistant_message"]["content"] == "".join(texts)
