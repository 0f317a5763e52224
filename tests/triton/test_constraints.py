"""Constrained generation in the llamacpp backend, on both models in one private Triton: JSON, JSON
Schema, GBNF and Lark constraints hold; one the engine cannot compile is refused (llama.cpp alone
would run a broken llguidance grammar unconstrained); logit_bias bans and forces tokens and refuses
ids outside the vocabulary (which llama.cpp alone ignores)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest
from tritonclient.grpc import aio as triton_aio

from backends.llamacpp.contract import ConstraintKind, EngineErrorCode, OutputConstraint
from launcher.ports import free_ports
from services.common.config import TritonSettings
from services.common.constraint_check import check_constraint
from services.common.errors import Reason, RpcError
from tests.triton.conftest import SMOLLM2, TritonServer
from tests.triton.test_gemma_model import MODEL, generate

pytestmark = pytest.mark.stack

CHAT_PROMPT = "<|im_start|>user\nDescribe a person.<|im_end|>\n<|im_start|>assistant\n"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad"]},
    },
    "required": ["name", "age", "mood"],
    "additionalProperties": False,
}


@pytest.fixture
async def client(
    triton: TritonServer, smollm2: TritonServer
) -> AsyncIterator[triton_aio.InferenceServerClient]:
    client = triton_aio.InferenceServerClient(triton.grpc_target)
    yield client
    await client.close()


@pytest.mark.parametrize("model", [MODEL, SMOLLM2])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_a_json_schema_constraint_holds(
    client: triton_aio.InferenceServerClient, model: str, temperature: float
) -> None:
    constraint = {"kind": "json_schema", "json_schema": PERSON}
    params = {"max_tokens": 80, "temperature": temperature, "seed": 7, "constraint": constraint}
    run = await generate(client, CHAT_PROMPT, params, model=model)

    assert run.error is None and run.last.finish_reason == "stop", run.text
    jsonschema.validate(json.loads(run.text), PERSON)


async def test_a_json_object_constraint_gives_an_object(client: triton_aio.InferenceServerClient) -> None:
    params = {"max_tokens": 60, "temperature": 0.0, "constraint": {"kind": "json_object"}}
    run = await generate(client, "Here is some JSON:", params)

    assert run.error is None
    if run.last.finish_reason == "stop":
        assert isinstance(json.loads(run.text), dict)
    else:  # cut by max_tokens: still the start of an object
        assert run.text.lstrip().startswith("{")


@pytest.mark.parametrize(
    "constraint",
    [
        {"kind": "gbnf", "grammar": 'root ::= ("yes" | "no") "."'},
        {"kind": "lark", "grammar": 'start: ("yes" | "no") "."'},
    ],
)
async def test_grammars_constrain_the_text(
    client: triton_aio.InferenceServerClient, constraint: dict[str, Any]
) -> None:
    params = {"max_tokens": 10, "temperature": 1.0, "seed": 3, "constraint": constraint}
    run = await generate(client, CHAT_PROMPT, params, model=SMOLLM2)

    assert run.error is None
    assert run.text in ("yes.", "no.")


@pytest.mark.parametrize(
    ("constraint", "says"),
    [
        ({"kind": "json_schema", "json_schema": {"type": "object", "not": {}}}, "not"),
        ({"kind": "json_schema", "json_schema": {"$ref": "#/$defs/Missing"}}, "Missing"),
        ({"kind": "json_schema", "json_schema": {"type": "string", "pattern": "(a|b"}}, "regex"),
        ({"kind": "lark", "grammar": 'start: "a" | ('}, "line 1"),
        ({"kind": "gbnf", "grammar": "root ::= ("}, "grammar"),
    ],
)
async def test_a_constraint_the_engine_cannot_compile_is_refused(
    client: triton_aio.InferenceServerClient, constraint: dict[str, Any], says: str
) -> None:
    run = await generate(client, CHAT_PROMPT, {"max_tokens": 5, "constraint": constraint})

    assert run.pieces == []
    assert run.fault.code is EngineErrorCode.INVALID_PARAMETER
    assert run.fault.field == "constraint"
    assert says in run.fault.message


async def _greedy_first_token(
    client: triton_aio.InferenceServerClient, bias: dict[str, float], prompt: str = "The capital of France is"
) -> str:
    params = {"max_tokens": 1, "temperature": 0.0, "logit_bias": bias}
    run = await generate(client, prompt, params)
    assert run.error is None
    return run.text


async def test_logit_bias_forces_and_bans_tokens(client: triton_aio.InferenceServerClient) -> None:
    # +100 makes a token the answer whatever the prompt.
    first = await _greedy_first_token(client, {"1000": 100})
    second = await _greedy_first_token(client, {"1001": 100})
    assert first != second
    assert await _greedy_first_token(client, {"1000": 100}, prompt="1, 2, 3,") == first
    # Of two forced tokens one wins; banning the winner (-100) leaves the other.
    winner = await _greedy_first_token(client, {"1000": 100, "1001": 100})
    assert winner in (first, second)
    winner_id, other_id = ("1000", "1001") if winner == first else ("1001", "1000")
    other = await _greedy_first_token(client, {winner_id: -100, other_id: 100})
    assert other == (second if winner == first else first)


async def test_logit_bias_outside_the_vocabulary_is_refused(client: triton_aio.InferenceServerClient) -> None:
    run = await generate(client, CHAT_PROMPT, {"max_tokens": 2, "logit_bias": {"262144": 5}})
    assert run.fault.code is EngineErrorCode.INVALID_PARAMETER and run.fault.field == "logit_bias"
    assert "262143" in run.fault.message
    # SmolLM2's vocabulary is smaller: an id Gemma has is outside it.
    run = await generate(client, CHAT_PROMPT, {"max_tokens": 2, "logit_bias": {"50000": 5}}, model=SMOLLM2)
    assert run.fault.field == "logit_bias" and "49151" in run.fault.message


async def test_the_registry_check_asks_the_engine(triton: TritonServer) -> None:
    host, port = triton.grpc_target.rsplit(":", 1)
    settings = TritonSettings(host=host, grpc_port=int(port))
    good = OutputConstraint(kind=ConstraintKind.GBNF, grammar='root ::= "a" | "b"')
    assert await check_constraint(settings, MODEL, good) is None
    broken = OutputConstraint(kind=ConstraintKind.GBNF, grammar="root ::= (")
    assert "failed to parse grammar" in (await check_constraint(settings, MODEL, broken) or "")
    lark = OutputConstraint(kind=ConstraintKind.LARK, grammar='start: "a" | (')
    assert "line 1" in (await check_constraint(settings, MODEL, lark) or "")


async def test_the_registry_check_is_unavailable_without_an_engine() -> None:
    settings = TritonSettings(host="127.0.0.1", grpc_port=free_ports(1)[0])
    good = OutputConstraint(kind=ConstraintKind.GBNF, grammar='root ::= "a"')
    with pytest.raises(RpcError) as err:
        await check_constraint(settings, MODEL, good)
    assert err.value.reason == Reason.ENGINE_UNAVAILABLE
