"""The generation path every API shares, as stages: parse -> grammar -> resolve -> render -> admit ->
stream, with the record stage around the admitted part and observers (metrics, usage) watching.

A servicer parses its wire request (`Pipeline.parse`), makes an `Exchange` and reads the pieces of
`Pipeline.stream`; it must close the stream (`contextlib.aclosing`) so that a caller going away cancels
the engine's generation at once. The prompt is rendered before admission: a conversation the template
refuses is answered at once instead of after waiting for a slot.
"""

from __future__ import annotations

import time
from asyncio import CancelledError
from collections.abc import AsyncGenerator, Sequence
from contextlib import AbstractAsyncContextManager, aclosing, nullcontext
from typing import Any, Protocol

from services.common.auth import principal_var
from services.common.config import InferenceSettings
from services.common.errors import RpcError
from services.common.triton_client import ModelInfo
from services.inference.admission import Admissions, is_background
from services.inference.coalesce import coalesced
from services.inference.deadline import Deadline
from services.inference.domain import Exchange, GenerationRequest, Outcome, Piece
from services.inference.engine_interface import Engine
from services.inference.engine_stream import EngineStream, Readiness
from services.inference.grammar_resolve import ResolveGrammar
from services.inference.observers import GenerationObserver
from services.inference.record import NoTransactionLog, RecordOnce, TransactionLog
from services.inference.render import Render
from services.inference.resolve import Models, Resolve
from services.inference.response_cache import ResponseCache
from services.inference.structured import check_answer
from services.inference.templates import ChatTemplates
from services.inference.wire import WireRequest


class ModelCatalog(Models, Readiness, Protocol):
    """What the pipeline asks about models (`catalog.Catalog` in the service)."""


class Pipeline:
    def __init__(
        self,
        catalog: ModelCatalog,
        engine: Engine,
        templates: ChatTemplates,
        settings: InferenceSettings,
        transactions: TransactionLog | None = None,
        observers: Sequence[GenerationObserver] = (),
        grammars: ResolveGrammar | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        # Without a registry, a request naming a stored grammar is refused (never run unconstrained).
        self.grammars = grammars or ResolveGrammar(None)
        self.resolve = Resolve(catalog, settings)
        self.render = Render(templates)
        self.admissions = Admissions(settings)
        self.background_reserve = settings.background_reserve
        self.generate = EngineStream(engine, catalog)
        self.transactions: TransactionLog = transactions or NoTransactionLog()
        self.observers = list(observers)
        self.cache = cache or ResponseCache.off()

    def parse(self, wire: WireRequest[Any]) -> GenerationRequest:
        """The parse stage; a refusal is counted like any other outcome."""
        try:
            return wire.parse()
        except RpcError as err:
            for observer in self.observers:
                observer.refused(wire.api, wire.model, err)
            raise

    async def stream(self, exchange: Exchange, deadline: Deadline) -> AsyncGenerator[Piece, None]:
        """Runs one generation; yields its pieces while `exchange.outcome` grows.

        Raises RpcError for everything the caller should see as a status; nothing is yielded before
        the first piece, so a request refused early still gets a plain error status (HTTP 4xx/5xx).
        """
        outcome = exchange.outcome
        record = RecordOnce(self.transactions, exchange)
        try:
            request = await self.grammars(exchange.request, principal_var.get())
            request, model = await self.resolve(request, principal_var.get())
            exchange.request, exchange.model_label = request, model.name
            exchange.prompt = self.render(request, model)
            # A deterministic request may be answered from the response cache: no engine slot then.
            lookup = await self.cache.lookup(exchange, model)
            hit = lookup.answer if lookup is not None else None
            async with self._slot(model, deadline, cached=hit is not None) as waited:
                if hit is None:
                    for observer in self.observers:
                        observer.admitted(exchange, waited)
                await record.start()
                if hit is not None:
                    source = self.cache.replay(hit)
                else:
                    source = coalesced(self.generate(exchange, model, deadline))
                async with aclosing(source) as pieces:
                    async for piece in pieces:
                        gap = outcome.add(piece, time.monotonic())
                        for observer in self.observers:
                            observer.piece(exchange, piece, gap)
                        if piece.finish_reason:
                            # A constrained answer is checked before any caller sees its end.
                            check_answer(exchange.request, outcome)
                            # Recorded before the caller gets the last piece: answered means recorded.
                            await record.finish()
                            self.cache.keep(exchange, lookup)
                        if self.cache.announce_due(exchange, piece, first=gap is None):
                            await self.cache.announce(exchange, deadline)
                        yield piece
        except RpcError as err:
            outcome.failed(err.code.name, err.message)
            raise
        except (GeneratorExit, CancelledError):
            # The caller went away; leaving the `async with` blocks above cancelled the generation.
            outcome.failed("CANCELLED", "the caller went away")
            raise
        except Exception as err:
            outcome.failed("INTERNAL", repr(err))
            raise
        finally:
            if outcome.latency is None:
                outcome.latency = time.monotonic() - outcome.started_at
            for observer in self.observers:
                observer.ended(exchange)
            await record.finish()

    def _slot(self, model: ModelInfo, deadline: Deadline, cached: bool) -> AbstractAsyncContextManager[float]:
        """The engine slot a generation waits for (seconds waited); an answer from the cache needs none."""
        if cached:
            return nullcontext(0.0)
        reserve = self.background_reserve if is_background() else None
        return self.admissions.gate(model).slot(deadline.time_remaining(), background_reserve=reserve)

    async def collect(self, exchange: Exchange, deadline: Deadline) -> Outcome:
        """Runs a generation to its end (unary APIs)."""
        async with aclosing(self.stream(exchange, deadline)) as pieces:
            async for _piece in pieces:
                pass
        return exchange.outcome
