"""Spans of the generation path, named and attributed per OpenTelemetry's semantic conventions for
generative AI (gen_ai.*) and RPC (rpc.*): the engine call is a CLIENT span `{operation} {model}` with
events for the admission wait and the first token; prompts and generated text only with
`telemetry.capture_content` on.

Made only when tracing is on (`telemetry.exporter` not `none`); otherwise the engine call carries the
request's trace context alone, as before.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from backends.llamacpp.contract import SamplingParameters
from services.common.telemetry import capture_content, tracer, tracing_enabled
from services.inference.domain import Message

# Seconds the current request waited for its admission slot (set by TracingObserver.admitted, read by
# the engine span, which starts after admission in the same task).
ADMISSION_WAIT: ContextVar[float | None] = ContextVar("admission_wait", default=None)

ADMITTED_EVENT = "ferry.admitted"
FIRST_TOKEN_EVENT = "gen_ai.first_token"


def start_engine_span(
    system: str,
    model: str,
    sampling: SamplingParameters,
    *,
    chat: bool,
    rpc_service: str = "",
    rpc_method: str = "",
    messages: Sequence[Message] | None = None,
    prompt: str = "",
) -> Span | None:
    """The CLIENT span of one engine call, child of the current span; None when tracing is off."""
    if not tracing_enabled():
        return None
    operation = "chat" if chat else "text_completion"
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": system,
        "gen_ai.system": system,
        "gen_ai.request.model": model,
    }
    if rpc_service:
        attributes.update({"rpc.system": "grpc", "rpc.service": rpc_service, "rpc.method": rpc_method})
    for name, value in (
        ("max_tokens", sampling.max_tokens),
        ("temperature", sampling.temperature),
        ("top_p", sampling.top_p),
        ("top_k", sampling.top_k),
        ("seed", sampling.seed),
        ("frequency_penalty", sampling.frequency_penalty),
        ("presence_penalty", sampling.presence_penalty),
    ):
        if value is not None:
            attributes[f"gen_ai.request.{name}"] = value
    if sampling.stop:
        attributes["gen_ai.request.stop_sequences"] = [str(s) for s in sampling.stop]
    if capture_content():
        attributes["gen_ai.input.messages"] = (
            json.dumps([{"role": m.role, "content": m.content} for m in messages])
            if messages
            else json.dumps([{"role": "user", "content": prompt}])
        )
    span = tracer().start_span(f"{operation} {model}", kind=SpanKind.CLIENT, attributes=attributes)
    waited = ADMISSION_WAIT.get()
    if waited is not None:
        span.add_event(ADMITTED_EVENT, {"ferry.admission.wait_seconds": waited})
    return span


def first_token(span: Span | None) -> None:
    if span is not None:
        span.add_event(FIRST_TOKEN_EVENT)


def end_engine_span(
    span: Span | None,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    finish_reason: str,
    output: str = "",
    error: BaseException | None = None,
) -> None:
    if span is None:
        return
    if prompt_tokens:
        span.set_attribute("gen_ai.usage.input_tokens", prompt_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", completion_tokens)
    if finish_reason:
        span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
    if output and capture_content():
        span.set_attribute("gen_ai.output.messages", json.dumps([{"role": "assistant", "content": output}]))
    if error is not None:
        span.set_attribute("error.type", type(error).__name__)
        span.set_status(Status(StatusCode.ERROR, str(error)))
    span.end()
