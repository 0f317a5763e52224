"""How a model writes a tool call, the same for the prompt, the constraint and the answer.

A call is the JSON object `{"name": "<function>", "arguments": {...}}`; several calls are a JSON list
of them. This module owns that format and nothing about any API's wire:

- `forced_schema`: the JSON Schema the engine constrains the output to when a call is required (one
  call: the object; parallel calls: a non-empty list), built from the tools' parameter schemas;
- `instructions` and `fallback_messages`: for chat templates that know nothing of tools, the tools
  described in a system message, earlier calls written back as that JSON, and tool results as user
  turns (every template accepts user turns);
- `CallScanner`: reads a forced answer as it streams, telling when a call's name is known and handing
  out its arguments' text as it grows;
- `auto_calls`: under `tool_choice: auto`, whether a whole answer is calls to known tools with valid
  arguments.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.inference.domain import FunctionTool, Message, ToolChoice, ToolUse
from services.inference.json_schema import validate_instance

# The most calls a forced list holds: without a bound, a small model may go on listing calls (often the
# same ones) until max_tokens, and an answer cut short is no use to anyone.
MAX_PARALLEL_CALLS = 8
# The arguments of a function that declares none.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
# Schema keywords whose value is one schema, a list of schemas, or a name -> schema mapping.
_ONE_SCHEMA = ("items", "additionalProperties", "not", "contains", "propertyNames")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_LOCAL_REF = re.compile(r"^#/(?:\$defs|definitions)/([^/]+)$")
# A small model often wraps JSON in a Markdown code fence.
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


# -- the constraint -------------------------------------------------------------------------------


def _closed(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object schema that lists its properties and
    says nothing of others: a small model left free to add keys may add them until max_tokens. What it
    then writes still validates against the caller's schema (which allows fewer things, never more)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _ONE_SCHEMA:
        if isinstance(out.get(key), dict):
            out[key] = _closed(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_closed(item) for item in out[key]]
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _closed(item) for name, item in out[key].items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _hoisted(schema: Mapping[str, Any], prefix: str, defs: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameter schema placed inside the call schema: its `$defs`/`definitions` move to the
    call schema's root `$defs` under `prefix` (two tools may both define `Address`), its local `$ref`s
    rewritten to match. References must resolve from the root, where the schema no longer is."""

    def moved(value: Any) -> Any:
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                if key == "$ref" and isinstance(item, str):
                    match = _LOCAL_REF.match(item)
                    out[key] = f"#/$defs/{prefix}{match.group(1)}" if match else item
                else:
                    out[key] = moved(item)
            return out
        if isinstance(value, list):
            return [moved(item) for item in value]
        return value

    body = dict(schema)
    for key in ("$defs", "definitions"):
        for name, definition in (body.pop(key, None) or {}).items():
            defs[f"{prefix}{name}"] = moved(definition)
    body.pop("$schema", None)
    return moved(body)  # type: ignore[no-any-return]


def _call_schema(tool: FunctionTool, index: int, defs: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool.name},
            "arguments": _hoisted(_closed(dict(tool.parameters)), f"t{index}_", defs),
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def lists_calls(use: ToolUse) -> bool:
    """Whether a forced answer is a list of calls (`required` with parallel calls) or one call."""
    return use.choice is ToolChoice.REQUIRED and use.parallel


def forced_schema(use: ToolUse) -> dict[str, Any]:
    """The JSON Schema a forced answer follows: one call of the named function, one call of any tool
    (`parallel_tool_calls: false`), or a list of 1 to MAX_PARALLEL_CALLS calls (`required`)."""
    defs: dict[str, Any] = {}
    if use.choice is ToolChoice.FUNCTION:
        index, tool = next((i, t) for i, t in enumerate(use.tools) if t.name == use.function)
        schema = _call_schema(tool, index, defs)
    else:
        calls = [_call_schema(tool, i, defs) for i, tool in enumerate(use.tools)]
        one = calls[0] if len(calls) == 1 else {"anyOf": calls}
        listed = {"type": "array", "items": one, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS}
        schema = listed if lists_calls(use) else one
    if defs:
        schema = {**schema, "$defs": defs}
    return schema


# -- the prompt, for templates that know nothing of tools ------------------------------------------


