"""The chat WebSocket through Envoy (`/chat/ws`): a client chats (token frames, then the stored answer),
cancels mid-answer (the engine slot is free again within a second: the inference service's in-flight
gauge), and is refused without a valid key (an error frame, then close code 4401)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import httpx
import pytest

from tests.inference.conftest import Metrics
from tests.stack import RunningStack

pytestmark = pytest.mark.stack

MODEL = "smollm2-135m-instruct"


def _ws_url(stack: RunningStack) -> str:
    return stack.rest.replace("http://", "ws://", 1) + "/chat/ws"


def _conversation(stack: RunningStack) -> str:
    with stack.http() as http:
        response = http.post("/api/v1/conversations", json={"model": MODEL})
        assert response.status_code == 200, response.text
        return str(response.json()["name"])


async def _frames_until(socket: aiohttp.ClientWebSocketResponse, kinds: set[str]) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    while True:
        frame = await asyncio.wait_for(socket.receive_json(), timeout=120)
        frames.append(frame)
        if frame["type"] in kinds:
            return frames


async def test_chat_over_the_socket_with_the_key_in_the_first_frame(stack: RunningStack) -> None:
    name = _conversation(stack)
    async with aiohttp.ClientSession() as session, session.ws_connect(_ws_url(stack)) as socket:
        await socket.send_json({"type": "auth", "api_key": stack.admin_key})
        assert (await socket.receive_json())["type"] == "ready"
        await socket.send_json(
            {
                "type": "turn",
                "id": "t1",
                "conversation": name,
                "content": "Name three colours.",
                "sampling": {"max_tokens": 24, "temperature": 0},
            }
        )
        frames = await _frames_until(socket, {"done", "error"})
    assert frames[0]["type"] == "user_message" and frames[0]["message"]["content"] == "Name three colours."
    tokens = [f["text"] for f in frames if f["type"] == "token"]
    assert len(tokens) > 1, "the answer streams token by token"
    done = frames[-1]
    assert done["type"] == "done" and done["id"] == "t1"
    assert done["message"]["content"] == "".join(tokens) and done["message"]["role"] == "ROLE_ASSISTANT"


async def test_cancel_mid_answer_frees_the_engine_slot(stack: RunningStack) -> None:
    name = _conversation(stack)
    metrics = Metrics(stack.metrics_urls["inference"])
    headers = {"Authorization": f"Bearer {stack.admin_key}"}
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(_ws_url(stack), headers=headers) as socket,
    ):
        assert (await socket.receive_json())["type"] == "ready", "a header key needs no auth frame"
        await socket.send_json(
            {
                "type": "turn",
                "id": "long",
                "conversation": name,
                "content": "Tell a very long story.",
                "sampling": {"max_tokens": 1500, "ignore_eos": True},
            }
        )
        await _frames_until(socket, {"token"})
        assert metrics.value("ferry_inference_requests_in_flight", model=MODEL) >= 1
        await socket.send_json({"type": "cancel", "id": "long"})
        cancelled_at = time.monotonic()
        frames = await _frames_until(socket, {"done", "error"})
        done = frames[-1]
        assert done["type"] == "done" and done["id"] == "long" and done["cancelled"] is True
        assert done["message"]["finish_reason"] == "FINISH_REASON_CANCELLED", "the partial answer, stored"
        while metrics.value("ferry_inference_requests_in_flight", model=MODEL) > 0:
            assert time.monotonic() - cancelled_at < 1.0, "the engine slot is freed within a second"
            await asyncio.sleep(0.05)
    with stack.http() as http:
        messages = http.get(f"/api/v1/{name}/messages").json()["messages"]
    assert messages[-1]["finish_reason"] == "FINISH_REASON_CANCELLED", "the part generated so far is kept"


@pytest.mark.parametrize(
    "first", [{"type": "auth", "api_key": "fk-not-a-real-key"}, {"type": "turn", "id": "x"}]
)
async def test_refused_without_a_valid_key(stack: RunningStack, first: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as session:
        # A key in the URL is not read: only the first frame or the Authorization header count.
        url = _ws_url(stack) + f"?api_key={stack.admin_key}"
        async with session.ws_connect(url) as socket:
            await socket.send_json(first)
            error = await socket.receive_json()
            closing = await socket.receive()
    assert error["type"] == "error" and error["code"] == "UNAUTHENTICATED" and error["status"] == 401
    assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 4401


def test_page_is_served_through_envoy_without_a_key(stack: RunningStack) -> None:
    page = httpx.get(stack.rest + "/chat/", timeout=30)
    assert page.status_code == 200 and "ferry chat" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for asset in ("chat.js", "markdown.js", "chat.css"):
        assert httpx.get(f"{stack.rest}/chat/{asset}", timeout=30).status_code == 200
    assert "cdn" not in page.text.lower() and "http" not in page.text.split("<body>")[0].replace(
        "http-equiv", ""
    )
    root = httpx.get(stack.rest + "/", timeout=30)
    assert root.status_code in (301, 302) and root.headers["location"].endswith("/chat/")
