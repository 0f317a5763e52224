"""Tool calling on the real stack, through Envoy, with the clients people use unmodified: the OpenAI SDK
(create, parse, the stream helper), LangChain and instructor, on both models.

A required or named call is constrained to the function's schema, so whatever a tiny model writes, it is
a call whose arguments validate. Schemas bound their strings so that answers stay short (max_tokens is
bounded too); temperature 0 keeps runs repeatable.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import instructor
import openai
import pytest
from langchain_core.messages import AIMessage
from langchain_openai import ChatOpenAI
from openai.types.chat import (
    ChatCompletionMessageParam,
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionToolParam,
)
from pydantic import BaseModel, Field

from services.inference.json_schema import validate_instance
from tests.stack import RunningStack
from tests.tools.test_tool_parts import BAD_TOOLS

pytestmark = pytest.mark.stack

GEMMA = "gemma-3-270m"
SMOLLM2 = "smollm2-135m-instruct"
MODELS = (GEMMA, SMOLLM2)
MAX_TOKENS = 96
# A parallel answer is a list of up to 8 calls (the schema's bound); a tiny model at temperature 0 may
# write all 8, which 96 tokens cannot hold (seen: finish "length" once in CI): room for the whole list.
PARALLEL_MAX_TOKENS = 384

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TIME_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 24}},
    "required": ["timezone"],
}
WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": WEATHER_PARAMETERS,
    },
}
TIME: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the time in a timezone.",
        "parameters": TIME_PARAMETERS,
    },
}
LANGCHAIN_TOOLS: list[dict[str, Any]] = [dict(WEATHER), dict(TIME)]
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED: ChatCompletionNamedToolChoiceParam = {"type": "function", "function": {"name": "get_weather"}}


class City(BaseModel):
    """A city and where it is."""

    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population_millions: int = Field(ge=0, le=100)
    climate: Literal["hot", "mild", "cold"]


def assert_valid_calls(calls: Any, names: set[str]) -> None:
    assert calls, "no tool calls"
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in names
        assert validate_instance(call.function.arguments, SCHEMAS[call.function.name]) is None


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    ("tool_choice", "parallel"),
    [(NAMED, None), ("required", False), ("required", True)],
    ids=["named", "required-one", "required-parallel"],
)
def test_required_and_named_calls_validate(
    client: openai.OpenAI, model: str, tool_choice: Any, parallel: bool | None
) -> None:
    reply = client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice=tool_choice,
        max_tokens=PARALLEL_MAX_TOKENS if parallel else MAX_TOKENS,
        temperature=0,
        parallel_tool_calls=openai.omit if parallel is None else parallel,
    )
    (choice,) = reply.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert_valid_calls(calls, {"get_weather"} if tool_choice is NAMED else {"get_weather", "get_time"})
    assert calls is not None
    if parallel is not True:
        assert len(calls) == 1
    assert len({c.id for c in calls}) == len(calls)


@pytest.mark.parametrize("model", MODELS)
def test_streamed_call_deltas_reassemble(client: openai.OpenAI, model: str) -> None:
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=ASK,
            tools=[WEATHER, TIME],
            tool_choice=NAMED,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
        )
    )
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    first, rest = deltas[0], deltas[1:]
    # OpenAI's shape: the first delta of a call has its index, id, type and name; later ones arguments.
    assert first.index == 0 and first.id and first.id.startswith("call_") and first.type == "function"
    assert first.function is not None and first.function.name == "get_weather"
    assert all(d.index == 0 and d.id is None and d.function and d.function.name is None for d in rest)
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert validate_instance(arguments, WEATHER_PARAMETERS) is None
    # How many argument deltas arrive depends on the reader's pace: pieces that pile up while it is
    # behind are sent as one (services/inference/coalesce.py); tests/inference/test_coalesce.py shows
    # the first piece is never held back.
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


@pytest.mark.parametrize("model", MODELS)
def test_sdk_stream_helper_reassembles_parsed_calls(client: openai.OpenAI, model: str) -> None:
    with client.chat.completions.stream(
        model=model,
        messages=[{"role": "user", "content": "Describe Lisbon."}],
        tools=[openai.pydantic_function_tool(City)],
        tool_choice={"type": "function", "function": {"name": "City"}},
        max_tokens=MAX_TOKENS,
        temperature=0,
    ) as stream:
        final = stream.get_final_completion()
    (choice,) = final.choices
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "City"
    assert isinstance(call.function.parsed_arguments, City)


@pytest.mark.parametrize("model", MODELS)
def test_history_with_tool_calls_and_results_generates(client: openai.OpenAI, model: str) -> None:
    history: list[ChatCompletionMessageParam] = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"temperature": 21, "sky": "sunny"}'},
    ]
    reply = client.chat.completions.create(
        model=model, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=12, temperature=0
    )
    (choice,) = reply.choices
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert not choice.message.tool_calls


@pytest.mark.parametrize("model", MODELS)
def test_auto_answers_text_or_valid_calls(client: openai.OpenAI, model: str) -> None:
    """What `auto` does with these small models is up to them; whatever it is, it is well formed."""
    reply = client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER], max_tokens=48, temperature=0
    )
    (choice,) = reply.choices
    if choice.finish_reason == "tool_calls":
        assert choice.message.content is None
        assert_valid_calls(choice.message.tool_calls, {"get_weather"})
    else:
        assert choice.message.content and not choice.message.tool_calls


def chat_model(stack: RunningStack, model: str) -> ChatOpenAI:
    return ChatOpenAI(
        model=model,
        base_url=f"{stack.rest}/v1",
        api_key=stack.admin_key,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=MAX_TOKENS,  # type: ignore[call-arg]
        max_retries=0,
    )


@pytest.mark.parametrize("model", MODELS)
def test_langchain_structured_output_by_function_calling(stack: RunningStack, model: str) -> None:
    structured = chat_model(stack, model).with_structured_output(City, method="function_calling")
    city = structured.invoke("Describe Lisbon.")
    assert isinstance(city, City)


def test_langchain_bind_tools(stack: RunningStack) -> None:
    bound = chat_model(stack, SMOLLM2).bind_tools(LANGCHAIN_TOOLS, tool_choice="get_weather")
    message = bound.invoke("What is the weather in Oslo?")
    assert isinstance(message, AIMessage)
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and call["id"] and call["id"].startswith("call_")
    assert validate_instance(json.dumps(call["args"]), WEATHER_PARAMETERS) is None
    required = chat_model(stack, SMOLLM2).bind_tools(LANGCHAIN_TOOLS, tool_choice="any")
    assert isinstance(answer := required.invoke("What time is it in Tokyo?"), AIMessage) and answer.tool_calls


@pytest.mark.parametrize("model", MODELS)
def test_instructor_tools_mode(client: openai.OpenAI, model: str) -> None:
    patched = instructor.from_openai(client, mode=instructor.Mode.TOOLS)
    city = patched.chat.completions.create(
        model=model,
        response_model=City,
        messages=[{"role": "user", "content": "Describe Lisbon."}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        max_retries=1,
    )
    assert isinstance(city, City)


@pytest.mark.parametrize(
    ("body", "field"),
    [*BAD_TOOLS, ({"messages": [*ASK, {"role": "tool", "content": "sunny"}]}, "messages[1].tool_call_id")],
)
def test_bad_tools_are_400_naming_the_field(client: openai.OpenAI, body: dict[str, Any], field: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=SMOLLM2, **{"messages": ASK, "max_tokens": 4, **body})
    err = caught.value
    assert err.status_code == 400
    assert field in err.message or (err.param or "").startswith(field), (err.message, err.param)
