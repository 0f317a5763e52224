"""Transaction records of embeddings requests, written to the process's durable spool like generations'.

One record per admitted request (started once admitted, finished before the caller gets the answer):
`prompt` holds the inputs as a JSON array of strings, `parameters.api` is "embedding",
`usage.prompt_tokens` the inputs' tokens. The vectors are kept (as JSON, in `output`) only with
`inference.embeddings.record_vectors`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from services.common.interceptor import current_call
from services.common.telemetry import current_trace_id
from services.inference.embeddings.request import EmbeddingOutcome, EmbeddingRequest
from services.recording import Recorder

log = logging.getLogger(__name__)


@dataclass
class EmbeddingCall:
    """One embeddings request being served."""

    request_id: str
    request: EmbeddingRequest
    outcome: EmbeddingOutcome


def _status(error_code: str) -> str:
    if not error_code:
        return "succeeded"
    return "cancelled" if error_code == "CANCELLED" else "failed"


class EmbeddingLog:
    def __init__(self, recorder: Recorder, record_vectors: bool = False) -> None:
        self.recorder = recorder
        self.record_vectors = record_vectors

    def started(self, call: EmbeddingCall) -> None:
        request, context = call.request, current_call.get()
        self._safely(
            call,
            lambda: self.recorder.transaction_started(
                call.request_id,
                model=request.model,
                principal=context.principal if context else "anonymous",
                operation=context.full_method if context else "",
                prompt=json.dumps(list(request.inputs), ensure_ascii=False),
                parameters=request.recorded_parameters(),
                trace_id=current_trace_id(),
            ),
        )

    def finished(self, call: EmbeddingCall) -> None:
        outcome = call.outcome
        status = _status(outcome.error_code)
        output = ""
        if self.record_vectors and outcome.vectors is not None and status == "succeeded":
            output = json.dumps(outcome.vectors.tolist())
        self._safely(
            call,
            lambda: self.recorder.transaction_finished(
                call.request_id,
                status=status,
                output=output,
                finish_reason=""
                if status == "succeeded"
                else ("cancelled" if status == "cancelled" else "error"),
                prompt_tokens=outcome.prompt_tokens,
                latency=outcome.latency,
                error_code=outcome.error_code,
                error_message=outcome.error_message,
            ),
        )

    @staticmethod
    def _safely(call: EmbeddingCall, write: Callable[[], None]) -> None:
        try:
            write()
        except Exception:
            # Recording must never turn a served answer into an error (the spool is durable).
            log.exception("recording request %s failed", call.request_id)
