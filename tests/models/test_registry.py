"""The registry's view of models (Models service, Triton stubbed): `allowed_models` hides and refuses
every other model, aliases resolve to their model, metadata says what each model is, and upstream
models are listed like the others but cannot be loaded or unloaded."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from ferry.models.v1 import models_pb2
from pydantic import ValidationError

from services.common.config import Settings, UpstreamModel
from services.common.errors import RpcError
from services.common.model_names import ModelNames
from services.models.servicer import ModelsServicer
from tests.models.triton_stub import TritonStub

Model = models_pb2.Model
NO_CONTEXT: Any = None
REMOTE = UpstreamModel(base_url="http://127.0.0.1:9/v1", owned_by="lab", context_length=8192)


def registry(triton: TritonStub, **names: Any) -> ModelsServicer:
    return ModelsServicer(triton, ModelNames(**names))  # type: ignore[arg-type]


async def listed(servicer: ModelsServicer) -> dict[str, Model]:
    reply = await servicer.ListModels(models_pb2.ListModelsRequest(), NO_CONTEXT)
    return {m.model_id: m for m in reply.models}


async def refused(call: Any) -> RpcError:
    with pytest.raises(RpcError) as err:
        await call
    return err.value


async def test_allowed_models_hide_and_refuse_every_other_model_like_an_unknown_one() -> None:
    triton = TritonStub({"chat": "READY", "base": "READY", "spare": "UNAVAILABLE"})
    servicer = registry(triton, allowed=["chat"], upstream={"remote": REMOTE})
    assert list(await listed(servicer)) == ["chat"]
    unknown = await refused(servicer.GetModel(models_pb2.GetModelRequest(name="models/nope"), NO_CONTEXT))
    for name in ("base", "spare", "remote"):
        for call in (
            servicer.GetModel(models_pb2.GetModelRequest(name=f"models/{name}"), NO_CONTEXT),
            servicer.LoadModel(models_pb2.LoadModelRequest(name=f"models/{name}"), NO_CONTEXT),
            servicer.UnloadModel(models_pb2.UnloadModelRequest(name=f"models/{name}"), NO_CONTEXT),
        ):
            err = await refused(call)
            assert (
                (err.code, err.reason)
                == (unknown.code, unknown.reason)
                == (
                    grpc.StatusCode.NOT_FOUND,
                    "MODEL_NOT_FOUND",
                )
            )
            assert err.message == f"model 'models/{name}' not found"
    assert triton.calls == []  # nothing hidden was loaded or unloaded


async def test_an_alias_is_listed_on_its_model_and_means_it_by_name() -> None:
    triton = TritonStub({"chat": "UNAVAILABLE", "base": "READY"})
    servicer = registry(triton, aliases={"gpt-4o-mini": "chat", "small": "chat"})
    models = await listed(servicer)
    assert list(models) == ["base", "chat"]
    assert list(models["chat"].aliases) == ["gpt-4o-mini", "small"] and not models["base"].aliases
    loaded = await servicer.LoadModel(models_pb2.LoadModelRequest(name="models/gpt-4o-mini"), NO_CONTEXT)
    assert triton.calls == [("load", "chat")]
    assert (loaded.name, loaded.state) == ("models/chat", Model.STATE_READY)
    got = await servicer.GetModel(models_pb2.GetModelRequest(name="models/small"), NO_CONTEXT)
    assert got.name == "models/chat"


async def test_an_alias_of_a_model_nobody_has_is_not_found_by_its_own_name() -> None:
    servicer = registry(TritonStub({"base": "READY"}), aliases={"gpt-4o-mini": "gone"})
    err = await refused(servicer.GetModel(models_pb2.GetModelRequest(name="models/gpt-4o-mini"), NO_CONTEXT))
    assert err.code == grpc.StatusCode.NOT_FOUND and "models/gpt-4o-mini" in err.message


async def test_a_ready_model_says_what_it_is_and_an_unloaded_one_what_serves_it() -> None:
    models = await listed(registry(TritonStub({"chat": "READY", "spare": "UNAVAILABLE"})))
    chat = models["chat"]
    assert (chat.family, chat.parameter_count, chat.quantization) == ("family-of-chat", "135M", "Q4_1")
    assert list(chat.capabilities) == ["chat", "completion"]
    assert (chat.provider, chat.backend, chat.context_length) == (Model.PROVIDER_TRITON, "llamacpp", 2048)
    spare = models["spare"]
    assert (spare.provider, spare.state, spare.family, list(spare.capabilities)) == (
        Model.PROVIDER_TRITON,
        Model.STATE_UNAVAILABLE,
        "",
        [],
    )


async def test_an_upstream_model_is_listed_ready_and_cannot_be_loaded_or_unloaded() -> None:
    # It also shadows a Triton model of the same name.
    triton = TritonStub({"base": "READY", "remote": "UNAVAILABLE"})
    servicer = registry(triton, upstream={"remote": REMOTE}, aliases={"gpt-4": "remote"})
    remote = (await listed(servicer))["remote"]
    assert (remote.provider, remote.state, remote.backend) == (
        Model.PROVIDER_UPSTREAM,
        Model.STATE_READY,
        "openai-upstream",
    )
    assert (remote.owned_by, remote.context_length, list(remote.aliases)) == ("lab", 8192, ["gpt-4"])
    assert list(remote.capabilities) == ["chat", "completion"]
    got = await servicer.GetModel(models_pb2.GetModelRequest(name="models/gpt-4"), NO_CONTEXT)
    assert got == remote
    for call in (
        servicer.LoadModel(models_pb2.LoadModelRequest(name="models/remote"), NO_CONTEXT),
        servicer.UnloadModel(models_pb2.UnloadModelRequest(name="models/gpt-4"), NO_CONTEXT),
    ):
        err = await refused(call)
        assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_NOT_MANAGED")
        assert "upstream server" in err.message
    assert triton.calls == []


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        (
            {"allowed_models": ["base"], "model_aliases": {"gpt": "chat"}},
            "'gpt' names 'chat', which allowed_models hides",
        ),
        ({"model_aliases": {"a": "b", "b": "chat"}}, "'a' names 'b', another alias"),
        ({"model_aliases": {"chat": "chat"}}, "'chat' names itself"),
        ({"model_aliases": {"models/x": "chat"}}, "'models/x' is not a valid model name"),
        (
            {"model_aliases": {"remote": "chat"}, "upstream_models": {"remote": REMOTE}},
            "also the name of an upstream model",
        ),
        (
            {"triton": {"load_models": ["remote"]}, "upstream_models": {"remote": REMOTE}},
            "'remote' is an upstream model",
        ),
    ],
)
def test_names_no_request_could_use_are_refused_at_start(settings: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        Settings(**settings)


def test_an_alias_in_allowed_models_stands_for_its_model() -> None:
    settings = Settings(allowed_models=["gpt"], model_aliases={"gpt": "chat"})
    names = ModelNames.of(settings)
    assert names.is_allowed("chat") and names.is_allowed("gpt") and not names.is_allowed("base")
