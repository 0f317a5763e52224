"""Chat templates: render messages into a prompt with the model's own Jinja template.

The template comes from the model's metadata (config.pbtxt `chat_template`), never from this code,
so a model with another turn format needs no change here. Templates are compiled once per model
and template text, in a sandbox (they are configuration, but still code we did not write), with the
conventions of Hugging Face's `apply_chat_template` (trim/lstrip blocks, `raise_exception`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, NoReturn

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.common.errors import Reason, invalid_argument, rpc_error
from services.inference.domain import Message


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
        self._compiled: dict[tuple[str, str], Any] = {}

    def _template(self, model: str, source: str) -> Any:
        key = (model, hashlib.sha256(source.encode()).hexdigest())
        template = self._compiled.get(key)
        if template is None:
            try:
                template = self._env.from_string(source)
            except TemplateError as err:
                raise rpc_error(
                    Reason.CHAT_TEMPLATE_INVALID,
                    f"the chat template of model '{model}' does not compile: {err}",
                    metadata={"model": model},
                ) from err
            # Drop compiled versions of this model's older templates (after a reload with a new one).
            for old in [k for k in self._compiled if k[0] == model]:
                del self._compiled[old]
            self._compiled[key] = template
        return template

    def render(
        self,
        model: str,
        source: str,
        messages: Sequence[Message],
        *,
        field: str = "messages",
        add_generation_prompt: bool = True,
    ) -> str:
        template = self._template(model, source)
        try:
            return str(
                template.render(
                    messages=[{"role": m.role, "content": m.content} for m in messages],
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
