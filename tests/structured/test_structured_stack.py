"""Structured output, grammars and logit_bias on the real stack, with the clients people use: the
OpenAI SDK (`parse`, its stream helper), LangChain's `with_structured_output`, instructor, plain REST
and native gRPC, on both models (gemma-3-270m, a base model; smollm2-135m-instruct, instruction-tuned).

Generations are short: the shapes bound their strings and arrays, as a user of a small model would.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import httpx
import instructor
import jsonschema
import openai
import pytest
from ferry.inference.v1 import inference_pb2, inference_pb2_grpc
from instructor.core import InstructorRetryException
from langchain_openai import ChatOpenAI
from openai.lib._pydantic import to_strict_json_schema
from openai.types.chat import ChatCompletionMessageParam
from pydantic import BaseModel

from tests.stack import RunningStack
from tests.structured.conftest import GEMMA, MODELS, SMOLLM2
from tests.structured.shapes import SHAPES, Order, Person, Verdict

pytestmark = pytest.mark.stack

# Enough for every shape's longest answer (bounded strings, even one token per character).
MAX_TOKENS = 300
SEEDS_AT_TEMPERATURE_1 = (1, 2)
ENGINE_SLOTS = 4
YES_NO_GBNF = 'root ::= ("yes" | "no")'
YES_NO_LARK = 'start: "yes" | "no"'
FISH: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Can fish swim?"}]
OK: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": 'Reply with the JSON object {"ok": true}.'}
]
# A token id of each model's vocabulary (its text is learnt by forcing it: it comes back in the logprobs),
# and a prompt after which that token is the model's own first choice at temperature 0 (checked).
TOKEN_ID = {GEMMA: 5000, SMOLLM2: 29}
CHOSEN_AFTER = {GEMMA: "player" * 8, SMOLLM2: " the" * 8}


def json_schema_format(shape: type[BaseModel]) -> dict[str, Any]:
    """`response_format` as the SDK writes it for a Pydantic model."""
    schema = to_strict_json_schema(shape)
    return {"type": "json_schema", "json_schema": {"name": shape.__name__, "schema": schema, "strict": True}}


# (model, shape, temperature, seed): every shape once at temperature 0 and with a few seeds at 1.
Run = tuple[str, type[BaseModel], float, int | None]
PARSE_RUNS: list[Run] = [
    (model, shape, temperature, seed)
    for model in MODELS
    for shape in SHAPES
    for temperature, seed in [(0.0, None), *((1.0, s) for s in SEEDS_AT_TEMPERATURE_1)]
]


async def test_sdk_parse_returns_an_object_for_every_shape_every_time(aclient: openai.AsyncOpenAI) -> None:
    # As many at once as each model has engine slots (4): more would only wait in ferry's queue.
    slots = {model: asyncio.Semaphore(ENGINE_SLOTS) for model in MODELS}

    async def parse(model: str, shape: type[BaseModel], temperature: float, seed: int | None) -> Any:
        async with slots[model]:
            reply = await aclient.chat.completions.parse(
                model=model,
                messages=[{"role": "user", "content": SHAPES[shape]}],
                response_format=shape,
                temperature=temperature,
                seed=seed,
                max_completion_tokens=MAX_TOKENS,
            )
        (choice,) = reply.choices
        assert choice.finish_reason == "stop"
        return choice.message.parsed

    # Both models at once (each has its own engine slots). A failure to parse raises
    # (LengthFinishReasonError, ValidationError): none may.
    answers = await asyncio.gather(*(parse(*run) for run in PARSE_RUNS))
    for (model, shape, temperature, seed), parsed in zip(PARSE_RUNS, answers, strict=True):
        assert isinstance(parsed, shape), (model, shape.__name__, temperature, seed)
    for model in MODELS:
        for temperature in (0.0, 1.0):
            tried = [run for run in PARSE_RUNS if run[0] == model and run[2] == temperature]
            print(f"{model} at temperature {temperature:g}: {len(tried)}/{len(tried)} parsed")


@pytest.mark.parametrize("model", MODELS)
def test_the_sdks_stream_helper_parses_a_streamed_answer(client: openai.OpenAI, model: str) -> None:
    with client.chat.completions.stream(
        model=model,
        messages=[{"role": "user", "content": SHAPES[Order]}],
        response_format=Order,
        temperature=0,
        max_completion_tokens=MAX_TOKENS,
    ) as stream:
        deltas = [event for event in stream if event.type == "content.delta"]
        final = stream.get_final_completion()
    assert len(deltas) > 1
    assert isinstance(final.choices[0].message.parsed, Order)


@pytest.mark.parametrize("model", MODELS)
def test_langchain_with_structured_output_json_schema(stack: RunningStack, model: str) -> None:
    llm = ChatOpenAI(
        model=model,
        base_url=f"{stack.rest}/v1",
        api_key=stack.admin_key,  # type: ignore[arg-type]
        temperature=0,
        max_completion_tokens=MAX_TOKENS,
        max_retries=0,
    )
    answer = llm.with_structured_output(Person, method="json_schema").invoke(SHAPES[Person])
    assert isinstance(answer, Person)


def instructed(client: openai.OpenAI, model: str, mode: instructor.Mode, retries: int) -> Person:
    structured = instructor.from_openai(client, mode=mode)
    answer: Person = structured.chat.completions.create(
        model=model,
        response_model=Person,
        messages=[{"role": "user", "content": SHAPES[Person]}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        max_retries=retries,
    )
    return answer


@pytest.mark.parametrize("model", MODELS)
def test_instructor_json_schema_mode(client: openai.OpenAI, model: str) -> None:
    # instructor sends Pydantic's own schema (no additionalProperties, no strict): ferry's engine still
    # writes only the named properties.
    assert isinstance(instructed(client, model, instructor.Mode.JSON_SCHEMA, retries=0), Person)


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(
            GEMMA,
            marks=pytest.mark.xfail(
                reason="gemma-3-270m is a base model: in instructor's JSON mode (the schema in the prompt,"
                " response_format json_object) it answers with a JSON object that echoes the schema"
                ' ({"$ref": "#/$defs/Person"}) instead of an instance, so validation fails',
                raises=InstructorRetryException,
                strict=False,
            ),
        ),
        SMOLLM2,
    ],
)
def test_instructor_json_mode(client: openai.OpenAI, model: str) -> None:
    assert isinstance(instructed(client, model, instructor.Mode.JSON, retries=1), Person)


@pytest.mark.parametrize("model", MODELS)
def test_completions_follow_a_json_schema_too(rest: httpx.Client, model: str) -> None:
    body = {
        "model": model,
        "prompt": "Is the sky blue? Answer in JSON.\n",
        "response_format": json_schema_format(Verdict),
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    choice = rest.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    Verdict.model_validate_json(choice["text"])


def test_a_json_object_answer_parses(client: openai.OpenAI) -> None:
    # The instruction-tuned model: the base model writes a long free-form object for any request.
    whole = client.chat.completions.create(
        model=SMOLLM2,
        messages=OK,
        response_format={"type": "json_object"},
        max_tokens=MAX_TOKENS,
        temperature=0,
    ).choices[0]
    assert whole.finish_reason == "stop"
    assert isinstance(json.loads(whole.message.content or ""), dict)


@pytest.mark.parametrize("model", MODELS)
def test_a_cut_short_json_answer_comes_back_as_it_is(client: openai.OpenAI, model: str) -> None:
    cut = client.chat.completions.create(
        model=model, messages=OK, response_format={"type": "json_object"}, max_tokens=3, temperature=0
    ).choices[0]
    # As OpenAI does: the truncated text, finish_reason "length", no error.
    assert cut.finish_reason == "length" and (cut.message.content or "").startswith("{")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("grammar", [{"gbnf": YES_NO_GBNF}, {"lark": YES_NO_LARK}], ids=["gbnf", "lark"])
def test_an_inline_grammar_constrains_chat_and_completions(
    rest: httpx.Client, model: str, grammar: dict[str, str]
) -> None:
    for seed in (1, 2, 3):
        chat = {"model": model, "messages": FISH, "grammar": grammar, "temperature": 1, "seed": seed}
        choice = rest.post("/v1/chat/completions", json={**chat, "max_tokens": 8}).json()["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) in (("yes", "stop"), ("no", "stop"))
    completion = {"model": model, "prompt": "Q: Can fish swim?\nA: ", "grammar": grammar, "max_tokens": 8}
    choice = rest.post("/v1/completions", json=completion).json()["choices"][0]
    assert choice["text"] in ("yes", "no")


@pytest.mark.parametrize(
    ("grammar", "param", "engine_says"),
    [
        ({"gbnf": 'root ::= ("yes" | "no"'}, "grammar.gbnf", "failed to parse grammar"),
        ({"lark": "start: missing_rule"}, "grammar.lark", "missing_rule"),
    ],
)
def test_a_broken_grammar_is_a_bad_request_with_the_engines_message(
    client: openai.OpenAI, grammar: dict[str, str], param: str, engine_says: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=SMOLLM2, messages=FISH, max_tokens=4, extra_body={"grammar": grammar}
        )
    assert err.value.param == param
    assert engine_says in err.value.message


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"grammar": {"gbnf": YES_NO_GBNF}, "response_format": {"type": "json_object"}}, "grammar"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"logit_bias": {"hello": 1}}, "logit_bias.hello"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"store": True}, "store"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"service_tier": "flex"}, "service_tier"),
    ],
)
def test_refusals_reach_the_sdk_naming_the_field(
    client: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=SMOLLM2, messages=FISH, max_tokens=4, extra_body=extra)
    assert err.value.param == param, err.value.message
    if param == "grammar":
        assert "response_format" in err.value.message


def test_a_schema_keyword_ferry_cannot_enforce_is_named(client: openai.OpenAI) -> None:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"a": {"type": "string", "not": {"const": "x"}}},
    }
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=SMOLLM2,
            messages=FISH,
            max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
        )
    assert (err.value.param or "").startswith("response_format.json_schema.schema")
    assert "not" in err.value.message


def test_no_op_values_and_hints_are_accepted(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=SMOLLM2,
        messages=FISH,
        max_tokens=2,
        store=False,
        modalities=["text"],
        service_tier="auto",
        prompt_cache_key="session-42",
        safety_identifier="user-hash",
    )
    assert reply.choices[0].message.content


def first_tokens(
    rest: httpx.Client, model: str, prompt: str, bias: dict[str, float] | None = None
) -> list[str]:
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": 3,
        "temperature": 0,
        "logprobs": 0,
    }
    if bias is not None:
        body["logit_bias"] = bias
    answer = rest.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    tokens: list[str] = answer.json()["choices"][0]["logprobs"]["tokens"]
    return tokens


@pytest.mark.parametrize("model", MODELS)
def test_logit_bias_100_forces_a_token_and_minus_100_bans_it(rest: httpx.Client, model: str) -> None:
    token_id = str(TOKEN_ID[model])
    forced = first_tokens(rest, model, "The weather today", {token_id: 100})
    token = forced[0]
    assert forced == [token] * 3
    # Unbiased, the model picks the token first after this prompt ...
    assert first_tokens(rest, model, CHOSEN_AFTER[model])[0] == token
    # ... and banned, it never does.
    assert token not in first_tokens(rest, model, CHOSEN_AFTER[model], {token_id: -100})


def schema_constraint(shape: type[BaseModel]) -> inference_pb2.OutputConstraint:
    constraint = inference_pb2.OutputConstraint()
    constraint.json_schema.schema.update(to_strict_json_schema(shape))
    return constraint


@pytest.mark.parametrize("model", MODELS)
def test_native_constraints_over_grpc(native: inference_pb2_grpc.InferenceServiceStub, model: str) -> None:
    unary = native.Generate(
        inference_pb2.GenerateRequest(
            model=f"models/{model}",
            prompt="Is the sky blue? Answer in JSON.\n",
            sampling=inference_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
            constraint=schema_constraint(Verdict),
        )
    )
    assert unary.finish_reason == inference_pb2.FINISH_REASON_STOP
    Verdict.model_validate_json(unary.text)
    streamed = native.GenerateStream(
        inference_pb2.GenerateRequest(
            model=f"models/{model}",
            prompt="Q: Can fish swim?\nA: ",
            sampling=inference_pb2.SamplingParams(max_tokens=8),
            constraint=inference_pb2.OutputConstraint(gbnf=YES_NO_GBNF),
        )
    )
    assert "".join(piece.text for piece in streamed) in ("yes", "no")
    forced = native.Generate(
        inference_pb2.GenerateRequest(
            model=f"models/{model}",
            prompt="Once upon a time",
            sampling=inference_pb2.SamplingParams(max_tokens=2, logit_bias={TOKEN_ID[model]: 100.0}),
        )
    )
    assert forced.text and forced.text == forced.text[: len(forced.text) // 2] * 2


def test_native_refusals_name_the_field(native: inference_pb2_grpc.InferenceServiceStub) -> None:
    broken = inference_pb2.GenerateRequest(
        model=f"models/{SMOLLM2}", prompt="x", constraint=inference_pb2.OutputConstraint(gbnf="root ::= (")
    )
    with pytest.raises(grpc.RpcError) as err:
        native.Generate(broken)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("constraint.gbnf: ")


@pytest.mark.parametrize("model", MODELS)
def test_native_constraints_over_rest(rest: httpx.Client, model: str) -> None:
    body = {
        "prompt": "Is the sky blue? Answer in JSON.\n",
        "sampling": {"max_tokens": MAX_TOKENS, "temperature": 1, "seed": 7},
        "constraint": {"json_schema": {"schema": to_strict_json_schema(Verdict)}},
    }
    answer = rest.post(f"/api/v1/models/{model}:generate", json=body).json()
    assert answer["finish_reason"] == "FINISH_REASON_STOP"
    Verdict.model_validate_json(answer["text"])
    lark = {
        "prompt": "Q: Can fish swim?\nA: ",
        "sampling": {"max_tokens": 8},
        "constraint": {"lark": YES_NO_LARK},
    }
    assert rest.post(f"/api/v1/models/{model}:generate", json=lark).json()["text"] in ("yes", "no")
    bad = {"prompt": "x", "constraint": {"json_schema": {"schema": {"type": "object", "if": {}}}}}
    refused = rest.post(f"/api/v1/models/{model}:generate", json=bad)
    assert refused.status_code == 400
    fields = [
        v["field"] for d in refused.json()["details"] for v in d.get("field_violations", ()) if "field" in v
    ]
    assert fields and fields[0].startswith("constraint.json_schema.schema")


def test_an_answer_always_validates_against_the_callers_schema(rest: httpx.Client) -> None:
    # Numbers without multipleOf (ferry bounds their decimals for the engine) and objects without
    # additionalProperties (ferry asks for none): the answer still validates against the schema as sent.
    schema = {
        "type": "object",
        "properties": {
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "label": {"enum": ["a", "b"]},
        },
        "required": ["score", "label"],
    }
    body = {
        "model": GEMMA,
        "messages": [{"role": "user", "content": "Score this."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "score", "schema": schema}},
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    choice = rest.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)
