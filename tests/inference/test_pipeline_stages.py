"""The pipeline's stages one by one, then together (pure logic; the engine, catalog and transaction log
are stand-ins, since what is checked here is the order of calls and the error paths the real engine
cannot be made to take at will)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Any

import grpc
import pytest
from ferry.auth.v1.auth_pb2 import Limits, Principal
from prometheus_client import REGISTRY

from backends.llamacpp.contract import EngineErrorCode, EngineFault, SamplingParameters
from services.common.auth import principal_var
from services.common.config import InferenceSettings
from services.common.errors import RpcError, not_found
from services.common.triton_client import ModelInfo
from services.inference.admission import Admissions
from services.inference.domain import UNKNOWN_MODEL, Api, Exchange, GenerationRequest, Message, Piece
from services.inference.engine_interface import EngineError, EngineFaulted, EngineRefused
from services.inference.engine_stream import DEADLINE_MARGIN_SECONDS, EngineStream
from services.inference.observers import GenerationObserver, MetricsObserver, UsageReporter
from services.inference.pipeline import Pipeline
from services.inference.record import RecordOnce
from services.inference.render import Render
from services.inference.resolve import Resolve
from services.inference.templates import ChatTemplates
from tests.inference.test_wire_parsing import chat, completion, generate

MODEL = ModelInfo("m", "python", 4096, 1024, "ferry", "{{ messages[0].content }}!", 2)


class Catalog:
    def __init__(self, ready: bool = True) -> None:
        self.ready = ready

    def is_known(self, name: str) -> bool:
        return name == MODEL.name

    async def resolve(self, name: str) -> ModelInfo:
        if name != MODEL.name:
            raise not_found("model", name)
        return MODEL

    async def is_ready(self, name: str) -> bool:
        return self.ready


class Engine:
    """Yields `pieces` pieces (the last with a finish reason unless `error` is raised after them)."""

    def __init__(self, pieces: int = 3, error: EngineError | None = None) -> None:
        self.pieces, self.error = pieces, error
        self.calls: list[dict[str, Any]] = []
        self.closed_early = False

    async def generate(
        self,
        model: ModelInfo,
        prompt: str,
        sampling: SamplingParameters,
        *,
        messages: Sequence[Message] | None = None,
        request_id: str,
        timeout: float | None,
    ) -> AsyncGenerator[Piece, None]:
        self.calls.append(
            {
                "model": model.name,
                "prompt": prompt,
                "messages": messages,
                "sampling": sampling,
                "timeout": timeout,
            }
        )
        finished = False
        try:
            for i in range(self.pieces):
                last = i == self.pieces - 1 and self.error is None
                yield Piece(f"t{i}", 1, 5, "stop" if last else "")
                await asyncio.sleep(0)
            if self.error is not None:
                raise self.error
            finished = True
        finally:
            self.closed_early = not finished and self.error is None


class Deadline:
    def __init__(self, remaining: float | None = None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


class Transactions:
    """What was recorded, in order, with the outcome's state at the time."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    async def started(self, exchange: Exchange) -> None:
        self.events.append(("started", ""))

    async def finished(self, exchange: Exchange) -> None:
        self.events.append(("finished", exchange.outcome.error_code or exchange.outcome.finish_reason))


class Watcher(GenerationObserver):
    def __init__(self) -> None:
        self.refusals: list[tuple[Api, str, str]] = []
        self.admissions: list[str] = []
        self.ended_with: list[str] = []

    def refused(self, api: Api, model: str, err: RpcError) -> None:
        self.refusals.append((api, model, err.code.name))

    def admitted(self, exchange: Exchange, waited: float) -> None:
        self.admissions.append(exchange.request_id)

    def ended(self, exchange: Exchange) -> None:
        self.ended_with.append(exchange.outcome.error_code or "ok")


def key(**limits: int) -> Principal:
    return Principal(name="keys/k1", scopes=["inference"], limits=Limits(**limits))


def pipeline(
    engine: Engine, *, settings: InferenceSettings | None = None, catalog: Catalog | None = None
) -> tuple[Pipeline, Transactions, Watcher]:
    transactions, watcher = Transactions(), Watcher()
    built = Pipeline(
        catalog or Catalog(),
        engine,
        ChatTemplates(),
        settings or InferenceSettings(),
        transactions,
        [watcher],
    )
    return built, transactions, watcher


def request(**body: Any) -> GenerationRequest:
    return chat(model="m", **body)


# --- resolve -------------------------------------------------------------------------------------------


async def test_resolve_finds_the_model_and_applies_the_callers_limits() -> None:
    resolved, model = await Resolve(Catalog(), InferenceSettings())(request(), key(max_tokens=7))
    assert model is MODEL and resolved.sampling.max_tokens == 7


async def test_resolve_refuses_an_unknown_model_and_a_too_large_ask() -> None:
    with pytest.raises(RpcError) as err:
        await Resolve(Catalog(), InferenceSettings())(chat(model="nope"), None)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(RpcError) as err:
        await Resolve(Catalog(), InferenceSettings())(request(max_tokens=2000), None)
    assert err.value.field_violations[0][0] == "max_tokens"


