"""A CallObserver that audits every RPC: one `KIND_RPC` event per call, through the process's spool.

Plug it into `serve(..., observers=[auth_observer, AuditObserver(recorder)])`. Put it after the
authentication observer, so `call.principal` is known; a call that authentication refuses is still
audited (`on_end` runs for it) with its refusal code.

Left out: service-to-service methods (scope `internal`): the recording deliveries
(`AuditService/AppendEvents`, `TransactionsService/CreateTransaction|CompleteTransaction`) and the
gateway's per-request `AuthService` calls. Auditing AppendEvents would recurse (each delivered event
would produce another), the transaction writes are records, not actions, and an authorization is
part of the call it authorizes (audited there, with its outcome).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from ferry.audit.v1 import audit_pb2
from google.rpc import code_pb2

from services.common.access import is_internal
from services.common.interceptor import Call
from services.common.names import model_name
from services.common.telemetry import current_trace_id
from services.common.timestamps import seconds_to_duration, to_timestamp
from services.recording.recorder import Recorder

# Request fields that name the resource a call acts on, in order of preference.
RESOURCE_FIELDS = ("name", "model", "parent")


class AuditObserver:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        # What on_start learns (resource, trace id, wall-clock start), keyed by the Call object's id.
        self._calls: dict[int, tuple[str, str, float]] = {}

    async def on_start(self, call: Call, request: Any) -> None:
        if is_internal(call.full_method):
            return
        self._calls[id(call)] = (_resource(request), current_trace_id(), time.time())

    async def on_end(self, call: Call) -> None:
        if is_internal(call.full_method):
            return
        elapsed = time.monotonic() - call.started
        resource, trace_id, wall_start = self._calls.pop(
            id(call), ("", current_trace_id(), time.time() - elapsed)
        )
        event = audit_pb2.AuditEvent(
            kind=audit_pb2.AuditEvent.Kind.KIND_RPC,
            event_time=to_timestamp(datetime.fromtimestamp(wall_start, UTC)),
            principal=call.principal,
            service=call.service,
            method=call.method,
            resource=resource,
            action="rpc",
            code=getattr(code_pb2, call.code.name, code_pb2.UNKNOWN),
            message=call.message,
            latency=seconds_to_duration(elapsed),
            request_id=call.request_id,
            trace_id=trace_id,
            peer=call.peer,
        )
        self.recorder.audit(event)


def _resource(request: Any) -> str:
    descriptor = getattr(request, "DESCRIPTOR", None)
    if descriptor is None:
        return ""
    for field in RESOURCE_FIELDS:
        if field in descriptor.fields_by_name:
            value = getattr(request, field)
            if isinstance(value, str) and value:
                return value if "/" in value or field != "model" else model_name(value)
    return ""
