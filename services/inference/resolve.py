"""The resolve stage: which model serves the request, and the request as that model and the caller's
limits allow it (`services.inference.policy`).

From here on the request names the model that serves it: a request that named an alias
(`model_aliases`) keeps the alias in `model_alias`, and its responses and transaction record name the
model (as OpenAI's responses name the model an alias such as `gpt-4o` stands for)."""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from ferry.auth.v1.auth_pb2 import Principal

from services.common.config import InferenceSettings
from services.common.triton_client import ModelInfo
from services.inference.domain import GenerationRequest
from services.inference.policy import admissible


class Models(Protocol):
    async def resolve(self, name: str) -> ModelInfo:
        """The metadata of the READY model a name means (an alias means its model); NOT_FOUND /
        UNAVAILABLE (RpcError) otherwise."""
        ...


class Resolve:
    def __init__(self, models: Models, settings: InferenceSettings) -> None:
        self.models = models
        self.settings = settings

    async def __call__(
        self, request: GenerationRequest, principal: Principal | None
    ) -> tuple[GenerationRequest, ModelInfo]:
        model = await self.models.resolve(request.model)
        if model.name != request.model:
            request = replace(request, model=model.name, model_alias=request.model)
        return admissible(request, model, self.settings, principal), model