# --- render --------------------------------------------------------------------------------------------


def test_render_uses_the_models_template_or_the_prompt_as_it_is() -> None:
    render = Render(ChatTemplates())
    assert render(request(), MODEL) == "Hi!"
    assert render(completion(prompt="Once"), MODEL) == "Once"


def test_render_refusal_names_the_input_as_the_caller_spelled_it() -> None:
    strict = ModelInfo(**{**MODEL.__dict__, "chat_template": "{{ raise_exception('no') }}"})
    native = generate(messages={"messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(RpcError) as err:
        Render(ChatTemplates())(native, strict)
    assert err.value.field_violations[0][0] == "messages.messages"


# --- admit ---------------------------------------------------------------------------------------------


def test_admission_limits_come_from_settings_else_the_engine_slots() -> None:
    assert Admissions(InferenceSettings()).limits(MODEL) == (2, 16)
    assert Admissions(InferenceSettings(max_in_flight=3, max_queued=0)).limits(MODEL) == (3, 0)


def test_one_gate_per_model_resized_when_its_slots_change() -> None:
    admissions = Admissions(InferenceSettings())
    gate = admissions.gate(MODEL)
    assert admissions.gate(MODEL) is gate
    admissions.gate(ModelInfo(**{**MODEL.__dict__, "engine_slots": 4}))
    assert (gate.max_in_flight, gate.max_queued) == (4, 32)


# --- stream --------------------------------------------------------------------------------------------


async def test_stream_gives_the_engine_the_contracts_parameters_and_the_deadline_less_a_margin() -> None:
    engine = Engine()
    exchange = Exchange("r1", request(temperature=0.5), prompt="p")
    pieces = [p async for p in EngineStream(engine, Catalog())(exchange, MODEL, Deadline(10.0))]
    assert [p.text for p in pieces] == ["t0", "t1", "t2"]
    call = engine.calls[0]
    assert call["sampling"] == SamplingParameters(temperature=0.5) and call["prompt"] == "p"
    assert call["timeout"] == pytest.approx(10.0 - DEADLINE_MARGIN_SECONDS)


async def test_stream_refuses_when_the_deadline_leaves_no_time() -> None:
    engine = Engine()
    with pytest.raises(RpcError) as err:
        async for _ in EngineStream(engine, Catalog())(Exchange("r", request()), MODEL, Deadline(0.1)):
            pass
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and engine.calls == []


@pytest.mark.parametrize(
    ("ready", "code", "reason"),
    [
        (False, grpc.StatusCode.UNAVAILABLE, "MODEL_NOT_READY"),
        (True, grpc.StatusCode.INTERNAL, "ENGINE_ERROR"),
    ],
)
async def test_tritons_own_refusal_is_retryable_only_when_the_model_is_not_ready(
    ready: bool, code: grpc.StatusCode, reason: str
) -> None:
    engine = Engine(pieces=1, error=EngineRefused("Request for unknown model"))
    with pytest.raises(RpcError) as err:
        async for _ in EngineStream(engine, Catalog(ready=ready))(
            Exchange("r", request()), MODEL, Deadline()
        ):
            pass
    assert (err.value.code, err.value.reason) == (code, reason)


async def test_closing_the_stream_early_closes_the_engines_generation() -> None:
    engine = Engine(pieces=10)
    stream = EngineStream(engine, Catalog())(Exchange("r", request()), MODEL, Deadline())
    async with aclosing(stream):
        await anext(stream)
    assert engine.closed_early


# --- record --------------------------------------------------------------------------------------------


async def test_record_once_writes_one_start_and_one_finish() -> None:
    transactions = Transactions()
    record = RecordOnce(transactions, Exchange("r", request()))
    await record.finish()  # never started: nothing to finish
    await record.start()
    await record.start()
    await record.finish()
    await record.finish()
    assert [e for e, _ in transactions.events] == ["started", "finished"]


async def test_a_failing_transaction_log_never_fails_the_request() -> None:
    class Broken(Transactions):
        async def started(self, exchange: Exchange) -> None:
            raise OSError("disk full")

    await RecordOnce(Broken(), Exchange("r", request())).start()


# --- observers -----------------------------------------------------------------------------------------


def test_refusals_of_unknown_models_share_one_metrics_label() -> None:
    def count(model: str) -> float:
        labels = {"model": model, "api": "chat", "outcome": "invalid_argument"}
        return REGISTRY.get_sample_value("ferry_inference_requests_total", labels) or 0.0

    before = count(UNKNOWN_MODEL), count("m")
    observer = MetricsObserver(Catalog())
    err = RpcError(grpc.StatusCode.INVALID_ARGUMENT, "x", "INVALID_ARGUMENT")
    observer.refused(Api.CHAT, "someone-elses-name", err)
    observer.refused(Api.CHAT, "m", err)
    assert (count(UNKNOWN_MODEL), count("m")) == (before[0] + 1, before[1] + 1)


def test_usage_is_reported_for_callers_with_generated_tokens() -> None:
    reported: list[tuple[str, int]] = []

    class Sink:
        def record_usage(self, principal: Principal, address: str, completion_tokens: int) -> None:
            reported.append((principal.name, completion_tokens))

    exchange = Exchange("r", request())
    reporter = UsageReporter(Sink())
    reporter.ended(exchange)  # nothing generated
    exchange.outcome.completion_tokens = 4
    token = principal_var.set(key())
    try:
        reporter.ended(exchange)
    finally:
        principal_var.reset(token)
    reporter.ended(exchange)  # no caller known
    assert reported == [("keys/k1", 4)]


# --- the stages together -------------------------------------------------------------------------------


async def test_an_answered_request_is_recorded_before_its_last_piece_is_delivered() -> None:
    built, transactions, watcher = pipeline(Engine())
    exchange = Exchange("r", request())
    seen: list[list[tuple[str, str]]] = []
    async with aclosing(built.stream(exchange, Deadline())) as pieces:
        async for _piece in pieces:
            seen.append(list(transactions.events))
    assert seen[0] == [("started", "")]
    assert seen[-1] == [("started", ""), ("finished", "stop")]
    assert transactions.events == seen[-1] and watcher.ended_with == ["ok"]
    assert "".join(exchange.outcome.text) == "t0t1t2" and exchange.outcome.time_to_first_token is not None


async def test_a_failure_after_admission_is_recorded_once_with_its_error() -> None:
    fault = EngineFault(code=EngineErrorCode.ENGINE_FAILED, message="boom")
    built, transactions, watcher = pipeline(Engine(pieces=2, error=EngineFaulted(fault)))
    exchange = Exchange("r", request())
    with pytest.raises(RpcError) as err:
        await built.collect(exchange, Deadline())
    assert err.value.reason == "ENGINE_ERROR"
    assert transactions.events == [("started", ""), ("finished", "INTERNAL")]
    assert watcher.ended_with == ["INTERNAL"]


async def test_a_caller_going_away_cancels_the_generation_and_is_recorded_as_cancelled() -> None:
    engine = Engine(pieces=100)
    built, transactions, watcher = pipeline(engine)
    exchange = Exchange("r", request())
    async with aclosing(built.stream(exchange, Deadline())) as pieces:
        await anext(pieces)
    assert engine.closed_early
    assert transactions.events == [("started", ""), ("finished", "CANCELLED")]
    assert exchange.outcome.error_code == "CANCELLED" and watcher.ended_with == ["CANCELLED"]


async def test_refusals_before_admission_are_not_recorded() -> None:
    built, transactions, watcher = pipeline(
        Engine(), settings=InferenceSettings(max_in_flight=1, max_queued=0)
    )
    busy = built.stream(Exchange("r1", request()), Deadline())
    async with aclosing(busy):
        await anext(busy)  # holds the only slot
        with pytest.raises(RpcError) as err:
            await built.collect(Exchange("r2", request()), Deadline())
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.retry_after_seconds
    with pytest.raises(RpcError):
        await built.collect(Exchange("r3", request(max_tokens=5000)), Deadline())
    # r1 only (cancelled when closed); r2 and r3 never reached the record stage.
    assert transactions.events == [("started", ""), ("finished", "CANCELLED")]
    assert watcher.ended_with == ["RESOURCE_EXHAUSTED", "CANCELLED", "INVALID_ARGUMENT"]


class CompletionOnlyCatalog(Catalog):
    async def resolve(self, name: str) -> ModelInfo:
        model = await super().resolve(name)
        return ModelInfo(**{**model.__dict__, "capabilities": frozenset({"completion"})})


async def test_a_request_the_model_is_not_capable_of_is_neither_admitted_nor_recorded() -> None:
    engine = Engine()
    built, transactions, watcher = pipeline(engine, catalog=CompletionOnlyCatalog())
    with pytest.raises(RpcError) as err:
        await built.collect(Exchange("r1", request()), Deadline())
    assert (err.value.code, err.value.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "MODEL_CAPABILITY_MISSING",
    )
    assert err.value.field_violations[0][0] == "messages"
    assert engine.calls == [] and transactions.events == [] and watcher.admissions == []
    assert watcher.ended_with == ["INVALID_ARGUMENT"]
    # The same model answers a prompt.
    await built.collect(Exchange("r2", completion(model="m")), Deadline())
    assert watcher.admissions == ["r2"] and len(engine.calls) == 1


async def test_a_request_that_does_not_parse_is_counted_by_the_observers() -> None:
    from ferry.openai.v1 import openai_pb2

    from services.inference.openai_api.chat import ChatWire

    built, _, watcher = pipeline(Engine())
    wire = ChatWire(openai_pb2.CreateChatCompletionRequest(model="m"), stream=False)
    with pytest.raises(RpcError):
        built.parse(wire)
    assert watcher.refusals == [(Api.CHAT, "m", "INVALID_ARGUMENT")]
