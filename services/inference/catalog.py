"""Which models can generate now, and their metadata: Triton's models as Triton reports them, and the
models served by upstream servers as their config describes them.

Names follow `services.common.model_names`: an alias resolves to its model, and with `allowed_models`
set every other model is NOT_FOUND and unlisted, exactly like a model that does not exist. An upstream
model shadows a Triton model of the same name.

Triton lookups are cached for a couple of seconds so a request costs no extra Triton round trip; the
models configured to load at start are re-read every second by the readiness watcher, which also
drives the service's health status (NOT_SERVING until every one of them is READY, so Envoy's
readiness covers them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from services.common import triton_client, upstream_models
from services.common.errors import Reason, RpcError, not_found, rpc_error
from services.common.model_names import ModelNames
from services.common.triton_client import ModelInfo

log = logging.getLogger(__name__)


def model_unavailable(name: str, why: str) -> RpcError:
    return rpc_error(Reason.MODEL_NOT_READY, f"model '{name}' is not ready: {why}", metadata={"model": name})


class Catalog:
    def __init__(
        self, client: triton_aio.InferenceServerClient, names: ModelNames, ttl_seconds: float = 2.0
    ) -> None:
        self.client = client
        self.names = names
        self.ttl = ttl_seconds
        self._ready: dict[str, tuple[ModelInfo, float]] = {}
        self._upstream = {name: upstream_models.model_info(name, cfg) for name, cfg in names.upstream.items()}
        # OpenAI's `created`: Triton keeps no load time, so we use the first time we saw the model ready.
        self._first_seen: dict[str, int] = {}

    def is_known(self, name: str) -> bool:
        """Whether `name` is a model that was ready at the last look (no Triton call)."""
        return name in self._ready or name in self._upstream

    def created(self, name: str) -> int:
        """When the model (an alias's model, for an alias) was first seen ready."""
        return self._first_seen.setdefault(self.names.model(name), int(time.time()))

    async def _refresh(self, name: str) -> ModelInfo | None:
        """Reads readiness and config of one Triton model; None when it is not ready."""
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
        """The metadata of the READY model `name` means (an alias means its model); NOT_FOUND when
        nothing of that name exists or `allowed_models` hides it, UNAVAILABLE when it is not ready."""
        if not self.names.is_allowed(name):
            raise not_found("model", name)
        model = self.names.model(name)
        upstream = self._upstream.get(model)
        if upstream is not None:
            return upstream
        cached = self._ready.get(model)
        if cached and time.monotonic() - cached[1] < self.ttl:
            return cached[0]
        info = await self._refresh(model)
        if info is not None:
            return info
        for entry in await triton_client.repository_index(self.client):
            if entry.get("name") == model:
                state = entry.get("state") or "not loaded"
                reason = entry.get("reason")
                raise model_unavailable(model, f"{state}{f' ({reason})' if reason else ''}")
        raise not_found("model", name)

    async def is_ready(self, name: str) -> bool:
        """Whether the model is READY now (asks Triton; False when Triton does not answer). An upstream
        model is always ready: whether its server answers shows in the request's own error."""
        if name in self._upstream:
            return True
        try:
            return await self._refresh(name) is not None
        except RpcError:
            return False

    async def ready_models(self) -> list[ModelInfo]:
        """Every model clients may use that can generate now (aliases not included), by name."""
        out = [info for name, info in self._upstream.items() if self.names.is_allowed(name)]
        for entry in await triton_client.repository_index(self.client):
            name = entry.get("name", "")
            if entry.get("state") != "READY" or not name or name in self._upstream:
                continue
            if self.names.is_alias(name) or not self.names.is_allowed(name):
                continue
            try:
                out.append(await self.resolve(name))
            except RpcError:
                continue  # unloaded between the index and the lookup
        return sorted(out, key=lambda m: m.name)

    async def listing(self) -> list[tuple[str, ModelInfo]]:
        """The names clients may use now with the model each means: every ready model under its own
        name and under each of its aliases (as OpenAI's and vLLM's model lists show aliases), by name."""
        out: list[tuple[str, ModelInfo]] = []
        for info in await self.ready_models():
            out.append((info.name, info))
            out += [(alias, info) for alias in self.names.aliases_of(info.name)]
        return sorted(out, key=lambda entry: entry[0])

    async def watch(
        self,
        models: Sequence[str],
        on_ready: Callable[[bool], Awaitable[None]],
        on_model: Callable[[ModelInfo], object] = lambda info: None,
        interval: float = 1.0,
    ) -> None:
        """Polls `models` forever. Calls `on_ready(all of them READY)` at first and on every change
        (with no models: whether Triton answers), and `on_model(info)` whenever one of them becomes
        ready or its metadata changes (a reload with another slot count)."""
        last_ready: bool | None = None
        last_info: dict[str, ModelInfo] = {}
        while True:
            ready = await self._look(models, on_model, last_info) if models else await self._triton_live()
            if ready != last_ready:
                what = f"the models to load at start ({', '.join(models)})" if models else "Triton"
                log.info("%s %s", what, "are READY" if ready else "not ready")
                await on_ready(ready)
                last_ready = ready
            await asyncio.sleep(interval)

    async def _look(
        self, models: Sequence[str], on_model: Callable[[ModelInfo], object], last: dict[str, ModelInfo]
    ) -> bool:
        """Reads every model in `models`; whether all are ready. `last` is what the previous look saw."""
        for model in models:
            try:
                info = await self._refresh(model)
            except RpcError:
                info = None
            except Exception:
                log.exception("readiness check of model %s failed", model)
                info = None
            if (model in last) != (info is not None):
                log.info("model %s is %s", model, "READY" if info is not None else "not ready")
            if info is None:
                last.pop(model, None)
            elif last.get(model) != info:
                on_model(info)
                last[model] = info
        return all(model in last for model in models)

    async def _triton_live(self) -> bool:
        try:
            return bool(await self.client.is_server_live(client_timeout=2.0))
        except InferenceServerException:
            return False
