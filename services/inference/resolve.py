"""The resolve stage: which model serves the request, and the request as that model and the caller's
limits allow it (`services.inference.policy`)."""

from __future__ import annotations

from typing import Protocol

from ferry.auth.v1.auth_pb2 import Principal

from services.common.config import InferenceSettings
from services.common.triton_client import ModelInfo
from services.inference.domain import GenerationRequest
from services.inference.policy import admissible


class Models(Protocol):
    async def resolve(self, name: str) -> ModelInfo:
        """A READY model's metadata; NOT_FOUND / UNAVAILABLE (RpcError) otherwise."""
        ...


class Resolve:
    def __init__(self, models: Models, settings: InferenceSettings) -> None:
        self.models = models
        self.settings = settings

    async def __call__(
        self, request: GenerationRequest, principal: Principal | None
    ) -> tuple[GenerationRequest, ModelInfo]:
        model = await self.models.resolve(request.model)
        return admissible(request, model, self.settings, principal), model
