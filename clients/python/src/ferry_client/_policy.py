"""What the client retries, and how: the channel's gRPC service config (gRFC A6) and ferry's own
retry hints (RetryInfo / `retry-after`), which gRPC's retry does not read."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

# Methods that change nothing, or nothing twice: gRPC retries them on UNAVAILABLE.
IDEMPOTENT: Mapping[str, tuple[str, ...]] = {
    "ferry.inference.v1.InferenceService": ("Embed",),
    "ferry.openai.v1.OpenAIService": ("CreateEmbedding", "ListModels", "RetrieveModel"),
    "ferry.models.v1.ModelsService": ("ListModels", "GetModel"),
    "ferry.transactions.v1.TransactionsService": ("GetTransaction", "ListTransactions"),
    "ferry.audit.v1.AuditService": ("ListEvents", "VerifyChain"),
    "ferry.keys.v1.KeysService": ("ListKeys", "GetKey"),
    "ferry.grammars.v1.GrammarsService": ("GetGrammar", "ListGrammars"),
    "ferry.jobs.v1.JobsService": ("GetJob", "ListJobs", "WaitJob"),
    "ferry.conversations.v1.ConversationsService": ("GetConversation", "ListConversations", "ListMessages"),
    "grpc.health.v1.Health": ("Check",),
}

# Generations and creates that are idempotent on a request id (AIP-155): the client gives every such
# call one (the request's field when it has one, always the `x-request-id` header), so a retried try
# is the same request to ferry (the same transaction record, the same job).
REQUEST_ID_FIELD: Mapping[str, str | None] = {
    "/ferry.inference.v1.InferenceService/Generate": "request_id",
    "/ferry.inference.v1.InferenceService/GenerateStream": "request_id",
    "/ferry.openai.v1.OpenAIService/CreateChatCompletion": None,
    "/ferry.openai.v1.OpenAIService/CreateChatCompletionStream": None,
    "/ferry.openai.v1.OpenAIService/CreateCompletion": None,
    "/ferry.openai.v1.OpenAIService/CreateCompletionStream": None,
    "/ferry.jobs.v1.JobsService/CreateJob": "request_id",
    "/ferry.conversations.v1.ConversationsService/CreateConversation": "request_id",
    "/ferry.grammars.v1.GrammarsService/CreateGrammar": "request_id",
}


def retried_methods() -> frozenset[str]:
    """Full method paths (`/pkg.Service/Method`) that the channel retries."""
    paths = {f"/{service}/{method}" for service, methods in IDEMPOTENT.items() for method in methods}
    return frozenset(paths | set(REQUEST_ID_FIELD))


@dataclass(frozen=True)
class RetryPolicy:
    """How a Client retries (`retry=RetryPolicy(...)`; `retry=True` is this with its defaults).

    gRPC's own retry (the service config) tries again on UNAVAILABLE `max_attempts` times in all, with
    exponential backoff and jitter, for the methods above; it covers a streaming call until its first
    response arrives. On top of that, a unary call failing with a retry hint from ferry
    (RESOURCE_EXHAUSTED or UNAVAILABLE with RetryInfo / `retry-after`: rate limits, a full queue, a
    model still loading) is tried again after the delay ferry asked for, at most `hint_attempts`
    times, when the delay is at most `max_hint_delay` seconds and fits in the call's deadline.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    backoff_multiplier: float = 2.0
    retryable_status_codes: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.UNAVAILABLE,)
    hint_attempts: int = 2
    max_hint_delay: float = 5.0
    hint_status_codes: tuple[grpc.StatusCode, ...] = (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
    )

    def service_config(self) -> str:
        names: list[dict[str, str]] = [
            {"service": service, "method": method}
            for service, methods in IDEMPOTENT.items()
            for method in methods
        ]
        for path in REQUEST_ID_FIELD:
            service, _, method = path.lstrip("/").partition("/")
            names.append({"service": service, "method": method})
        config = {
            "methodConfig": [
                {
                    "name": names,
                    "retryPolicy": {
                        # gRPC caps maxAttempts at 5.
                        "maxAttempts": max(2, min(self.max_attempts, 5)),
                        "initialBackoff": f"{self.initial_backoff:.3f}s",
                        "maxBackoff": f"{self.max_backoff:.3f}s",
                        "backoffMultiplier": self.backoff_multiplier,
                        "retryableStatusCodes": [code.name for code in self.retryable_status_codes],
                    },
                }
            ],
            # Stop retrying when most calls fail (gRFC A6 throttling), so retries never pile up.
            "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
        }
        return json.dumps(config)


DEFAULT_RETRY = RetryPolicy()
