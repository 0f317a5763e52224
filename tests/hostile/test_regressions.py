"""What the hostile-input suite found, pinned as plain examples."""

from __future__ import annotations

from typing import Any

from tests.hostile.checks import is_status_json
from tests.stack import RunningStack


def _status(reply: Any) -> dict[str, Any]:
    assert reply.headers["content-type"].startswith("application/json"), reply.text
    body = reply.json()
    assert is_status_json(body), body
    return dict(body)


def test_api_edge_errors_are_status_json(stack: RunningStack) -> None:
    """The transcoder's plain-text 400/404 on /api/v1/* (a body that is not JSON, a wrong type, an
    unknown field or path or verb) were text/plain; they are google.rpc.Status JSON with an ErrorInfo,
    as every other error of ferry's API."""
    with stack.http() as http:
        truncated = http.post(
            "/api/v1/grammars", content=b'{"syntax": "SYN', headers={"content-type": "application/json"}
        )
        assert truncated.status_code == 400
        body = _status(truncated)
        assert body["code"] == 3
        assert body["details"][0]["reason"] == "INVALID_JSON"
        wrong_type = http.post("/api/v1/jobs", json={"request": []})
        assert wrong_type.status_code == 400
        assert _status(wrong_type)["details"][0]["reason"] == "INVALID_TYPE"
        unknown = http.post("/api/v1/keys", params={"page_size": "1"}, json={"display_name": "x"})
        assert unknown.status_code == 400
        violations = _status(unknown)["details"][1]["fieldViolations"]
        assert violations[0]["field"] == "page_size"
        for verb, path in [
            ("POST", "/api/v1/nope"),
            ("PUT", "/api/v1/audit/events"),
            ("GET", "/api/v1/nope/x"),
        ]:
            reply = http.request(verb, path)
            assert reply.status_code == 404, (verb, path)
            assert _status(reply)["details"][0]["reason"] == "UNKNOWN_URL"


def test_edge_errors_do_not_echo_huge_values(stack: RunningStack) -> None:
    """The transcoder quotes the offending value whole: a 1 MB string where an object belongs made a
    2 MB error body (message and field violation); ferry.lua cuts the text to 512 bytes."""
    with stack.http() as http:
        for huge in ("a" * 1_000_000, "🦜" * 250_000):
            reply = http.patch("/api/v1/grammars/hostile", json=huge)
            assert reply.status_code == 400
            assert len(reply.content) < 4096
            assert _status(reply)["details"][0]["reason"] == "INVALID_TYPE"
            openai = http.post("/v1/completions", json={"model": "m", "prompt": {"a": huge}})
            assert openai.status_code == 400
            assert len(openai.content) < 4096
            assert len(openai.json()["error"]["message"]) < 1024
