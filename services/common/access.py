"""The access table: which scopes grant each RPC, read from the protos' `ferry.auth.v1.access` option.

Each ferry RPC declares `option (ferry.auth.v1.access)` with the scopes that grant it, any one of them,
or `self_authenticated`: the call carries its own proof (a webhook's signature), the edge and the
interceptor let it through without a key as the UNVERIFIED principal, and the method's service refuses
it unless its own check passes (services/jobs/ingest.py).
"""

from __future__ import annotations

from functools import lru_cache

from ferry.audit.v1 import audit_pb2
from ferry.auth.v1 import auth_pb2
from ferry.conversations.v1 import conversations_pb2
from ferry.grammars.v1 import grammars_pb2
from ferry.inference.v1 import inference_pb2
from ferry.jobs.v1 import jobs_pb2
from ferry.keys.v1 import keys_pb2
from ferry.models.v1 import models_pb2
from ferry.openai.v1 import openai_pb2
from ferry.transactions.v1 import transactions_pb2
from google.protobuf import descriptor_pool

from services.common.interceptor import UNOBSERVED_SERVICES

INFERENCE, READ, ADMIN, INTERNAL = "inference", "read", "admin", "internal"
# What an API key may hold; `internal` belongs to the service token alone.
KEY_SCOPES = (INFERENCE, READ, ADMIN)

# Every ferry API, so that the default descriptor pool knows each method's access option.
PROTO_FILES = (
    audit_pb2,
    auth_pb2,
    conversations_pb2,
    grammars_pb2,
    inference_pb2,
    jobs_pb2,
    keys_pb2,
    models_pb2,
    openai_pb2,
    transactions_pb2,
)

# Who a self-authenticated call is until its service has checked its proof (then, e.g.,
# `webhooks/{source}`); it holds no scope.
UNVERIFIED_PRINCIPAL = "unverified"

# Services that carry no access option because their protos are not ferry's: Envoy's ext_authz
# check is asked only by Envoy, which sends the service token (`grpc_service.initial_metadata`).
FOREIGN_SERVICE_SCOPES = {"envoy.service.auth.v3.Authorization": frozenset({INTERNAL})}


@lru_cache(maxsize=512)
def required_scopes(full_method: str) -> frozenset[str] | None:
    """Scopes that grant `/package.Service/Method`, any one of them; None for public methods
    (health, reflection). A method without the access option, or unknown, is admin-only."""
    service, _, method = full_method.lstrip("/").partition("/")
    if service in UNOBSERVED_SERVICES:
        return None
    if service in FOREIGN_SERVICE_SCOPES:
        return FOREIGN_SERVICE_SCOPES[service]
    try:
        descriptor = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(method)
    except KeyError:
        return frozenset({ADMIN})
    if descriptor is None:
        return frozenset({ADMIN})
    access = descriptor.GetOptions().Extensions[auth_pb2.access]
    if access.self_authenticated:
        return frozenset()  # no key grants it: the call's own proof does, checked by its service
    return frozenset(access.scopes) or frozenset({ADMIN})


def is_self_authenticated(full_method: str) -> bool:
    """A method whose calls prove themselves (a webhook signature) instead of with an API key."""
    return required_scopes(full_method) == frozenset()


def is_internal(full_method: str) -> bool:
    """A service-to-service method (scope `internal`): only ferry's own processes call it."""
    return INTERNAL in (required_scopes(full_method) or ())
