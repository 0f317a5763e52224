"""The render stage: the prompt the engine gets, either the caller's own or the conversation through
the model's chat template. An upstream server applies its own template to the messages (the engine
sends them as they are), so for its models a conversation renders to no prompt. ferry does not pass
tools or tool turns to an upstream server: such a request is refused naming the field."""

from __future__ import annotations

from services.common.errors import invalid_argument
from services.common.triton_client import ModelInfo, Provider
from services.inference.domain import GenerationRequest
from services.inference.templates import ChatTemplates


class Render:
    def __init__(self, templates: ChatTemplates) -> None:
        self.templates = templates

    def __call__(self, request: GenerationRequest, model: ModelInfo) -> str:
        if request.messages is None:
            return request.prompt or ""
        if model.provider is Provider.UPSTREAM:
            _refuse_tools_upstream(request, model.name)
            return ""
        return self.templates.render(
            model.name,
            model.chat_template,
            request.messages,
            field=request.spelling.input,
            tools=request.tool_use,
        )


def _refuse_tools_upstream(request: GenerationRequest, model: str) -> None:
    why = f"is not supported with model '{model}': ferry does not pass tool calling to upstream servers"
    if request.tool_use is not None and request.tool_use.offered:
        raise invalid_argument("tools", why)
    for i, message in enumerate(request.messages or ()):
        if message.tool_calls:
            raise invalid_argument(f"{request.spelling.input}[{i}].tool_calls", why)
        if message.role == "tool":
            raise invalid_argument(f"{request.spelling.input}[{i}].role", f"'tool' {why}")
