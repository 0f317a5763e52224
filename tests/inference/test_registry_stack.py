"""The registry's names on a real stack of their own, over REST and gRPC: `allowed_models`, aliases,
an upstream model in the registry, and readiness covering every model loaded at start.

The stack (started once for this module, with the session's shared one untouched) loads both shipped
models but allows only Gemma, under its own name and the alias `gpt-4o-mini`, plus two upstream
models, one allowed (`remote`, whose server is never asked here) and one not. So SmolLM2 is READY in
Triton yet must look to every client exactly like a model that does not exist.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import openai
import pytest
from ferry.inference.v1 import inference_pb2, inference_pb2_grpc
from ferry.models.v1 import models_pb2, models_pb2_grpc
from ferry.openai.v1 import openai_pb2, openai_pb2_grpc
from google.protobuf import struct_pb2
from openai.types.chat import ChatCompletionMessageParam

from launcher.ports import free_ports
from services.common.errors import error_details
from tests.stack import RunningStack, running_stack, scratch_home, stack_settings

pytestmark = pytest.mark.stack

GEMMA = "gemma-3-270m"
SMOLLM2 = "smollm2-135m-instruct"
ALIAS = "gpt-4o-mini"
REMOTE = "remote"
HIDDEN_REMOTE = "hidden-remote"
# Loaded but hidden, configured but hidden, and nothing at all: clients must not tell them apart.
ABSENT = (SMOLLM2, HIDDEN_REMOTE, "no-such-model")
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name three rivers."}]
READY_TIMEOUT_SECONDS = 180.0


@pytest.fixture(scope="module")
def registry() -> Iterator[RunningStack]:
    scratch, home = scratch_home("ferry-registry-")
    # A port nothing listens on: the upstream models' server (never asked in these tests).
    (closed,) = free_ports(1)
    upstream = {"base_url": f"http://127.0.0.1:{closed}/v1", "owned_by": "lab"}
    settings = stack_settings(
        home,
        allowed_models=[GEMMA, REMOTE],
        model_aliases={ALIAS: GEMMA},
        upstream_models={REMOTE: upstream, HIDDEN_REMOTE: upstream},
    )
    settings.triton.load_models = [GEMMA, SMOLLM2]
    with running_stack(settings, READY_TIMEOUT_SECONDS) as running:
        yield running
    shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def rest(registry: RunningStack) -> Iterator[httpx.Client]:
    with registry.http() as http:
        yield http


@pytest.fixture(scope="module")
def sdk(registry: RunningStack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{registry.rest}/v1", api_key=registry.admin_key, max_retries=0, timeout=60
    ) as client:
        yield client


def reason(response: httpx.Response) -> tuple[int, str]:
    """(HTTP status, reason) of a REST error: on /v1/* OpenAI's `code` (the reason in lower case), on
    ferry's own API the ErrorInfo reason."""
    body = response.json()
    if "error" in body:
        return response.status_code, str(body["error"]["code"]).upper()
    info = next(d for d in body.get("details", []) if d["@type"].endswith("ErrorInfo"))
    return response.status_code, info["reason"]


def grpc_reason(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), error_details(err.value)["ErrorInfo"].reason  # type: ignore[attr-defined]


def wait_for(what: str, check: Callable[[], Any], seconds: float = 60.0) -> Any:
    deadline = time.monotonic() + seconds
    while not (result := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.25)
    return result


def test_both_lists_show_only_allowed_models_and_the_alias(
    rest: httpx.Client, registry: RunningStack
) -> None:
    openai_ids = {m["id"]: m for m in rest.get("/v1/models").json()["data"]}
    assert sorted(openai_ids) == [GEMMA, ALIAS, REMOTE]
    # The alias is listed under its own id, owned like its model.
    assert (
        openai_ids[ALIAS]["owned_by"] == openai_ids[GEMMA]["owned_by"]
        and openai_ids[REMOTE]["owned_by"] == "lab"
    )

    models = {m["model_id"]: m for m in rest.get("/api/v1/models").json()["models"]}
    assert sorted(models) == [GEMMA, REMOTE]
    gemma, remote = models[GEMMA], models[REMOTE]
    assert gemma["aliases"] == [ALIAS] and gemma["state"] == "STATE_READY"
    assert gemma["provider"] == "PROVIDER_TRITON" and gemma["family"] and gemma["quantization"]
    assert "completion" in gemma["capabilities"]
    assert (remote["provider"], remote["state"], remote["backend"]) == (
        "PROVIDER_UPSTREAM",
        "STATE_READY",
        "openai-upstream",
    )

    grpc_models = models_pb2_grpc.ModelsServiceStub(registry.channel())
    listed = grpc_models.ListModels(models_pb2.ListModelsRequest(), timeout=10)
    assert [m.model_id for m in listed.models] == [GEMMA, REMOTE]
    grpc_openai = openai_pb2_grpc.OpenAIServiceStub(registry.channel())
    data = grpc_openai.ListModels(openai_pb2.ListModelsRequest(), timeout=10).data
    assert [m.id for m in data] == [GEMMA, ALIAS, REMOTE]


@pytest.mark.parametrize("name", ABSENT)
def test_a_hidden_model_is_refused_everywhere_like_one_that_does_not_exist(
    rest: httpx.Client, registry: RunningStack, sdk: openai.OpenAI, name: str
) -> None:
    not_found = (404, "MODEL_NOT_FOUND")
    assert reason(rest.get(f"/v1/models/{name}")) == not_found
    assert reason(rest.get(f"/api/v1/models/{name}")) == not_found
    chat = {"model": name, "messages": HI, "max_tokens": 2}
    assert reason(rest.post("/v1/chat/completions", json=chat)) == not_found
    assert (
        reason(rest.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 2}))
        == not_found
    )
    assert reason(rest.post("/v1/chat/completions", json={**chat, "stream": True})) == not_found
    assert reason(rest.post(f"/api/v1/models/{name}:generate", json={"prompt": "x"})) == not_found
    # Load and unload too: the hidden model loaded in Triton stays loaded and hidden.
    assert reason(rest.post(f"/api/v1/models/{name}:load", json={})) == not_found
    assert reason(rest.post(f"/api/v1/models/{name}:unload", json={})) == not_found
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model=name, messages=HI, max_tokens=2)

    grpc_not_found = (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    native = inference_pb2_grpc.InferenceServiceStub(registry.channel())
    request = inference_pb2.GenerateRequest(model=f"models/{name}", prompt="x")
    assert grpc_reason(lambda: native.Generate(request, timeout=30)) == grpc_not_found
    grpc_openai = openai_pb2_grpc.OpenAIServiceStub(registry.channel())
    message = openai_pb2.ChatCompletionMessage(role="user", content=struct_pb2.Value(string_value="hi"))
    create = openai_pb2.CreateChatCompletionRequest(model=name, messages=[message], max_tokens=2)
    assert grpc_reason(lambda: grpc_openai.CreateChatCompletion(create, timeout=30)) == grpc_not_found
    grpc_models = models_pb2_grpc.ModelsServiceStub(registry.channel())
    get = models_pb2.GetModelRequest(name=f"models/{name}")
    assert grpc_reason(lambda: grpc_models.GetModel(get, timeout=10)) == grpc_not_found


def test_the_alias_is_served_by_its_model_and_recorded_as_it(
    rest: httpx.Client, registry: RunningStack, sdk: openai.OpenAI
) -> None:
    asked = sdk.chat.completions.create(
        model=ALIAS,
        messages=HI,
        max_tokens=6,
        temperature=0,
    )
    direct = sdk.chat.completions.create(
        model=GEMMA,
        messages=HI,
        max_tokens=6,
        temperature=0,
    )
    # Answered as the model (as OpenAI answers `gpt-4o` with the snapshot it stands for), and the same
    # model: greedy decoding of the same conversation gives the same text.
    assert asked.model == GEMMA and asked.choices[0].message.content == direct.choices[0].message.content
    chunks = list(sdk.completions.create(model=ALIAS, prompt="The sea is", max_tokens=3, stream=True))
    assert chunks and {c.model for c in chunks} == {GEMMA}

    retrieved = sdk.models.retrieve(ALIAS)
    assert (retrieved.id, retrieved.owned_by) == (ALIAS, sdk.models.retrieve(GEMMA).owned_by)
    assert rest.get(f"/api/v1/models/{ALIAS}").json()["name"] == f"models/{GEMMA}"

    rid = "registry-alias-native"
    native = rest.post(
        f"/api/v1/models/{ALIAS}:generate",
        json={"prompt": "The sea is", "sampling": {"max_tokens": 2}},
        headers={"x-request-id": rid},
    )
    assert native.status_code == 200, native.text
    assert native.json()["model"] == f"models/{GEMMA}"
    stub = inference_pb2_grpc.InferenceServiceStub(registry.channel())
    reply = stub.Generate(
        inference_pb2.GenerateRequest(
            model=f"models/{ALIAS}", prompt="The sea is", sampling=inference_pb2.SamplingParams(max_tokens=2)
        ),
        timeout=60,
    )
    assert reply.model == f"models/{GEMMA}" and reply.usage.completion_tokens > 0

    def record() -> dict[str, Any] | None:
        found = rest.get(f"/api/v1/transactions/{rid}")
        body: dict[str, Any] = found.json()
        return body if found.status_code == 200 and body.get("status") == "STATUS_SUCCEEDED" else None

    transaction = wait_for("the alias request's transaction record", record)
    assert transaction["model"] == GEMMA and transaction["parameters"]["model_alias"] == ALIAS


def test_an_upstream_model_cannot_be_loaded_or_unloaded(rest: httpx.Client, registry: RunningStack) -> None:
    got = rest.get(f"/api/v1/models/{REMOTE}").json()
    assert (got["provider"], got["state"]) == ("PROVIDER_UPSTREAM", "STATE_READY")
    refused = rest.post(f"/api/v1/models/{REMOTE}:load", json={})
    assert reason(refused) == (400, "MODEL_NOT_MANAGED") and "upstream" in refused.json()["message"]
    grpc_models = models_pb2_grpc.ModelsServiceStub(registry.channel())
    unload = models_pb2.UnloadModelRequest(name=f"models/{REMOTE}")
    assert grpc_reason(lambda: grpc_models.UnloadModel(unload, timeout=10)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "MODEL_NOT_MANAGED",
    )


def test_unloading_a_model_loaded_at_start_is_audited_and_makes_the_stack_unready(
    rest: httpx.Client, registry: RunningStack
) -> None:
    # Last in the module: it unloads Gemma (through its alias) and loads it again.
    reader = registry.create_key(["read", "inference"])
    with registry.http(reader) as not_admin:
        assert not_admin.post(f"/api/v1/models/{GEMMA}:unload", json={}).status_code == 403
    unload_id, load_id = "registry-unload", "registry-load"
    unloaded = rest.post(
        f"/api/v1/models/{ALIAS}:unload", json={}, headers={"x-request-id": unload_id}, timeout=120
    )
    assert unloaded.status_code == 200, unloaded.text
    assert unloaded.json()["state"] != "STATE_READY"
    # Readiness covers every model of triton.load_models, not only the default one.
    wait_for("/readyz to turn 503", lambda: rest.get("/readyz").status_code == 503, 30)
    assert GEMMA not in {m["id"] for m in rest.get("/v1/models").json()["data"]}
    assert ALIAS not in {m["id"] for m in rest.get("/v1/models").json()["data"]}

    loaded = rest.post(
        f"/api/v1/models/{GEMMA}:load", json={}, headers={"x-request-id": load_id}, timeout=180
    )
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["state"] == "STATE_READY" and loaded.json()["aliases"] == [ALIAS]
    wait_for("/readyz to turn 200", lambda: rest.get("/readyz").status_code == 200, 60)

    def audited() -> dict[str, dict[str, Any]] | None:
        events = []
        for rid in (unload_id, load_id):
            query = {"filter": f'kind = RPC AND request_id = "{rid}"'}
            events += rest.get("/api/v1/audit/events", params=query).json().get("events", [])
        by_method = {e["method"]: e for e in events}
        return by_method if len(by_method) == 2 else None

    events = wait_for("the unload and load to be audited", audited)
    assert events["UnloadModel"]["resource"] == f"models/{ALIAS}"
    assert events["LoadModel"]["resource"] == f"models/{GEMMA}"
    assert {e["principal"] for e in events.values()} == {registry.admin_principal}
    assert {e["code"] for e in events.values()} == {"OK"}
