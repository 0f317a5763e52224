"""After Triton restarts, the models it had loaded are loaded again, and those unloaded stay unloaded.

A restarted Triton (supervisord respawns it in `make run`; Compose and Kubernetes restart its
container) loads only what its command line names (`--load-model`, i.e. `triton.load_models`). The
models service knows more: which models were READY when it first saw Triton, and every LoadModel and
UnloadModel it has served since. When Triton answers again after not answering, it loads the models
that are missing and unloads the ones Triton's command line brought back although a caller had
unloaded them through this process, so the model set is what it was before the crash.

Every load and unload that happens is audited: callers' LoadModel/UnloadModel as RPC events with
their principal (the AuditObserver), and what happens without a caller -- Triton's own start-up loads
and this restore -- as operational `model.load` / `model.unload` events by the `system` principal,
with `trigger` saying why (`triton_start`, `triton_restart`).

Both sets live in this process's memory: a models service that restarts while Triton runs takes the
READY models it then sees. With several models-service replicas (each restores after the same Triton
restart), each restores what it served: it loads what it knows was loaded and unloads only the models
whose UnloadModel it served itself -- never "whatever it does not know", which would unload a model
another replica loaded. What stays a limit: a model that was READY when this replica first saw
Triton, or that it loaded, and was then unloaded through another replica comes back
(docs/runbook.md, `FerryTritonRestarting`; docs/deploy.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from google.rpc import code_pb2
from prometheus_client import Counter
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from services.common import triton_client
from services.common.names import model_name
from services.recording import Recorder

log = logging.getLogger(__name__)

TRITON_RESTARTS = Counter(
    "ferry_models_triton_restarts",
    "Times the models service saw Triton answer again after it stopped answering.",
)
RESTORED = Counter(
    "ferry_models_restored",
    "Model loads and unloads the models service made after a Triton restart, by action and outcome.",
    ["action", "outcome"],
)

# Triton's repository index states of a model that serves or is about to.
_LOADED_STATES = ("READY", "LOADING")


class LoadedModels:
    """The models Triton should have loaded, and their restore after a Triton restart."""

    def __init__(self, client: triton_aio.InferenceServerClient, recorder: Recorder | None) -> None:
        self.client = client
        self.recorder = recorder
        # None until Triton was first seen: then the models READY at that moment, plus those whose
        # LoadModel this process served, less those whose UnloadModel it served.
        self.wanted: set[str] | None = None
        # The models a caller unloaded through this process (and did not load again through it since):
        # the only ones a restore unloads. A model this process does not know of was loaded through
        # another replica (or by hand) and is left alone.
        self.unloaded_here: set[str] = set()
        self._down_since: float | None = None

    def loaded(self, model_id: str) -> None:
        """A LoadModel succeeded (served by this process)."""
        self.unloaded_here.discard(model_id)
        if self.wanted is not None:
            self.wanted.add(model_id)

    def unloaded(self, model_id: str) -> None:
        """An UnloadModel succeeded (served by this process)."""
        self.unloaded_here.add(model_id)
        if self.wanted is not None:
            self.wanted.discard(model_id)

    def down(self) -> None:
        """Triton stopped answering."""
        if self._down_since is None:
            self._down_since = time.monotonic()

    async def up(self) -> None:
        """Triton answers (for the first time, or again after `down`): note or restore the model set."""
        index = await triton_client.repository_index(self.client)
        ready = {e["name"] for e in index if e.get("state") in _LOADED_STATES and e.get("name")}
        if self.wanted is None:
            self.wanted = set(ready)
            self._audit_start_loads(sorted(ready), "triton_start")
            self._down_since = None
            return
        down_seconds = time.monotonic() - self._down_since if self._down_since is not None else 0.0
        self._down_since = None
        TRITON_RESTARTS.inc()
        log.warning(
            "Triton answers again after %.1f s; it loaded %s itself; restoring %s",
            down_seconds,
            ", ".join(sorted(ready)) or "no model",
            ", ".join(sorted(self.wanted)) or "no model",
        )
        self._operational(
            "triton.restart",
            "",
            attributes={
                "down_seconds": f"{down_seconds:.1f}",
                "wanted": ",".join(sorted(self.wanted)),
                "unloaded": ",".join(sorted(self.unloaded_here)),
            },
        )
        # What Triton's command line loaded and is wanted: loaded by the restart, not by us.
        self._audit_start_loads(sorted(ready & self.wanted), "triton_restart")
        for model in sorted(self.wanted - ready):
            await self._restore("load", model)
        # Only what a caller unloaded through this process: a READY model this process does not know
        # was loaded through another replica, which restores it itself.
        for model in sorted((ready & self.unloaded_here) - self.wanted):
            await self._restore("unload", model)

    async def _restore(self, action: str, model: str) -> None:
        try:
            if action == "load":
                await self.client.load_model(model)
            else:
                await self.client.unload_model(model)
        except InferenceServerException as err:
            RESTORED.labels(action, "failed").inc()
            log.error("could not %s model %s after Triton's restart: %s", action, model, err.message())
            self._operational(
                f"model.{action}",
                model,
                code=code_pb2.UNAVAILABLE,
                message=f"restore after Triton's restart failed: {err.message()}",
                attributes={"trigger": "triton_restart", "by": "models service"},
            )
            return
        RESTORED.labels(action, "ok").inc()
        log.info("model %s %sed again after Triton's restart", model, action)
        self._operational(
            f"model.{action}", model, attributes={"trigger": "triton_restart", "by": "models service"}
        )

    def _audit_start_loads(self, models: Iterable[str], trigger: str) -> None:
        for model in models:
            self._operational(
                "model.load",
                model,
                attributes={"trigger": trigger, "by": "triton command line (triton.load_models)"},
            )

    def _operational(
        self,
        action: str,
        model: str,
        *,
        code: int = code_pb2.OK,
        message: str = "",
        attributes: dict[str, str] | None = None,
    ) -> None:
        if self.recorder is None:
            return
        self.recorder.operational(
            action,
            resource=model_name(model) if model else "",
            code=code,
            message=message,
            attributes=attributes,
        )
