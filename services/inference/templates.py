"""Chat templates: render messages into a prompt with the model's own Jinja template.

The template comes from the model's metadata (config.pbtxt `chat_template`), never from this code,
so a model with another turn format needs no change here. Templates are compiled once per model
and template text, in a sandbox (they are configuration, but still code we did not write), with the
conventions of Hugging Face's `apply_chat_template` (trim/lstrip blocks, `raise_exception`).

Tools: a template that uses the `tools` variable gets the offered tools, assistant `tool_calls` and
`tool` turns as transformers passes them (OpenAI's shapes, a call's arguments parsed into an object).
Any other template gets ferry's fallback (`tool_calls.fallback_messages`): the tools described in a
system message, earlier calls as JSON text and tool results as user turns (docs/tools.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, NoReturn

from jinja2 import TemplateError, meta
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.common.errors import Reason, invalid_argument, rpc_error
from services.inference.domain import Message, ToolUse
from services.inference.tool_calls import call_json, fallback_messages


class TemplateRejected(TemplateError):
    """Raised by a template's own `raise_exception(...)`: the conversation breaks its rules."""


def _raise_exception(message: str) -> NoReturn:
    raise TemplateRejected(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    # Like transformers: no HTML escaping, since the output is a prompt, not a web page.
    return json.dumps(value, ensure_ascii=False, indent=indent)


class ChatTemplates:
    def __init__(self) -> None:
        self._env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        self._env.globals["raise_exception"] = _raise_exception
        self._env.filters["tojson"] = _tojson
        # (model, sha256 of the template) -> (compiled template, whether it uses `tools`)
        self._compiled: dict[tuple[str, str], tuple[Any, bool]] = {}

    def _template(self, model: str, source: str) -> tuple[Any, bool]:
        key = (model, hashlib.sha256(source.encode()).hexdigest())
        compiled = self._compiled.get(key)
        if compiled is None:
            try:
                knows_tools = "tools" in meta.find_undeclared_variables(self._env.parse(source))
                compiled = (self._env.from_string(source), knows_tools)
            except TemplateError as err:
                raise rpc_error(
                    Reason.CHAT_TEMPLATE_INVALID,
                    f"the chat template of model '{model}' does not compile: {err}",
                    metadata={"model": model},
                ) from err
            # Drop compiled versions of this model's older templates (after a reload with a new one).
            for old in [k for k in self._compiled if k[0] == model]:
                del self._compiled[old]
            self._compiled[key] = compiled
        return compiled

    def render(
        self,
        model: str,
        source: str,
        messages: Sequence[Message],
        *,
        field: str = "messages",
        add_generation_prompt: bool = True,
        tools: ToolUse | None = None,
    ) -> str:
        template, knows_tools = self._template(model, source)
        offered: list[dict[str, Any]] | None = None
        if knows_tools:
            if tools is not None and tools.offered:
                offered = [
                    {
                        "type": "function",
                        "function": {
                            "name": t.name,
                            "description": t.description,
                            "parameters": t.parameters,
                        },
                    }
                    for t in tools.tools
                ]
        elif (tools is not None and tools.offered) or any(m.tool_calls or m.role == "tool" for m in messages):
            messages = fallback_messages(messages, tools)
        try:
            return str(
                template.render(
                    messages=[_message(m) for m in messages],
                    tools=offered,
                    add_generation_prompt=add_generation_prompt,
                    # The engine adds BOS when it tokenizes; a template's {{ bos_token }} must not add another.
                    bos_token="",
                    eos_token="",
                )
            )
        except TemplateRejected as err:
            raise invalid_argument(field, str(err)) from err
        except TemplateError as err:
            raise rpc_error(
                Reason.CHAT_TEMPLATE_FAILED,
                f"the chat template of model '{model}' failed: {err}",
                metadata={"model": model},
            ) from err


def _message(message: Message) -> dict[str, Any]:
    """A turn as transformers passes it to a template (OpenAI's shape, a call's arguments as an object)."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": call_json(c.name, c.arguments)}
            for c in message.tool_calls
        ]
    if message.role == "tool":
        out["tool_call_id"] = message.tool_call_id
    return out
