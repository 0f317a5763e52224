"""The render stage: the prompt the engine gets, either the caller's own or the conversation through
the model's chat template. An upstream server applies its own template to the messages (the engine
sends them as they are), so for its models a conversation renders to no prompt."""

from __future__ import annotations

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
            return ""
        return self.templates.render(
            model.name, model.chat_template, request.messages, field=request.spelling.input
        )
