"""Which models can generate now, and their metadata, as Triton reports them.

Lookups are cached for a couple of seconds so a request costs no extra Triton round trip; the
default model is re-read every second by the readiness watcher, which also drives the service's
health status (NOT_SERVING until the default model is READY, so Envoy's readiness covers the model).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from services.common import triton_client
from services.common.errors import Reason, RpcError, not_found, rpc_error
from services.common.triton_client import ModelInfo

log = logging.getLogger(__name__)


def model_unavailable(name: str, why: str) -> RpcError:
    return rpc_error(Reason.MODEL_NOT_READY, f"model '{name}' is not ready: {why}", metadata={"model": name})


class Catalog:
    def __init__(self, client: triton_aio.InferenceServerClient, ttl_seconds: float = 2.0) -> None:
        self.client = client
        self.ttl = ttl_seconds
        self._ready: dict[str, tuple[ModelInfo, float]] = {}
        # OpenAI's `created`: Triton keeps no load time, so we use the first time we saw the model ready.
        self._first_seen: dict[str, int] = {}

    def is_known(self, name: str) -> bool:
        """Whether the model was ready at the last look (no Triton call)."""
        return name in self._ready

    def created(self, name: str) -> int:
        return self._first_seen.setdefault(name, int(time.time()))

    async def _refresh(self, name: str) -> ModelInfo | None:
        """Reads readiness and config of one model; None when it is not ready."""
        try:
            ready = await self.client.is_model_ready(name)
        except InferenceServerException as err:
            self._ready.pop(name, None)
            raise triton_client.unavailable(err) from err
        info = await triton_client.model_info(self.client, name) if ready else None
        if info is None:
            self._ready.pop(name, None)
            return None
        self._ready[name] = (info, time.monotonic())
        self.created(name)
        return info

    async def resolve(self, name: str) -> ModelInfo:
        """A READY model's metadata; NOT_FOUND when Triton does not know it, UNAVAILABLE when not ready."""
        cached = self._ready.get(name)
        if cached and time.monotonic() - cached[1] < self.ttl:
            return cached[0]
        info = await self._refresh(name)
        if info is not None:
            return info
        for entry in await triton_client.repository_index(self.client):
            if entry.get("name") == name:
                state = entry.get("state") or "not loaded"
                reason = entry.get("reason")
                raise model_unavailable(name, f"{state}{f' ({reason})' if reason else ''}")
        raise not_found("model", name)

    async def is_ready(self, name: str) -> bool:
        """Whether the model is READY now (asks Triton; False when Triton does not answer)."""
        try:
            return await self._refresh(name) is not None
        except RpcError:
            return False

    async def ready_models(self) -> list[ModelInfo]:
        out: list[ModelInfo] = []
        for entry in await triton_client.repository_index(self.client):
            name = entry.get("name", "")
            if entry.get("state") == "READY" and name:
                try:
                    out.append(await self.resolve(name))
                except RpcError:
                    continue  # unloaded between the index and the lookup
        return sorted(out, key=lambda m: m.name)

    async def watch(
        self,
        model: str,
        on_change: Callable[[bool, ModelInfo | None], Awaitable[None]],
        interval: float = 1.0,
    ) -> None:
        """Polls the model forever; calls `on_change(ready, info)` on every transition (and at first)."""
        last: bool | None = None
        last_info: ModelInfo | None = None
        while True:
            try:
                info = await self._refresh(model)
            except RpcError:
                info = None
            except Exception:
                log.exception("readiness check of model %s failed", model)
                info = None
            ready = info is not None
            if ready != last or info != last_info:
                if ready != last:
                    log.info("model %s is %s", model, "READY" if ready else "not ready")
                await on_change(ready, info)
                last, last_info = ready, info
            await asyncio.sleep(interval)