def call_json(name: str, arguments: str) -> dict[str, Any]:
    """A call as the model writes it (arguments as JSON when they parse, else as the text they are)."""
    try:
        parsed: Any = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        parsed = arguments
    return {"name": name, "arguments": parsed}


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def instructions(use: ToolUse) -> str:
    """The system text that describes the tools and how to call them."""
    lines = ["You can call these functions. Each one's arguments follow the JSON Schema given:"]
    for tool in use.tools:
        about = f": {tool.description}" if tool.description else ""
        lines.append(f"- {tool.name}{about}\n  arguments: {_dumps(tool.parameters)}")
    call = 'a JSON object {"name": "<function name>", "arguments": {<the arguments>}}'
    if use.choice is ToolChoice.FUNCTION:
        lines.append(f"\nCall the function {use.function} now: answer with only {call}.")
    elif use.choice is ToolChoice.REQUIRED:
        if lists_calls(use):
            lines.append(f"\nCall one or more functions now: answer with only a JSON list of {call}.")
        else:
            lines.append(f"\nCall one function now: answer with only {call}.")
    else:
        several = " (a JSON list of them for several calls)" if use.parallel else ""
        lines.append(
            f"\nTo call a function, answer with only {call}{several}. Otherwise, answer in plain text."
        )
    return "\n".join(lines)


def fallback_messages(messages: Sequence[Message], use: ToolUse | None) -> list[Message]:
    """The conversation for a template without tool support: the tools described in the (first)
    system message, each assistant turn's calls appended to its text as the JSON the model is asked to
    write, and each run of tool results as one user turn naming the functions that returned them."""
    names = {call.id: call.name for m in messages for call in m.tool_calls}
    out: list[Message] = []
    results: list[str] = []  # a run of tool results, told in one user turn

    def tell_results() -> None:
        if results:
            out.append(Message("user", "\n".join(results)))
            results.clear()

    for message in messages:
        if message.role == "tool":
            who = names.get(message.tool_call_id)
            what = f"The function {who}" if who else f"The function call {message.tool_call_id}"
            results.append(f"{what} returned: {message.content}")
            continue
        tell_results()
        if message.tool_calls:
            calls = [call_json(c.name, c.arguments) for c in message.tool_calls]
            text = _dumps(calls[0] if len(calls) == 1 else calls)
            out.append(Message("assistant", f"{message.content}\n{text}" if message.content else text))
        else:
            out.append(Message(message.role, message.content))
    tell_results()
    if use is not None and use.offered:
        described = instructions(use)
        if out and out[0].role == "system":
            out[0] = Message("system", f"{out[0].content}\n\n{described}")
        else:
            out.insert(0, Message("system", described))
    return out


# -- reading the answer ---------------------------------------------------------------------------


@dataclass
class ScannedCall:
    """A call being read: its name once complete, its arguments' text so far."""

    name: str | None = None
    arguments: list[str] = field(default_factory=list)
    # Arguments read before the name was complete (their text waits for it).
    pending: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CallEvent:
    """Something new about call `index`: its name just became known, and/or more arguments text."""

    index: int
    name: str | None = None
    arguments: str = ""


@dataclass
class _Level:
    container: str  # "{" or "["
    expect_key: bool = True
    key: str = ""
    value_started: bool = False


