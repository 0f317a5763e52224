"""ferry-client: the typed Python client of ferry's gRPC API.

    from ferry_client import Client
    from ferry.inference.v1 import inference_pb2

    with Client() as ferry:  # $FERRY_TARGET (localhost:8080) and $FERRY_API_KEY
        reply = ferry.inference.Generate(inference_pb2.GenerateRequest(model="models/m", prompt="Hi"))

See docs/client.md in the repository.
"""

from ferry_client._async import AsyncClient, AsyncStream, astream
from ferry_client._base import API_KEY_ENV, DEFAULT_TARGET, DEFAULT_TIMEOUT, TARGET_ENV, new_request_id
from ferry_client._policy import RetryPolicy
from ferry_client._sync import Client, Stream, stream
from ferry_client.errors import FerryError
from ferry_client.pagination import apaginate, paginate

__version__ = "0.1.0"

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "TARGET_ENV",
    "AsyncClient",
    "AsyncStream",
    "Client",
    "FerryError",
    "RetryPolicy",
    "Stream",
    "apaginate",
    "astream",
    "new_request_id",
    "paginate",
    "stream",
]
