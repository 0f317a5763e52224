"""Bootstrap shared by every service process: grpc.aio server, health, reflection, metrics, drain."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.common.auth import AuthObserver, Authorizer
from services.common.config import ServiceSettings, Settings, get_settings
from services.common.interceptor import CallObserver, Lifecycle, ServingInterceptor
from services.common.logging import configure_logging
from services.common.metrics import start_metrics_server
from services.common.telemetry import configure_tracing, server_interceptors

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
# Answers SERVING while the process runs, whatever its dependencies do: Kubernetes liveness probes
# ask for it so that an outage of Triton or PostgreSQL does not restart every pod.
LIVENESS_SERVICE = "liveness"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# Prompts and completions can be long; the 4 MiB gRPC default is too small for big contexts.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


@dataclass
class Runtime:
    """What a service's set-up code receives: its server, health, settings and lifecycle."""

    name: str
    settings: Settings
    endpoint: ServiceSettings
    server: grpc.aio.Server
    health: HealthServicer
    lifecycle: Lifecycle
    service_names: list[str] = field(default_factory=list)
    # The process's authentication (inference reports generated tokens through it).
    auth: AuthObserver | None = None
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def set_serving(self, serving: bool, service_name: str | None = None) -> None:
        # A draining process stays NOT_SERVING whatever its dependency watchers conclude.
        status = SERVING if serving and not self.lifecycle.draining else NOT_SERVING
        for name in [service_name] if service_name else ["", *self.service_names]:
            await self.health.set(name, status)


Setup = Callable[[Runtime], Awaitable[None]]


async def serve(
    name: str,
    endpoint: Callable[[Settings], ServiceSettings],
    setup: Setup,
    *,
    service_names: list[str],
    observers: list[CallObserver] | None = None,
    authorizer: Authorizer | None = None,
) -> None:
    """Runs one service until SIGTERM/SIGINT, then drains: NOT_SERVING, finish in-flight RPCs, exit.

    Every call is authenticated first (AuthObserver, asking the gateway unless `authorizer` answers
    in-process), then passes the other observers.
    """
    settings = get_settings()
    where = endpoint(settings)
    configure_logging(name, settings.log_level, settings.log_format)
    if not settings.auth.enabled:
        log.warning("AUTHENTICATION IS OFF (FERRY_AUTH=off): %s accepts every call without a key", name)
    configure_tracing(name, settings.telemetry)
    start_metrics_server(where.host, where.metrics_port)

    lifecycle = Lifecycle()
    auth = AuthObserver(settings, authorizer)
    server = grpc.aio.server(
        interceptors=[
            *server_interceptors(settings.telemetry),
            ServingInterceptor(lifecycle, [auth, *(observers or [])]),
        ],
        options=SERVER_OPTIONS,
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    runtime = Runtime(name, settings, where, server, health, lifecycle, list(service_names), auth)
    await health.set(LIVENESS_SERVICE, SERVING)
    await runtime.set_serving(True)
    await setup(runtime)
    server.add_insecure_port(where.address)
    await server.start()
    log.info("%s serving on %s (metrics on :%d)", name, where.address, where.metrics_port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await drain(runtime, settings.drain_grace_seconds)


async def drain(runtime: Runtime, grace: float) -> None:
    log.info(
        "%s draining: health NOT_SERVING, waiting for %d in-flight RPCs",
        runtime.name,
        runtime.lifecycle.in_flight,
    )
    runtime.lifecycle.draining = True
    await runtime.set_serving(False)
    finished = await runtime.lifecycle.wait_idle(grace)
    if not finished:
        log.warning(
            "%s: %d RPCs still running after %.0fs; cancelling them",
            runtime.name,
            runtime.lifecycle.in_flight,
            grace,
        )
    for hook in runtime.on_stop:
        try:
            await hook()
        except Exception:
            log.exception("stop hook failed")
    await runtime.server.stop(1.0)
    log.info("%s stopped", runtime.name)
