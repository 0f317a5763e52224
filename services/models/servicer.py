"""ModelsService: the registry over Triton's model repository (explicit model control)."""

from __future__ import annotations

import logging

import grpc
from ferry.models.v1 import models_pb2, models_pb2_grpc
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from services.common import listing, triton_client
from services.common.errors import Reason, not_found, rpc_error
from services.common.names import model_id_from_name, model_name

log = logging.getLogger(__name__)

_STATES = {
    "READY": models_pb2.Model.STATE_READY,
    "LOADING": models_pb2.Model.STATE_LOADING,
    "UNLOADING": models_pb2.Model.STATE_UNLOADING,
    "UNAVAILABLE": models_pb2.Model.STATE_UNAVAILABLE,
}


class ModelsServicer(models_pb2_grpc.ModelsServiceServicer):
    def __init__(self, client: triton_aio.InferenceServerClient) -> None:
        self.client = client

    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.ListModelsResponse:
        # Keyset by model id, like every List RPC: a model loaded or removed between pages
        # shifts no other model onto or off the next page.
        page = listing.page(request.page_size, request.page_token, query=("models",), key=("text",))
        index = sorted(await triton_client.repository_index(self.client), key=lambda m: m["name"])
        if page.after is not None:
            index = [entry for entry in index if entry["name"] > page.after[0]]
        shown, token = page.split(index[: page.limit], lambda entry: (entry["name"],))
        return models_pb2.ListModelsResponse(
            models=[await self._model(entry) for entry in shown], next_page_token=token
        )

    async def GetModel(
        self, request: models_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.Model:
        return await self._get(model_id_from_name(request.name))

    async def LoadModel(
        self, request: models_pb2.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.Model:
        model_id = model_id_from_name(request.name)
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
        model_id = model_id_from_name(request.name)
        await self._get(model_id)
        try:
            await self.client.unload_model(model_id)
        except InferenceServerException as err:
            raise triton_client.unavailable(err) from err
        log.info("model %s unloaded", model_id)
        return await self._get(model_id)

    async def _get(self, model_id: str) -> models_pb2.Model:
        for entry in await triton_client.repository_index(self.client):
            if entry["name"] == model_id:
                return await self._model(entry)
        raise not_found("model", model_name(model_id))

    async def _model(self, entry: dict[str, str]) -> models_pb2.Model:
        model_id = entry["name"]
        state = _STATES.get(entry.get("state", ""), models_pb2.Model.STATE_UNAVAILABLE)
        model = models_pb2.Model(
            name=model_name(model_id),
            model_id=model_id,
            state=state,
            state_reason=entry.get("reason", ""),
            version=entry.get("version", "") if state == models_pb2.Model.STATE_READY else "",
        )
        if state == models_pb2.Model.STATE_READY:
            info = await triton_client.model_info(self.client, model_id)
            if info:
                model.context_length = info.context_length
                model.max_tokens = info.max_tokens
                model.owned_by = info.owned_by
                model.chat_template = info.chat_template
                model.backend = info.backend
        return model
