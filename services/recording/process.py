"""A service process whose every RPC is audited through its own recording spool."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from services.common.auth import Authorizer
from services.common.config import ServiceSettings, Settings, get_settings
from services.common.server import Runtime, serve
from services.recording.audit_observer import AuditObserver
from services.recording.recorder import Recorder

AuditedSetup = Callable[[Runtime, Recorder], Awaitable[None]]


def run_audited(
    name: str,
    endpoint: Callable[[Settings], ServiceSettings],
    setup: AuditedSetup,
    *,
    service_names: list[str],
    recorder: Recorder | None = None,
    authorizer: Authorizer | None = None,
) -> None:
    """`services.common.server.serve` with the process's recorder started before `setup` and an
    AuditObserver after authentication (one KIND_RPC audit event per call)."""
    spool = recorder or Recorder(get_settings(), name)

    async def started(runtime: Runtime) -> None:
        await spool.start(runtime)
        await setup(runtime, spool)

    asyncio.run(
        serve(
            name,
            endpoint,
            started,
            service_names=service_names,
            observers=[AuditObserver(spool)],
            authorizer=authorizer,
        )
    )
