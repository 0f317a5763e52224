"""Transaction records of generations, written to the process's durable spool (`services.recording`).

Both writes are local SQLite inserts, no network on the request path; the spool delivers them later,
at least once, to the Transactions service. When they are written is the record stage's business
(`services.inference.record`).
"""

from __future__ import annotations

from services.common.interceptor import current_call
from services.common.telemetry import current_trace_id
from services.inference.domain import Exchange
from services.recording import Recorder


def _status(error_code: str) -> str:
    if not error_code:
        return "succeeded"
    return "cancelled" if error_code == "CANCELLED" else "failed"


class SpoolTransactionLog:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def started(self, exchange: Exchange) -> None:
        request = exchange.request
        call = current_call.get()
        self.recorder.transaction_started(
            exchange.request_id,
            model=request.model,
            principal=call.principal if call else "anonymous",
            operation=call.full_method if call else "",
            prompt=request.prompt or "",
            messages=[(m.role, m.content) for m in request.messages or ()],
            parameters=request.recorded_parameters(),
            trace_id=current_trace_id(),
            cache_hit=exchange.cache == "hit",
        )

    async def finished(self, exchange: Exchange) -> None:
        outcome = exchange.outcome
        status = _status(outcome.error_code)
        reason = outcome.finish_reason or ("cancelled" if status == "cancelled" else "error")
        self.recorder.transaction_finished(
            exchange.request_id,
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
