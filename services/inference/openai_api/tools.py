"""OpenAI tool calling on the wire: `tools`, `tool_choice`, `parallel_tool_calls` and the history's
tool turns in; `message.tool_calls` and streamed `delta.tool_calls` out.

How a model is asked for calls and how its answer is read is `services.inference.tool_calls`; this
module only translates between that and OpenAI's shapes (docs/tools.md).
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from collections.abc import Sequence

from ferry.openai.v1 import openai_pb2
from google.protobuf import struct_pb2

from backends.llamacpp.contract import ConstraintKind, OutputConstraint
from services.common.errors import invalid_argument
from services.inference.domain import FunctionTool, Message, ToolCall, ToolChoice, ToolUse
from services.inference.json_schema import check_schema
from services.inference.structured import Constraint, engine_schema, json_value
from services.inference.tool_calls import (
    NO_PARAMETERS,
    CallEvent,
    CallScanner,
    auto_calls,
    forced_schema,
    lists_calls,
    may_be_calls,
)

# OpenAI's rules for function names and the number of tools.
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128
CHOICES = {c.value: c for c in (ToolChoice.NONE, ToolChoice.AUTO, ToolChoice.REQUIRED)}
CHOICE_RULE = '\'none\', \'auto\', \'required\' or {"type": "function", "function": {"name": ...}}'


# -- the request ----------------------------------------------------------------------------------


def _function_tool(tool: openai_pb2.Tool, i: int) -> FunctionTool:
    where = f"tools[{i}]"
    if tool.type != "function":
        got = f", got '{tool.type}'" if tool.type else ""
        raise invalid_argument(f"{where}.type", f"must be 'function'{got}")
    if not tool.HasField("function"):
        raise invalid_argument(f"{where}.function", "is required")
    function = tool.function
    if not function.name:
        raise invalid_argument(f"{where}.function.name", "is required")
    if not FUNCTION_NAME.match(function.name):
        raise invalid_argument(f"{where}.function.name", "must be 1-64 characters of a-z, A-Z, 0-9, _ and -")
    parameters = NO_PARAMETERS
    if function.HasField("parameters"):
        parameters = json_value(function.parameters)
        field = f"{where}.function.parameters"
        if parameters.get("type") != "object":
            raise invalid_argument(
                f"{field}.type", "must be 'object': a function's arguments are a JSON object"
            )
        check_schema(parameters, field)
    return FunctionTool(function.name, function.description, parameters)


def _choice(value: struct_pb2.Value, names: Sequence[str]) -> tuple[ToolChoice, str]:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        if value.string_value not in CHOICES:
            raise invalid_argument("tool_choice", f"must be {CHOICE_RULE}, got '{value.string_value}'")
        return CHOICES[value.string_value], ""
    if kind != "struct_value":
        raise invalid_argument("tool_choice", f"must be {CHOICE_RULE}")
    fields = value.struct_value.fields
    if "type" not in fields or fields["type"].string_value != "function":
        raise invalid_argument("tool_choice.type", "must be 'function'")
    function = fields["function"].struct_value.fields if "function" in fields else {}
    name = function["name"].string_value if "name" in function else ""
    if not name:
        raise invalid_argument("tool_choice.function.name", "is required")
    if not names:
        raise invalid_argument("tool_choice", f"names the function '{name}', and no tools were sent")
    if name not in names:
        raise invalid_argument(
            "tool_choice.function.name", f"'{name}' is not a function in tools (they are: {', '.join(names)})"
        )
    return ToolChoice.FUNCTION, name


def tool_use(request: openai_pb2.CreateChatCompletionRequest) -> ToolUse | None:
    """`tools`, `tool_choice` and `parallel_tool_calls`; None when no tools were sent (and no choice
    that needs them). Every tool is checked, even when `tool_choice` is `none`."""
    if len(request.tools) > MAX_TOOLS:
        raise invalid_argument("tools", f"at most {MAX_TOOLS} tools are allowed, got {len(request.tools)}")
    tools = [_function_tool(tool, i) for i, tool in enumerate(request.tools)]
    names = [t.name for t in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise invalid_argument(f"tools[{i}].function.name", f"'{name}' is defined twice")
    choice, function = ToolChoice.AUTO if tools else ToolChoice.NONE, ""
    given = request.tool_choice if request.HasField("tool_choice") else None
    if given is not None and given.WhichOneof("kind") not in (None, "null_value"):
        choice, function = _choice(given, names)
    if not tools:
        if choice in (ToolChoice.REQUIRED, ToolChoice.FUNCTION):
            raise invalid_argument(
                "tool_choice", f"'{function or choice.value}' needs tools, and none were sent"
            )
        return None
    parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True
    return ToolUse(tuple(tools), choice, function, parallel)


def with_forced_call(constraint: Constraint, use: ToolUse | None) -> Constraint:
    """The output constraint: a required call's (engine errors about it name `tools`) when the request
    requires one, else the request's own. `response_format` governs text answers, and a forced answer
    has none, so the call wins; a `grammar` cannot be combined with a forced call."""
    if use is None or not use.forced:
        return constraint
    if constraint.field and not constraint.field.startswith("response_format"):
        raise invalid_argument(
            constraint.field.split(".")[0],
            f"cannot be combined with tool_choice '{use.function or use.choice.value}' "
            "(both constrain the output)",
        )
    # The engine gets what structured output gives it (compact JSON, bounded decimals, closed objects).
    schema = engine_schema(forced_schema(use))
    # Each tool's parameters were checked; this checks them put together (hoisted $defs and all).
    check_schema(schema, "tools")
    return Constraint(OutputConstraint(kind=ConstraintKind.JSON_SCHEMA, json_schema=schema), field="tools")


def with_tool_turns(
    messages: Sequence[Message], sent: Sequence[openai_pb2.ChatCompletionMessage]
) -> tuple[Message, ...]:
    """The parsed messages with their assistant `tool_calls` and `tool` turns' `tool_call_id`."""
    out: list[Message] = []
    for i, (message, wire) in enumerate(zip(messages, sent, strict=True)):
        where = f"messages[{i}]"
        if wire.tool_calls and message.role != "assistant":
            raise invalid_argument(f"{where}.tool_calls", "only assistant messages carry tool calls")
        calls = tuple(_tool_call(call, f"{where}.tool_calls[{j}]") for j, call in enumerate(wire.tool_calls))
        if message.role == "tool" and not wire.tool_call_id:
            raise invalid_argument(f"{where}.tool_call_id", "is required in a tool message")
        call_id = wire.tool_call_id if message.role == "tool" else ""
        out.append(dataclasses.replace(message, tool_calls=calls, tool_call_id=call_id))
    return tuple(out)