class CallScanner:
    """Reads the JSON of a forced answer (one call object, or a list of them) a piece at a time.

    A call's name is told once its string is complete; its arguments are handed out verbatim as they
    are generated (the raw JSON text of the `arguments` value), so the pieces joined are exactly the
    arguments of the whole answer. The engine keeps the text valid JSON of that shape; the scanner
    only tracks strings, nesting and keys."""

    def __init__(self, listed: bool) -> None:
        # How deep a call object sits: at the top, or inside the top-level list.
        self.call_depth = 2 if listed else 1
        self.calls: list[ScannedCall] = []
        self._stack: list[_Level] = []
        self._in_string = False
        self._escaped = False
        self._string: list[str] | None = None  # the raw text of a key or name being read
        self._string_is_key = False
        self._capturing = False  # inside the `arguments` value
        self._literal = False  # the `arguments` value is a number or literal (ends at , or })

    def feed(self, text: str) -> list[CallEvent]:
        events: list[CallEvent] = []
        for char in text:
            self._char(char, events)
        return _merged(events)

    # The call object currently open (its level is at call_depth).
    def _at_call(self) -> bool:
        return len(self._stack) == self.call_depth and self._stack[-1].container == "{"

    def _arguments_start(self) -> bool:
        level = self._stack[-1] if self._stack else None
        return (
            self._at_call()
            and level is not None
            and not level.expect_key
            and level.key == "arguments"
            and not level.value_started
        )

    def _emit(self, text: str, events: list[CallEvent]) -> None:
        call = self.calls[-1]
        if call.name is None:
            call.pending.append(text)
            return
        call.arguments.append(text)
        events.append(CallEvent(len(self.calls) - 1, arguments=text))

    def _char(self, char: str, events: list[CallEvent]) -> None:
        if self._in_string:
            if self._capturing:
                self._emit(char, events)
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
                self._string_ended(events)
                return
            if self._string is not None:
                self._string.append(char)
            return
        if self._literal and (char in ",}" or char.isspace()) and self._at_call():
            self._capturing = self._literal = False
        if char.isspace():
            if self._capturing:
                self._emit(char, events)
            return
        if self._arguments_start():
            self._stack[-1].value_started = True
            self._capturing = True
            self._literal = char not in '{["'
        if self._capturing:
            self._emit(char, events)
        if char == '"':
            self._string_started()
        elif char in "{[":
            if char == "{" and len(self._stack) == self.call_depth - 1 and not self._capturing:
                self.calls.append(ScannedCall())
            self._mark_value()
            self._stack.append(_Level(char))
        elif char in "}]":
            if self._stack:
                self._stack.pop()
            if self._capturing and not self._literal and self._at_call():
                self._capturing = False
        elif char == ":":
            if self._stack:
                self._stack[-1].expect_key = False
        elif char == ",":
            if self._stack:
                level = self._stack[-1]
                level.expect_key, level.value_started = level.container == "{", False
        else:
            self._mark_value()

    def _mark_value(self) -> None:
        if self._stack and not self._stack[-1].expect_key:
            self._stack[-1].value_started = True

    def _string_started(self) -> None:
        self._in_string = True
        level = self._stack[-1] if self._stack else None
        self._string = None
        if level is None or not self._at_call():
            self._mark_value()
            return
        if level.expect_key:
            self._string, self._string_is_key = [], True
        else:
            if level.key == "name" and not level.value_started:
                self._string, self._string_is_key = [], False
            level.value_started = True

    def _string_ended(self, events: list[CallEvent]) -> None:
        if self._capturing and self._at_call():
            self._capturing = False  # a string-valued `arguments` ended
        if self._string is None:
            return
        try:
            text = json.loads('"' + "".join(self._string) + '"')
        except json.JSONDecodeError:
            text = "".join(self._string)
        self._string = None
        level = self._stack[-1]
        if self._string_is_key:
            level.key = text
            return
        call = self.calls[-1]
        if call.name is None:
            call.name = str(text)
            pending, call.pending = "".join(call.pending), []
            if pending:
                call.arguments.append(pending)
            events.append(CallEvent(len(self.calls) - 1, name=call.name, arguments=pending))

    def named_calls(self) -> list[tuple[str, str]]:
        """(name, arguments text) of every call whose name was read."""
        return [(c.name, "".join(c.arguments)) for c in self.calls if c.name is not None]


def _merged(events: list[CallEvent]) -> list[CallEvent]:
    """Consecutive events of one call as one (a piece may hold a name and the start of arguments)."""
    out: list[CallEvent] = []
    for event in events:
        if out and out[-1].index == event.index and event.name is None:
            last = out[-1]
            out[-1] = CallEvent(last.index, last.name, last.arguments + event.arguments)
        else:
            out.append(event)
    return out


def auto_calls(text: str, use: ToolUse) -> list[tuple[str, str]] | None:
    """Under `tool_choice: auto`: the calls a whole answer makes, when it is nothing but a call (or,
    with parallel calls, a list of calls) to known tools whose arguments validate; else None (the
    answer is text). A Markdown code fence around the JSON is allowed."""
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1)
    if not stripped.startswith(("{", "[")):
        return None
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    if not items or (isinstance(value, list) and not use.parallel and len(items) > 1):
        return None
    calls: list[tuple[str, str]] = []
    for item in items:
        if not isinstance(item, dict) or set(item) != {"name", "arguments"}:
            return None
        tool = use.tool(item["name"]) if isinstance(item["name"], str) else None
        if tool is None or not isinstance(item["arguments"], dict):
            return None
        arguments = json.dumps(item["arguments"], ensure_ascii=False)
        if validate_instance(arguments, dict(tool.parameters)) is not None:
            return None
        calls.append((tool.name, arguments))
    return calls


def may_be_calls(text: str) -> bool:
    """Whether an answer that begins with `text` (whitespace aside) could still be calls under `auto`."""
    return text.lstrip()[:1] in ("", "{", "[", "`")
