"""Triton access shared by the services: one client per process and the model metadata we read.

Model metadata (context length, max tokens, owner, chat template, engine slots, capabilities) lives in
the model's config.pbtxt `parameters`, so services read it through Triton's API and work with a remote
Triton.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from tritonclient.grpc import InferenceServerClientPlugin, InferInput, service_pb2
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

# Re-exported: the model metadata's capabilities (their list lives apart so the config can use it).
from services.common.capabilities import ALL_CAPABILITIES as ALL_CAPABILITIES
from services.common.capabilities import Capability as Capability
from services.common.config import TritonSettings
from services.common.errors import Reason, RpcError, rpc_error


class Provider(StrEnum):
    """What serves a model: ferry's Triton, or an OpenAI-compatible upstream server."""

    TRITON = "triton"
    UPSTREAM = "upstream"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    backend: str
    context_length: int
    max_tokens: int
    owned_by: str
    chat_template: str
    engine_slots: int
    capabilities: frozenset[str] = ALL_CAPABILITIES
    provider: Provider = Provider.TRITON
    # What the model is (config.pbtxt parameters `family`, `parameter_count`, `quantization`; "" unknown).
    family: str = ""
    parameter_count: str = ""
    quantization: str = ""
    # Embedding models: the vector length (config parameter `dimension`) and how many inputs one Triton
    # request may carry (the config's max_batch_size); 0 for generation models.
    dimensions: int = 0
    max_batch_size: int = 0


# The header Triton checks on its restricted protocols (launcher/triton.py `restricted_flags`). Over
# gRPC Triton expects it with its own prefix, `triton-grpc-protocol-<header>`.
ACCESS_HEADER = "ferry-triton-secret"
GRPC_ACCESS_HEADER = f"triton-grpc-protocol-{ACCESS_HEADER}"


def access_headers(settings: TritonSettings) -> dict[str, str]:
    """The gRPC metadata that carries the Triton access secret (empty when none is set)."""
    if settings.access_secret is None:
        return {}
    return {GRPC_ACCESS_HEADER: settings.access_secret.get_secret_value()}


def http_access_headers(settings: TritonSettings) -> dict[str, str]:
    """The same secret as Triton's HTTP endpoint expects it (no prefix)."""
    if settings.access_secret is None:
        return {}
    return {ACCESS_HEADER: settings.access_secret.get_secret_value()}


class AccessSecret(InferenceServerClientPlugin):  # type: ignore[misc]
    """tritonclient plugin: puts the access secret on every call of a client."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers

    def __call__(self, request: Any) -> None:
        # A new dict: the caller's own `headers` argument is left as it was.
        request.headers = {**(request.headers or {}), **self.headers}


def with_access(client: Any, settings: TritonSettings) -> Any:
    """`client` (a tritonclient gRPC client, sync or aio) sending the access secret on every call."""
    headers = access_headers(settings)
    if headers:
        client.register_plugin(AccessSecret(headers))
    return client


def connect(settings: TritonSettings) -> triton_aio.InferenceServerClient:
    """The Triton client of a process: every call carries the access secret."""
    client: triton_aio.InferenceServerClient = with_access(
        triton_aio.InferenceServerClient(url=settings.grpc_address), settings
    )
    return client


def string_input(name: str, value: str) -> InferInput:
    """A one-element BYTES input tensor holding `value` as UTF-8."""
    tensor = InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value.encode("utf-8")], dtype=np.object_))
    return tensor


def string_tensor(name: str, value: str) -> tuple[service_pb2.ModelInferRequest.InferInputTensor, bytes]:
    """`string_input` as the request carries it: the tensor's description and its raw contents (a
    4-byte little-endian length, then the UTF-8 bytes), built without numpy."""
    data = value.encode("utf-8")
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype="BYTES", shape=[1])
    return tensor, len(data).to_bytes(4, "little") + data


def infer_request(model: str, request_id: str, strings: dict[str, str]) -> service_pb2.ModelInferRequest:
    """A ModelInferRequest of one-element BYTES inputs, as tritonclient builds it from `string_input`s
    (for callers that use the gRPC stub directly)."""
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, value in strings.items():
        tensor, raw = string_tensor(name, value)
        request.inputs.append(tensor)
        request.raw_input_contents.append(raw)
    return request


def call_metadata(client: triton_aio.InferenceServerClient, headers: dict[str, str]) -> Any:
    """The metadata tritonclient would send with `headers` on `client` (its plugins applied: the
    access secret), for a call made on its stub directly."""
    return client._get_metadata(headers)


def engine_unavailable(model: str, doing: str, why: str) -> RpcError:
    """ENGINE_UNAVAILABLE for a call to a model's engine that got no answer (`doing`: what it asked)."""
    return rpc_error(
        Reason.ENGINE_UNAVAILABLE,
        f"the engine of model '{model}' could not {doing}: {why}",
        metadata={"model": model},
    )


def unavailable(err: InferenceServerException) -> RpcError:
    return rpc_error(Reason.TRITON_UNAVAILABLE, f"Triton is not answering: {err.message()}")


async def repository_index(client: triton_aio.InferenceServerClient) -> list[dict[str, str]]:
    """Triton's repository index: name, version, state and reason of every model it knows."""
    try:
        index: dict[str, Any] = await client.get_model_repository_index(as_json=True)
    except InferenceServerException as err:
        raise unavailable(err) from err
    return list(index.get("models", []))


async def model_info(client: triton_aio.InferenceServerClient, name: str) -> ModelInfo | None:
    """Metadata of a loaded model; None when Triton has no configuration for it (not loaded)."""
    try:
        response: dict[str, Any] = await client.get_model_config(name, as_json=True)
    except InferenceServerException:
        return None
    config = response.get("config", {})
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    return ModelInfo(
        name=name,
        backend=config.get("backend", ""),
        context_length=_int(params.get("context_length")),
        max_tokens=_int(params.get("max_tokens")),
        owned_by=params.get("owned_by", "ferry"),
        chat_template=params.get("chat_template", ""),
        # Embedding models have no engine slots: `concurrent_requests` says how many to let in at once.
        engine_slots=_int(params.get("n_parallel") or params.get("concurrent_requests"), default=1),
        capabilities=_capabilities(params.get("capabilities")),
        family=params.get("family", ""),
        parameter_count=params.get("parameter_count", ""),
        quantization=params.get("quantization", ""),
        dimensions=_int(params.get("dimension")),
        max_batch_size=_int(str(config.get("max_batch_size", 0))),
    )


def _capabilities(value: str | None) -> frozenset[str]:
    """`completion,chat,logprobs` -> those names; an absent parameter means every capability."""
    if value is None:
        return ALL_CAPABILITIES
    return frozenset(name.strip().lower() for name in value.split(",") if name.strip())


def _int(value: str | None, default: int = 0) -> int:
    try:
        return int(value) if value else default
    except ValueError:
        return default
