"""The model set after a Triton restart (services/models/restore.py), against a stand-in Triton: what a
caller loaded comes back, what a caller unloaded stays unloaded although Triton's command line loads it
again, and every load and unload without a caller is audited as the system principal."""

from __future__ import annotations

import asyncio
from typing import Any

from google.rpc import code_pb2
from tritonclient.utils import InferenceServerException

from services.models.restore import LoadedModels
from tests.models.triton_stub import TritonStub


class Audit:
    """Stands in for the Recorder: keeps operational events."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def operational(self, action: str, **fields: Any) -> str:
        self.events.append({"action": action, "principal": fields.pop("principal", "system"), **fields})
        return str(len(self.events))


def test_a_restart_restores_what_callers_loaded_and_unloaded() -> None:
    triton = TritonStub({"base": "READY", "chat": "READY", "extra": ""})
    audit = Audit()
    loaded = LoadedModels(triton, audit)  # type: ignore[arg-type]

    async def scenario() -> None:
        await loaded.up()  # first sight: base and chat, loaded by Triton's command line
        loaded.loaded("extra")  # a caller's LoadModel
        loaded.unloaded("chat")  # a caller's UnloadModel
        loaded.down()
        # Triton restarts: its command line loads base and chat again, knows nothing of extra.
        triton.states = {"base": "READY", "chat": "READY", "extra": ""}
        triton.calls.clear()
        await loaded.up()

    asyncio.run(scenario())
    assert triton.states == {"base": "READY", "chat": "UNAVAILABLE", "extra": "READY"}
    assert triton.calls == [("load", "extra"), ("unload", "chat")]
    actions = [(e["action"], e["resource"], e.get("attributes", {}).get("trigger")) for e in audit.events]
    assert actions == [
        ("model.load", "models/base", "triton_start"),
        ("model.load", "models/chat", "triton_start"),
        ("triton.restart", "", None),
        ("model.load", "models/base", "triton_restart"),
        ("model.load", "models/extra", "triton_restart"),
        ("model.unload", "models/chat", "triton_restart"),
    ]
    assert {e["principal"] for e in audit.events} == {"system"}


def test_a_failed_restore_is_audited_and_does_not_stop_the_others() -> None:
    class Failing(TritonStub):
        async def load_model(self, name: str) -> None:
            if name == "broken":
                raise InferenceServerException("failed to load 'broken'")
            await super().load_model(name)

    triton = Failing({"base": "READY", "broken": "READY", "extra": "READY"})
    audit = Audit()
    loaded = LoadedModels(triton, audit)  # type: ignore[arg-type]

    async def scenario() -> None:
        await loaded.up()
        loaded.down()
        triton.states = {"base": "READY", "broken": "", "extra": ""}
        await loaded.up()

    asyncio.run(scenario())
    assert triton.states["extra"] == "READY"
    failed = [e for e in audit.events if e.get("code", code_pb2.OK) != code_pb2.OK]
    assert [(e["action"], e["resource"]) for e in failed] == [("model.load", "models/broken")]
    assert "failed to load" in failed[0]["message"]
