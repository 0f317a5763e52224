"""Transaction records of generations, through the process's durable spool (services.recording).

The pipeline calls `started` once a request is admitted and `finished` before the caller receives
the last piece, so an answered request is always recorded (the spool delivers it later, at least
once, to the Transactions service). Both are local SQLite inserts: no network on the request path.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace

from services.common.interceptor import current_call
from services.inference.pipeline import Generation
from services.recording import Recorder


def _trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def _status(error_code: str) -> str:
    if not error_code:
        return "succeeded"
    return "cancelled" if error_code == "CANCELLED" else "failed"


class TransactionRecording:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def started(self, generation: Generation) -> None:
        request = generation.request
        call = current_call.get()
        parameters: dict[str, Any] = {
            "api": request.api.value,
            "stream": request.stream,
            **request.sampling.as_dict(),
        }
        if request.user:
            parameters["user"] = request.user
        if request.echo:
            parameters["echo"] = True
        self.recorder.transaction_started(
            generation.request_id,
            model=request.model,
            principal=call.principal if call else "anonymous",
            operation=call.full_method if call else "",
            prompt=request.prompt or "",
            messages=[(m.role, m.content) for m in request.messages or ()],
            parameters=parameters,
            trace_id=_trace_id(),
        )

    async def finished(self, generation: Generation) -> None:
        outcome = generation.outcome
        if outcome is None:
            return
        status = _status(outcome.error_code)
        reason = outcome.finish_reason or ("cancelled" if status == "cancelled" else "error")
        self.recorder.transaction_finished(
            generation.request_id,
            status=status,
            output="".join(outcome.text),
            finish_reason=reason if status != "failed" else "error",
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            ttft=outcome.time_to_first_token,
            latency=outcome.latency,
            error_code=outcome.error_code,
            error_message=outcome.error_message,
        )
