"""The hostile-input strategies themselves (no stack): they make what the suite claims to send."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.auth.rpcs import all_rpcs
from tests.hostile.checks import is_openai_error, is_status_json
from tests.hostile.strategies import json_values, mutated, proto_message, raw_payload, wire

RPCS = all_rpcs()
VALID = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@pytest.mark.parametrize("rpc", RPCS, ids=[str(rpc) for rpc in RPCS])
@settings(max_examples=5, deadline=None, derandomize=True)
@given(data=st.data())
def test_every_request_message_can_be_generated(rpc: Any, data: st.DataObject) -> None:
    msg = data.draw(proto_message(rpc.method.input_type))
    assert type(msg).FromString(msg.SerializeToString()) == msg


@settings(max_examples=50, deadline=None, derandomize=True)
@given(data=st.data())
def test_mutations_stay_json_and_differ(data: st.DataObject) -> None:
    body = data.draw(mutated(VALID))
    json.dumps(body)
    sent = data.draw(wire(body))
    assert isinstance(sent.content, bytes)
    assert VALID == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@settings(max_examples=30, deadline=None, derandomize=True)
@given(value=json_values(), data=st.data())
def test_wire_is_bytes(value: Any, data: st.DataObject) -> None:
    assert isinstance(data.draw(wire(value)).content, bytes)
    assert isinstance(data.draw(raw_payload(b"\x0a\x02hi")), bytes)


def test_error_shapes() -> None:
    assert is_openai_error({"error": {"message": "m", "type": "t", "param": None, "code": "c"}})
    assert not is_openai_error({"error": {"message": "", "type": "t", "param": None, "code": "c"}})
    assert not is_openai_error({"code": 3, "message": "m"})
    assert is_status_json({"code": 3, "message": "m", "details": []})
    assert not is_status_json("Could not resolve /api/v1/x to a method.")
