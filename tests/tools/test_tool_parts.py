"""Tool calling, the parts without a model: the request's tools and tool_choice, the forced-call schema,
the prompt for templates without tool support, and reading answers (whole and streamed)."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from ferry.openai.v1 import openai_pb2
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from backends.llamacpp.contract import ConstraintKind
from services.common.config import REPO_ROOT
from services.common.errors import RpcError
from services.common.triton_client import ModelInfo, Provider
from services.inference.domain import GenerationRequest, Message, ToolCall, ToolChoice, ToolUse
from services.inference.json_schema import check_schema, validate_instance
from services.inference.openai_api import tools
from services.inference.openai_api.chat import ChatWire
from services.inference.render import Render
from services.inference.templates import ChatTemplates
from services.inference.tool_calls import CallScanner, auto_calls, forced_schema

USER = [{"role": "user", "content": "Weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
# Pydantic writes nested models as $defs with $refs (instructor sends them so).
PERSON = {
    "type": "function",
    "function": {
        "name": "Person",
        "parameters": {
            "$defs": {
                "Address": {
                    "type": "object",
                    "properties": {"street": {"type": "string", "maxLength": 20}},
                    "required": ["street"],
                }
            },
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 20},
                "address": {"$ref": "#/$defs/Address"},
            },
            "required": ["name", "address"],
        },
    },
}


def chat(**body: Any) -> GenerationRequest:
    request = json_format.ParseDict(
        {"model": "gemma-3-270m", "messages": USER, **body}, openai_pb2.CreateChatCompletionRequest()
    )
    return ChatWire(request, stream=False).parse()


def refusal(**body: Any) -> tuple[str, str]:
    with pytest.raises(RpcError) as caught:
        chat(**body)
    err = caught.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    return err.field_violations[0]


# --- the request -----------------------------------------------------------------------------------


def test_tools_default_to_auto_without_a_constraint() -> None:
    request = chat(tools=[WEATHER])
    assert request.tool_use is not None
    assert request.tool_use.choice is ToolChoice.AUTO and request.tool_use.parallel
    assert request.sampling.constraint is None
    assert request.recorded_parameters()["tools"] == ["get_weather"]


@pytest.mark.parametrize(
    ("choice", "parallel", "shape"),
    [
        ({"type": "function", "function": {"name": "get_weather"}}, True, "object"),
        ("required", False, "object"),
        ("required", True, "array"),
    ],
)
def test_a_required_call_constrains_the_output(choice: Any, parallel: bool, shape: str) -> None:
    request = chat(tools=[WEATHER, PERSON], tool_choice=choice, parallel_tool_calls=parallel)
    constraint = request.sampling.constraint
    assert constraint is not None and constraint.kind is ConstraintKind.JSON_SCHEMA
    assert constraint.json_schema is not None and constraint.json_schema.get("type", "object") == shape
    # An engine refusal of the constraint names the caller's field.
    assert request.spelling.field("constraint") == "tools"


def test_none_offers_nothing_but_still_checks_the_tools() -> None:
    request = chat(tools=[WEATHER], tool_choice="none")
    assert request.tool_use is not None and not request.tool_use.offered
    assert refusal(tools=[{"type": "function", "function": {}}], tool_choice="none")[0] == (
        "tools[0].function.name"
    )


UNENFORCEABLE = {"type": "object", "properties": {"x": {"not": {"type": "string"}}}}
# Refusals of tools and tool_choice: (request fields, the field the 400 names). The stack tests send
# these through Envoy with the OpenAI SDK too.
BAD_TOOLS: list[tuple[dict[str, Any], str]] = [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
        "tools[0].function.parameters.type",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": UNENFORCEABLE}}]},
        "tools[0].function.parameters",
    ),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice.function.name",
    ),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        *BAD_TOOLS,
        (
            {"tools": [WEATHER], "tool_choice": "required", "grammar": {"gbnf": 'root ::= "x"'}},
            "grammar",
        ),
        ({"messages": [*USER, {"role": "tool", "content": "sunny"}]}, "messages[1].tool_call_id"),
        (
            {
                "messages": [
                    {"role": "user", "content": "x", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}
                ]
            },
            "messages[0].tool_calls",
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}
                ]
            },
            "messages[0].tool_calls[0].id",
        ),
    ],
)
def test_bad_tools_are_refused_naming_the_field(body: dict[str, Any], field: str) -> None:
    where, why = refusal(**body)
    assert where.startswith(field), (where, why)
    assert why


def test_an_unsupported_schema_keyword_is_named() -> None:
    parameters = {"type": "object", "properties": {"x": {"type": "string"}}, "if": {"required": ["x"]}}
    where, why = refusal(tools=[{"type": "function", "function": {"name": "f", "parameters": parameters}}])
    assert where.startswith("tools[0].function.parameters") and "if" in why


def test_history_tool_turns_are_parsed() -> None:
    request = chat(
        messages=[
            *USER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        tools=[WEATHER],
    )
    assert request.messages is not None
    assert request.messages[1].tool_calls == (ToolCall("call_1", "get_weather", "{}"),)
    assert (request.messages[2].role, request.messages[2].tool_call_id) == ("tool", "call_1")


# --- the forced-call schema -----------------------------------------------------------------------


def _use(choice: ToolChoice, function: str = "", parallel: bool = True) -> ToolUse:
    parsed = chat(tools=[WEATHER, PERSON]).tool_use
    assert parsed is not None
    return ToolUse(parsed.tools, choice, function, parallel)


@pytest.mark.parametrize(
    ("choice", "function", "parallel", "answer"),
    [
        (
            ToolChoice.FUNCTION,
            "Person",
            True,
            {"name": "Person", "arguments": {"name": "A", "address": {"street": "B"}}},
        ),
        (ToolChoice.REQUIRED, "", False, {"name": "get_weather", "arguments": {"city": "Paris"}}),
        (
            ToolChoice.REQUIRED,
            "",
            True,
            [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}],
        ),
    ],
)
def test_forced_schema_compiles_and_accepts_calls(
    choice: ToolChoice, function: str, parallel: bool, answer: Any
) -> None:
    schema = forced_schema(_use(choice, function, parallel))
    check_schema(schema, "tools")
    assert validate_instance(json.dumps(answer), schema) is None
    # The constraint is closed: no keys beyond the schema's, no other function.
    wrong = {"name": "get_weather", "arguments": {"city": "Paris", "extra": 1}}
    assert validate_instance(json.dumps([wrong] if parallel and function == "" else wrong), schema)


# --- reading answers ------------------------------------------------------------------------------

ANSWER = (
    '[{"name": "get_weather", "arguments": {"city": "Pa\\"ris ]}", "unit": "c"}},\n'
    ' {"arguments": {"name": "Ann", "address": {"street": "Main"}}, "name": "Person"}]'
)


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_scanner_streams_names_then_arguments(size: int) -> None:
    scanner = CallScanner(listed=True)
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for start in range(0, len(ANSWER), size):
        for event in scanner.feed(ANSWER[start : start + size]):
            if event.name is not None:
                assert event.index not in names and event.index not in arguments
                names[event.index] = event.name
            else:
                assert event.index in names  # arguments only after the call's name
            arguments[event.index] = arguments.get(event.index, "") + event.arguments
    assert names == {0: "get_weather", 1: "Person"}
    whole = json.loads(ANSWER)
    assert [json.loads(arguments[i]) for i in (0, 1)] == [c["arguments"] for c in whole]
    assert scanner.named_calls() == [(n, arguments[i]) for i, n in names.items()]


def test_answer_of_a_forced_call_and_one_cut_short() -> None:
    forced = _use(ToolChoice.FUNCTION, "get_weather")
    content, calls = tools.answer(forced, '{"name": "get_weather", "arguments": {"city": "Oslo"}}')
    assert content is None and [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Oslo"}')]
    assert calls[0].id.startswith("call_") and len(calls[0].id) == 29
    content, calls = tools.answer(forced, '{"name": "get_weather", "arguments": {"ci')
    assert content is None and calls[0].arguments == '{"ci'


@pytest.mark.parametrize(
    ("text", "calls"),
    [
        ('{"name": "get_weather", "arguments": {"city": "Rome"}}', [("get_weather", '{"city": "Rome"}')]),
        (
            '```json\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n```',
            [("get_weather", '{"city": "Rome"}')],
        ),
        ('{"name": "get_weather", "arguments": {"town": "Rome"}}', None),  # invalid arguments
        ('{"name": "nope", "arguments": {}}', None),  # unknown function
        ("It is sunny.", None),
        ('Call: {"name": "get_weather", "arguments": {"city": "Rome"}}', None),
    ],
)
def test_auto_takes_only_a_whole_valid_call(text: str, calls: Any) -> None:
    assert auto_calls(text, _use(ToolChoice.AUTO)) == calls


def deltas(use: ToolUse, pieces: list[str]) -> list[openai_pb2.ChunkDelta]:
    stream = tools.ToolCallDeltas(use)
    out = [d for p in pieces if (d := stream.piece(p)) is not None]
    return [*out, stream.finish()]


def test_streamed_auto_text_passes_at_once_and_json_is_held() -> None:
    text = deltas(_use(ToolChoice.AUTO), ["It ", "is ", "sunny"])
    assert [d.content for d in text[:-1]] == ["It ", "is ", "sunny"]
    call = deltas(_use(ToolChoice.AUTO), ['{"name": "get_weather", ', '"arguments": {"city": "Rome"}}'])
    assert len(call) == 1 and call[0].tool_calls[0].function.name == "get_weather"
    assert call[0].tool_calls[0].id.startswith("call_")


# --- the prompt -----------------------------------------------------------------------------------


def repository_template(model: str) -> str:
    config = REPO_ROOT / "triton_models" / model / "config.pbtxt"
    parsed = text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())
    return parsed.parameters["chat_template"].string_value


HISTORY = (
    Message("user", "Weather in Paris and Rome?"),
    Message(
        "assistant",
        "",
        tool_calls=(
            ToolCall("call_1", "get_weather", '{"city": "Paris"}'),
            ToolCall("call_2", "get_weather", '{"city": "Rome"}'),
        ),
    ),
    Message("tool", "sunny", tool_call_id="call_1"),
    Message("tool", "rainy", tool_call_id="call_2"),
)


@pytest.mark.parametrize("model", ["gemma-3-270m", "smollm2-135m-instruct"])
def test_templates_without_tools_get_the_fallback(model: str) -> None:
    prompt = ChatTemplates().render(model, repository_template(model), HISTORY, tools=_use(ToolChoice.AUTO))
    assert "get_weather: The weather in a city." in prompt and '"maxLength": 30' in prompt
    assert '[{"name": "get_weather", "arguments": {"city": "Paris"}}, ' in prompt
    # Both results in one user turn, each naming its function.
    assert "The function get_weather returned: sunny\nThe function get_weather returned: rainy" in prompt


def test_a_template_that_knows_tools_gets_them_as_transformers_passes_them() -> None:
    source = (
        "{% for t in tools or [] %}TOOL {{ t.function.name }}\n{% endfor %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %} CALL {{ c.id }} {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}"
        "{% if m.role == 'tool' %} FOR {{ m.tool_call_id }}{% endif %}\n{% endfor %}"
    )
    prompt = ChatTemplates().render("m", source, HISTORY, tools=_use(ToolChoice.AUTO))
    assert prompt.startswith("TOOL get_weather\nTOOL Person\n")
    assert "CALL call_1 get_weather Paris CALL call_2 get_weather Rome" in prompt
    assert "tool:sunny FOR call_1" in prompt and "You can call" not in prompt


def test_none_renders_no_tools() -> None:
    source = repository_template("smollm2-135m-instruct")
    prompt = ChatTemplates().render("m", source, (Message("user", "Hi"),), tools=_use(ToolChoice.NONE))
    assert "get_weather" not in prompt


# --- upstream models ------------------------------------------------------------------------------

UPSTREAM = ModelInfo(
    name="gpt-up",
    backend="",
    context_length=8192,
    max_tokens=512,
    owned_by="x",
    chat_template="",
    engine_slots=1,
    provider=Provider.UPSTREAM,
)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tools": [WEATHER]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": "required"}, "tools"),
        ({"messages": [*USER, {"role": "tool", "tool_call_id": "c", "content": "x"}]}, "messages[1].role"),
    ],
)
def test_upstream_models_refuse_tools_naming_the_field_and_model(body: dict[str, Any], field: str) -> None:
    with pytest.raises(RpcError) as caught:
        Render(ChatTemplates())(chat(**body), UPSTREAM)
    assert caught.value.field_violations[0][0] == field and "gpt-up" in caught.value.message


def test_upstream_models_take_tools_that_are_not_offered() -> None:
    assert Render(ChatTemplates())(chat(tools=[WEATHER], tool_choice="none"), UPSTREAM) == ""
