"""The inference catalog's model names and readiness (Triton stubbed): aliases resolve to their model,
`allowed_models` refuses every other model like an unknown one, upstream models resolve from their
config, OpenAI's model list shows aliases under their own ids, and readiness covers every model
configured to load at start."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from ferry.openai.v1 import openai_pb2

from services.common.config import InferenceSettings, UpstreamModel
from services.common.errors import RpcError
from services.common.model_names import ModelNames
from services.common.triton_client import ModelInfo, Provider
from services.inference.catalog import Catalog
from services.inference.openai_api.servicer import OpenAIServicer
from services.inference.resolve import Resolve
from tests.inference.test_wire_parsing import chat
from tests.models.triton_stub import TritonStub

REMOTE = UpstreamModel(base_url="http://127.0.0.1:9/v1", owned_by="lab", max_in_flight=3)
NO_CONTEXT: Any = None


def catalog(triton: TritonStub, **names: Any) -> Catalog:
    return Catalog(triton, ModelNames(**names))  # type: ignore[arg-type]


async def not_found(models: Catalog, name: str) -> RpcError:
    with pytest.raises(RpcError) as err:
        await models.resolve(name)
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    return err.value


async def test_an_alias_resolves_to_its_model_and_the_request_then_names_the_model() -> None:
    models = catalog(TritonStub({"chat": "READY"}), aliases={"gpt-4o-mini": "chat"})
    assert (await models.resolve("gpt-4o-mini")).name == "chat"
    request, model = await Resolve(models, InferenceSettings())(chat(model="gpt-4o-mini"), None)
    assert (model.name, request.model, request.model_alias) == ("chat", "chat", "gpt-4o-mini")
    assert request.recorded_parameters()["model_alias"] == "gpt-4o-mini"
    plain, _ = await Resolve(models, InferenceSettings())(chat(model="chat"), None)
    assert plain.model_alias == "" and "model_alias" not in plain.recorded_parameters()


async def test_a_model_allowed_models_hides_is_refused_like_an_unknown_one() -> None:
    models = catalog(
        TritonStub({"chat": "READY", "base": "READY", "spare": "UNAVAILABLE"}),
        allowed=["chat"],
        upstream={"remote": REMOTE},
    )
    unknown = await not_found(models, "nope")
    for hidden in ("base", "spare", "remote"):
        err = await not_found(models, hidden)
        assert err.message == f"model '{hidden}' not found" and unknown.message == "model 'nope' not found"
    assert [m.name for m in await models.ready_models()] == ["chat"]


async def test_an_alias_of_a_model_nobody_has_is_not_found_by_its_own_name() -> None:
    models = catalog(TritonStub({"chat": "READY"}), aliases={"gpt-4o-mini": "gone"})
    assert "gpt-4o-mini" in (await not_found(models, "gpt-4o-mini")).message


async def test_an_upstream_model_resolves_from_its_config_and_is_always_ready() -> None:
    triton = TritonStub({"chat": "READY"}, live=False)
    models = catalog(triton, upstream={"remote": REMOTE}, aliases={"gpt-4": "remote"})
    info = await models.resolve("gpt-4")
    assert (info.name, info.provider, info.engine_slots, info.owned_by) == (
        "remote",
        Provider.UPSTREAM,
        3,
        "lab",
    )
    assert await models.is_ready("remote") and models.is_known("remote")


async def test_openai_lists_aliases_under_their_own_ids_with_their_models_owner() -> None:
    triton = TritonStub({"chat": "READY", "base": "READY", "spare": "UNAVAILABLE"})
    models = catalog(
        triton, allowed=["chat", "remote"], aliases={"gpt-4o-mini": "chat"}, upstream={"remote": REMOTE}
    )
    servicer = OpenAIServicer(NO_CONTEXT, models)
    reply = await servicer.ListModels(openai_pb2.ListModelsRequest(), NO_CONTEXT)
    assert [(m.id, m.owned_by) for m in reply.data] == [
        ("chat", "owner-of-chat"),
        ("gpt-4o-mini", "owner-of-chat"),
        ("remote", "lab"),
    ]
    one = await servicer.RetrieveModel(openai_pb2.RetrieveModelRequest(model="gpt-4o-mini"), NO_CONTEXT)
    assert (one.id, one.owned_by, one.created) == ("gpt-4o-mini", "owner-of-chat", models.created("chat"))
    with pytest.raises(RpcError) as err:
        await servicer.RetrieveModel(openai_pb2.RetrieveModelRequest(model="base"), NO_CONTEXT)
    assert err.value.code == grpc.StatusCode.NOT_FOUND


async def test_readiness_waits_for_every_model_configured_to_load() -> None:
    triton = TritonStub({"a": "READY", "b": "LOADING"})
    models = catalog(triton)
    seen: list[bool] = []
    gated: list[str] = []

    async def on_ready(ready: bool) -> None:
        seen.append(ready)

    def on_model(info: ModelInfo) -> None:
        gated.append(info.name)

    watcher = asyncio.create_task(models.watch(["a", "b"], on_ready, on_model, interval=0.01))
    try:
        await asyncio.sleep(0.05)
        assert seen == [False] and gated == ["a"]
        triton.states["b"] = "READY"
        await asyncio.sleep(0.05)
        assert seen == [False, True] and gated == ["a", "b"]
        triton.states["a"] = "UNLOADING"
        await asyncio.sleep(0.05)
        assert seen == [False, True, False]
    finally:
        watcher.cancel()


async def test_with_no_model_to_load_readiness_follows_triton() -> None:
    triton = TritonStub({}, live=False)
    seen: list[bool] = []

    async def on_ready(ready: bool) -> None:
        seen.append(ready)

    watcher = asyncio.create_task(catalog(triton).watch([], on_ready, interval=0.01))
    try:
        await asyncio.sleep(0.05)
        triton.live = True
        await asyncio.sleep(0.05)
        assert seen == [False, True]
    finally:
        watcher.cancel()