def _tool_call(call: openai_pb2.ToolCall, where: str) -> ToolCall:
    if not call.id:
        raise invalid_argument(f"{where}.id", "is required")
    if call.type not in ("", "function"):
        raise invalid_argument(f"{where}.type", f"must be 'function', got '{call.type}'")
    if not call.function.name:
        raise invalid_argument(f"{where}.function.name", "is required")
    return ToolCall(call.id, call.function.name, call.function.arguments)


# -- the answer -----------------------------------------------------------------------------------


def new_call_id() -> str:
    """`call_` and 24 random characters, as OpenAI's ids look."""
    return "call_" + secrets.token_hex(12)


def answer(use: ToolUse | None, text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole answer -> (content, tool calls): calls (and no content) when the model made some, else
    the text. A forced answer cut short by max_tokens keeps the calls whose names were complete, their
    arguments as far as they got (as OpenAI's are then)."""
    if use is None or not use.offered:
        return text, []
    if use.forced:
        scanner = CallScanner(lists_calls(use))
        scanner.feed(text)
        calls = scanner.named_calls()
    else:
        calls = auto_calls(text, use) or []
    if not calls:
        return text, []
    return None, [ToolCall(new_call_id(), name, arguments) for name, arguments in calls]


def tool_call_message(call: ToolCall) -> openai_pb2.ToolCall:
    return openai_pb2.ToolCall(
        id=call.id,
        type="function",
        function=openai_pb2.FunctionCall(name=call.name, arguments=call.arguments),
    )


class ToolCallDeltas:
    """The tool-call side of one chat stream, as OpenAI streams it: a call's first delta has its
    `index`, `id`, `type` and `function.name`; later deltas append to `function.arguments`.

    Forced calls stream as they are generated. Under `auto`, text that starts like JSON is held back
    to the end (it may be calls); any other text streams as content at once."""

    def __init__(self, use: ToolUse | None) -> None:
        self.use = use
        self.offered = use is not None and use.offered
        self._scanner = CallScanner(lists_calls(use)) if use is not None and use.forced else None
        self._ids: list[str] = []
        # Under auto: the text held while it may still be calls (None once it is known to be text).
        self._held: list[str] | None = [] if self.offered and self._scanner is None else None

    @property
    def made_calls(self) -> bool:
        return bool(self._ids)

    def piece(self, text: str) -> openai_pb2.ChunkDelta | None:
        """The delta for a piece of generated text; None when there is nothing to send yet."""
        if self._scanner is not None:
            return self._calls_delta(self._scanner.feed(text))
        if self._held is None:
            return openai_pb2.ChunkDelta(content=text) if text else None
        self._held.append(text)
        so_far = "".join(self._held)
        if may_be_calls(so_far):
            return None
        self._held = None
        return openai_pb2.ChunkDelta(content=so_far)

    def finish(self) -> openai_pb2.ChunkDelta:
        """The last delta: under auto, what was held back, as calls or as content."""
        if self._held is None or self.use is None:
            return openai_pb2.ChunkDelta()
        text, self._held = "".join(self._held), None
        calls = auto_calls(text, self.use)
        if calls is None:
            return openai_pb2.ChunkDelta(content=text) if text else openai_pb2.ChunkDelta()
        events = [CallEvent(i, name, arguments) for i, (name, arguments) in enumerate(calls)]
        return self._calls_delta(events) or openai_pb2.ChunkDelta()

    def _calls_delta(self, events: list[CallEvent]) -> openai_pb2.ChunkDelta | None:
        if not events:
            return None
        deltas = []
        for event in events:
            if event.name is not None:
                self._ids.append(new_call_id())
                deltas.append(
                    openai_pb2.ToolCallDelta(
                        index=event.index,
                        id=self._ids[event.index],
                        type="function",
                        function=openai_pb2.FunctionCallDelta(name=event.name, arguments=event.arguments),
                    )
                )
            else:
                deltas.append(
                    openai_pb2.ToolCallDelta(
                        index=event.index, function=openai_pb2.FunctionCallDelta(arguments=event.arguments)
                    )
                )
        return openai_pb2.ChunkDelta(tool_calls=deltas)
