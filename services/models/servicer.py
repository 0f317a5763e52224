"""ModelsService: the registry over Triton's model repository (explicit model control)."""

from __future__ import annotations

import base64
import binascii
import logging
import re

import grpc
from ferry.models.v1 import models_pb2, models_pb2_grpc
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from services.common import triton
from services.common.errors import Reason, invalid_argument, not_found, rpc_error

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_NAME = re.compile(r"^models/([A-Za-z0-9][A-Za-z0-9._-]{0,127})$")
_STATES = {
    "READY": models_pb2.Model.STATE_READY,
    "LOADING": models_pb2.Model.STATE_LOADING,
    "UNLOADING": models_pb2.Model.STATE_UNLOADING,
    "UNAVAILABLE": models_pb2.Model.STATE_UNAVAILABLE,
}


def parse_model_name(name: str, field: str = "name") -> str:
    """`models/{model}` -> model id; anything else is INVALID_ARGUMENT naming the field."""
    if not name:
        raise invalid_argument(field, "is required, in the form models/{model}")
    match = _NAME.match(name)
    if not match:
        raise invalid_argument(field, f"'{name}' is not a model name of the form models/{{model}}")
    return match.group(1)


def encode_page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"models:{offset}".encode()).decode()


def decode_page_token(token: str) -> int:
    if not token:
        return 0
    try:
        kind, _, offset = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind != "models" or not offset.isdigit():
            raise ValueError(token)
        return int(offset)
    except (ValueError, binascii.Error, UnicodeDecodeError) as err:
        raise invalid_argument("page_token", "is not a token returned by ListModels") from err


class ModelsServicer(models_pb2_grpc.ModelsServiceServicer):
    def __init__(self, client: triton_aio.InferenceServerClient) -> None:
        self.client = client

    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.ListModelsResponse:
        if request.page_size < 0:
            raise invalid_argument("page_size", "must not be negative")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        offset = decode_page_token(request.page_token)
        index = sorted(await triton.repository_index(self.client), key=lambda m: m["name"])
        page = index[offset : offset + size]
        models = [await self._model(entry) for entry in page]
        more = offset + size < len(index)
        return models_pb2.ListModelsResponse(
            models=models, next_page_token=encode_page_token(offset + size) if more else ""
        )

    async def GetModel(
        self, request: models_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.Model:
        return await self._get(parse_model_name(request.name))

    async def LoadModel(
        self, request: models_pb2.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.Model:
        model_id = parse_model_name(request.name)
        await self._get(model_id)  # NOT_FOUND for names the repository does not hold
        try:
            await self.client.load_model(model_id)
        except InferenceServerException as err:
            raise rpc_error(
                Reason.MODEL_LOAD_FAILED,
                f"Triton could not load '{model_id}': {err.message()}",
                metadata={"model": model_id},
            ) from err
        log.info("model %s loaded", model_id)
        return await self._get(model_id)

    async def UnloadModel(
        self, request: models_pb2.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.Model:
        model_id = parse_model_name(request.name)
        await self._get(model_id)
        try:
            await self.client.unload_model(model_id)
        except InferenceServerException as err:
            raise triton.unavailable(err) from err
        log.info("model %s unloaded", model_id)
        return await self._get(model_id)

    async def _get(self, model_id: str) -> models_pb2.Model:
        for entry in await triton.repository_index(self.client):
            if entry["name"] == model_id:
                return await self._model(entry)
        raise not_found("model", f"models/{model_id}")

    async def _model(self, entry: dict[str, str]) -> models_pb2.Model:
        model_id = entry["name"]
        state = _STATES.get(entry.get("state", ""), models_pb2.Model.STATE_UNAVAILABLE)
        model = models_pb2.Model(
            name=f"models/{model_id}",
            model_id=model_id,
            state=state,
            state_reason=entry.get("reason", ""),
            version=entry.get("version", "") if state == models_pb2.Model.STATE_READY else "",
        )
        if state == models_pb2.Model.STATE_READY:
            info = await triton.model_info(self.client, model_id)
            if info:
                model.context_length = info.context_length
                model.max_tokens = info.max_tokens
                model.owned_by = info.owned_by
                model.chat_template = info.chat_template
                model.backend = info.backend
        return model
