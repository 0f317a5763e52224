"""Inference service process: the native InferenceService and the OpenAI-compatible OpenAIService.

Both report NOT_SERVING (grpc.health.v1) until every model configured to load at start
(`triton.load_models`) is READY in Triton (with none configured: until Triton answers), so probes and
Envoy's readiness cover the models; the process itself ("" service) stays SERVING while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ferry.inference.v1 import inference_pb2, inference_pb2_grpc
from ferry.openai.v1 import openai_pb2, openai_pb2_grpc

from services.common import triton_client
from services.common.config import get_settings
from services.common.model_names import ModelNames
from services.common.server import Runtime, serve
from services.common.triton_client import Provider
from services.inference.catalog import Catalog
from services.inference.embeddings.record import EmbeddingLog
from services.inference.embeddings.service import Embeddings
from services.inference.embeddings.triton import TritonEmbedder
from services.inference.engine_interface import EngineRouter
from services.inference.grammar_resolve import GrammarsClient, ResolveGrammar
from services.inference.native.servicer import InferenceServicer
from services.inference.observers import (
    GenerationObserver,
    MetricsObserver,
    TracingObserver,
    UsageReporter,
)
from services.inference.openai_api.servicer import OpenAIServicer
from services.inference.pipeline import Pipeline
from services.inference.response_cache import ResponseCache, TritonModelVersions
from services.inference.templates import ChatTemplates
from services.inference.transaction_log import SpoolTransactionLog
from services.inference.triton_engine import TritonEngine
from services.inference.upstream_engine import UpstreamEngine
from services.recording import Recorder
from services.recording.audit_observer import AuditObserver

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    openai_pb2.DESCRIPTOR.services_by_name["OpenAIService"].full_name,
]


# Module level: the audit observer needs it when the server is built; `setup` starts it.
recorder = Recorder(get_settings(), "inference")


async def setup(runtime: Runtime) -> None:
    settings = runtime.settings
    await recorder.start(runtime)
    client = triton_client.connect(settings.triton)
    catalog = Catalog(client, ModelNames.of(settings))
    observers: list[GenerationObserver] = [MetricsObserver(catalog), TracingObserver()]
    if runtime.auth is not None:
        observers.append(UsageReporter(runtime.auth))
    # One engine per provider: Triton's models, and those of OpenAI-compatible upstream servers.
    upstream = UpstreamEngine(settings.upstream_models)
    engine = EngineRouter({Provider.TRITON: TritonEngine(client), Provider.UPSTREAM: upstream})
    cache = ResponseCache(settings.inference.response_cache, TritonModelVersions(client, settings.home))
    pipeline = Pipeline(
        catalog,
        engine,
        ChatTemplates(),
        settings.inference,
        SpoolTransactionLog(recorder),
        observers,
        grammars=ResolveGrammar(GrammarsClient(settings)),
        cache=cache,
    )
    # Embeddings share the catalog, the admission gates and the recorder with generation.
    embeddings = Embeddings(
        catalog,
        TritonEmbedder(client),
        pipeline.admissions,
        settings.inference,
        EmbeddingLog(recorder, settings.inference.embeddings.record_vectors),
    )
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(
        InferenceServicer(pipeline, embeddings), runtime.server
    )
    openai_pb2_grpc.add_OpenAIServiceServicer_to_server(
        OpenAIServicer(pipeline, catalog, embeddings), runtime.server
    )

    for name in SERVICE_NAMES:
        await runtime.set_serving(False, name)

    async def on_ready(ready: bool) -> None:
        for name in SERVICE_NAMES:
            await runtime.set_serving(ready, name)

    # `on_model` creates a model's gate (and its gauges) or applies a new slot count after a reload.
    watcher = asyncio.create_task(
        catalog.watch(settings.triton.load_models, on_ready, on_model=pipeline.admissions.gate)
    )

    async def stop() -> None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await cache.aclose()
        await client.close()
        await upstream.aclose()

    runtime.on_stop.append(stop)


if __name__ == "__main__":
    asyncio.run(
        serve(
            "inference",
            lambda s: s.inference,
            setup,
            service_names=SERVICE_NAMES,
            observers=[AuditObserver(recorder)],
        )
    )
