"""Hostile gRPC: every method of every service, through Envoy and on the process's own port, with
field values generated from the request's descriptor (extremes, unknown enum values, repeated,
nested, oneofs) or raw bytes as the payload, with and without a valid key.

Each answer: OK or a status that is not UNKNOWN, INTERNAL or DATA_LOSS, UNAVAILABLE only with
details (the stack is up), rich details that parse; after each test no process restarted, every
accepted generation recorded, sampled refusals audited.
"""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import message
from hypothesis import given
from hypothesis import strategies as st

from services.common.access import is_internal
from tests.auth.rpcs import SERVED_BY, Rpc, all_rpcs
from tests.hostile.checks import error_info, grpc_problems
from tests.hostile.conftest import MAX_TOKENS, Hostile
from tests.hostile.profiles import FUZZ
from tests.hostile.routes import GENERATION, safe_request
from tests.hostile.strategies import proto_message, raw_payload

RPCS = all_rpcs()
CAPPED = frozenset({"max_tokens", "max_completion_tokens"})


def cap_tokens(msg: message.Message) -> None:
    """Every max_tokens in `msg` at most MAX_TOKENS (the keys refuse more; this keeps an accepted
    generation cheap even where a key's limit would not apply)."""
    for field, value in msg.ListFields():
        if field.message_type is not None:
            if field.is_repeated:
                if not field.message_type.GetOptions().map_entry:
                    for item in value:
                        cap_tokens(item)
            else:
                cap_tokens(value)
        elif field.name in CAPPED and isinstance(value, int) and value > MAX_TOKENS:
            setattr(msg, field.name, MAX_TOKENS)


@st.composite
def hostile_call(draw: st.DrawFn, rpc: Rpc, hostile: Hostile) -> dict[str, Any]:
    try:
        valid = safe_request(rpc, hostile.subjects)
    except KeyError:  # an internal method: no valid request from outside
        valid = None
    how = draw(st.sampled_from(["generated", "merged", "raw"]))
    if how == "generated" or (how == "merged" and valid is None):
        payload = draw(proto_message(rpc.method.input_type))
    elif how == "merged" and valid is not None:
        payload = type(valid)()
        payload.CopyFrom(valid)
        payload.MergeFrom(draw(proto_message(rpc.method.input_type)))
    else:
        payload = None
    if payload is not None:
        cap_tokens(payload)
        data = payload.SerializeToString()
    else:
        data = draw(raw_payload(valid.SerializeToString() if valid is not None else b""))
    return {
        "how": how,
        "data": data,
        "target": draw(st.sampled_from(["envoy", "direct"])),
        "key": draw(st.sampled_from(list(hostile.keys))),
    }


def call(hostile: Hostile, rpc: Rpc, request: dict[str, Any]) -> None:
    stack = hostile.stack
    target = (
        stack.grpc_target if request["target"] == "envoy" else stack.service_targets[SERVED_BY[rpc.service]]
    )
    channel = stack.raw_channel(target)
    request_id = f"hostile-{uuid.uuid4().hex}"
    metadata = [("x-request-id", request_id)]
    key = hostile.keys[request["key"]]
    if key:
        metadata.append(("authorization", f"Bearer {key}"))
    where = f"{rpc.path} via {request['target']} ({request['how']}, key {request['key']}, {request['data'][:80]!r})"
    hostile.examples += 1
    try:
        if rpc.method.server_streaming:
            for _ in channel.unary_stream(rpc.path)(request["data"], metadata=metadata, timeout=60):
                pass
        else:
            channel.unary_unary(rpc.path)(request["data"], metadata=metadata, timeout=60)
    except grpc.RpcError as error:
        problems = grpc_problems(error)
        assert not problems, f"{where}: {problems}"
        info = error_info(error)
        # A service's (or the edge check's) refusal: the audit trail names it by request id.
        # (Internal methods are not audited: services/recording/audit_observer.py.)
        audited = request["target"] == "direct" and not is_internal(rpc.path)
        if info is not None and info.domain == "ferry.dev" and audited:
            hostile.refused.append((request_id, f"{where}: {error.code().name}"))
        return
    if rpc.path in GENERATION:
        hostile.accepted.append((request_id, where))


@pytest.mark.parametrize("rpc", RPCS, ids=[str(rpc) for rpc in RPCS])
def test_grpc_method(rpc: Rpc, checked: Hostile) -> None:
    @FUZZ
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        call(checked, rpc, data.draw(hostile_call(rpc, checked)))

    fuzz()
