"""ModelsService: the registry over Triton's model repository (explicit model control) and the models
served by upstream servers (`upstream_models`).

Names follow `services.common.model_names`: with `allowed_models` set every other model is absent (not
listed, NOT_FOUND by name); an alias is not an entry of its own but appears in its model's `aliases`,
and by name (Get, Load, Unload) it means its model. An upstream model shadows a Triton model of the same
name; it is always READY (ferry does not probe the upstream) and cannot be loaded or unloaded.
"""

from __future__ import annotations

import logging

import grpc
from ferry.models.v1 import models_pb2, models_pb2_grpc
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from services.common import listing, triton_client, upstream_models
from services.common.errors import Reason, RpcError, not_found, rpc_error
from services.common.model_names import ModelNames
from services.common.names import model_id_from_name, model_name
from services.common.triton_client import ModelInfo, Provider
from services.models.restore import LoadedModels

log = logging.getLogger(__name__)

Model = models_pb2.Model

_STATES = {
    "READY": Model.STATE_READY,
    "LOADING": Model.STATE_LOADING,
    "UNLOADING": Model.STATE_UNLOADING,
    "UNAVAILABLE": Model.STATE_UNAVAILABLE,
}
_PROVIDERS = {Provider.TRITON: Model.PROVIDER_TRITON, Provider.UPSTREAM: Model.PROVIDER_UPSTREAM}


def not_managed(model_id: str, action: str) -> RpcError:
    return rpc_error(
        Reason.MODEL_NOT_MANAGED,
        f"model '{model_id}' is served by an upstream server; ferry cannot {action} it"
        " (only Triton's models are loaded and unloaded)",
        metadata={"model": model_id},
    )


class ModelsServicer(models_pb2_grpc.ModelsServiceServicer):
    def __init__(
        self,
        client: triton_aio.InferenceServerClient,
        names: ModelNames,
        loaded: LoadedModels | None = None,
    ) -> None:
        self.client = client
        self.names = names
        # The model set restored after a Triton restart (services/models/restore.py).
        self.loaded = loaded or LoadedModels(client, None)
        self.upstream = {name: upstream_models.model_info(name, cfg) for name, cfg in names.upstream.items()}

    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.ListModelsResponse:
        # Keyset by model id, like every List RPC: a model loaded or removed between pages
        # shifts no other model onto or off the next page.
        page = listing.page(request.page_size, request.page_token, query=("models",), key=("text",))
        entries = await self._entries()
        if page.after is not None:
            entries = [entry for entry in entries if entry["name"] > page.after[0]]
        shown, token = page.split(entries[: page.limit], lambda entry: (entry["name"],))
        return models_pb2.ListModelsResponse(
            models=[await self._model(entry) for entry in shown], next_page_token=token
        )

    async def GetModel(
        self, request: models_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.Model:
        return await self._get(self._model_id(request.name), request.name)

    async def LoadModel(
        self, request: models_pb2.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.Model:
        model_id = self._model_id(request.name)
        await self._get(model_id, request.name)  # NOT_FOUND for names the repository does not hold
        if model_id in self.upstream:
            raise not_managed(model_id, "load")
        try:
            await self.client.load_model(model_id)
        except InferenceServerException as err:
            raise rpc_error(
                Reason.MODEL_LOAD_FAILED,
                f"Triton could not load '{model_id}': {err.message()}",
                metadata={"model": model_id},
            ) from err
        log.info("model %s loaded", model_id)
        self.loaded.loaded(model_id)
        return await self._get(model_id)

    async def UnloadModel(
        self, request: models_pb2.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.Model:
        model_id = self._model_id(request.name)
        await self._get(model_id, request.name)
        if model_id in self.upstream:
            raise not_managed(model_id, "unload")
        try:
            await self.client.unload_model(model_id)
        except InferenceServerException as err:
            raise triton_client.unavailable(err) from err
        log.info("model %s unloaded", model_id)
        self.loaded.unloaded(model_id)
        return await self._get(model_id)

    def _model_id(self, name: str) -> str:
        """The model `models/{name}` means (an alias means its model); NOT_FOUND when hidden."""
        requested = model_id_from_name(name)
        if not self.names.is_allowed(requested):
            raise not_found("model", name)
        return self.names.model(requested)

    async def _entries(self) -> list[dict[str, str]]:
        """Every model clients may use, as repository index entries (name, state, ...), by name."""
        entries = [{"name": name, "state": "READY"} for name in self.upstream if self.names.is_allowed(name)]
        for entry in await triton_client.repository_index(self.client):
            name = entry.get("name", "")
            if name in self.upstream or self.names.is_alias(name) or not self.names.is_allowed(name):
                continue
            entries.append(entry)
        return sorted(entries, key=lambda entry: entry["name"])

    async def _get(self, model_id: str, asked: str = "") -> models_pb2.Model:
        """The model `model_id`; NOT_FOUND naming `asked` (the caller's name for it) when absent."""
        for entry in await self._entries():
            if entry["name"] == model_id:
                return await self._model(entry)
        raise not_found("model", asked or model_name(model_id))

    async def _model(self, entry: dict[str, str]) -> models_pb2.Model:
        model_id = entry["name"]
        state = _STATES.get(entry.get("state", ""), Model.STATE_UNAVAILABLE)
        model = Model(
            name=model_name(model_id),
            model_id=model_id,
            state=state,
            state_reason=entry.get("reason", ""),
            version=entry.get("version", "") if state == Model.STATE_READY else "",
            aliases=self.names.aliases_of(model_id),
        )
        info: ModelInfo | None = self.upstream.get(model_id)
        if info is None and state == Model.STATE_READY:
            info = await triton_client.model_info(self.client, model_id)
        if info is None:
            # Triton reads a model's config only when it loads it: all we know is what serves it.
            model.provider = Model.PROVIDER_TRITON
            return model
        model.context_length = info.context_length
        model.max_tokens = info.max_tokens
        model.owned_by = info.owned_by
        model.chat_template = info.chat_template
        model.backend = info.backend
        model.provider = _PROVIDERS[info.provider]
        model.family = info.family
        model.parameter_count = info.parameter_count
        model.quantization = info.quantization
        model.capabilities.extend(sorted(info.capabilities))
        model.dimensions = info.dimensions
        return model
