"""Layered configuration: defaults, then a YAML file, then `FERRY_*` environment variables.

The YAML file is `$FERRY_CONFIG` when set, else `ferry.yaml` in the working directory when it exists.
Nested keys use `__` in the environment: `FERRY_INFERENCE__PORT=6000` sets `inference.port`.
`DATABASE_URL` (or `FERRY_DATABASE_URL`) selects an external PostgreSQL instead of the embedded one.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from services.common.capabilities import ALL_CAPABILITIES, Capability
from services.common.model_names import config_problems

REPO_ROOT = Path(__file__).resolve().parents[2]


class ServiceSettings(BaseModel):
    """Where one gRPC service listens."""

    host: str = "127.0.0.1"
    port: int
    metrics_port: int
    # `make run` only: processes of this service behind Envoy, which balances over them, retries reads
    # on another one and ejects a failing one (docs/deploy.md, "Resilience"). Replica i (from 0)
    # listens on port + i * replica_port_step and metrics_port + i * replica_port_step; replica 0 is
    # the address the other processes call directly. Kubernetes runs more pods instead (`replicas`)
    # and leaves this at 1. Not Compose's `--scale`: a ferry service's replicas would share one spool
    # folder and the second would refuse to start (docs/deploy.md, "Replicas").
    replicas: int = Field(default=1, ge=1)
    replica_port_step: int = Field(default=100, ge=1)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def replica_ports(self) -> list[tuple[int, int]]:
        """(gRPC port, metrics port) of each replica, replica 0 first."""
        step = self.replica_port_step
        return [(self.port + i * step, self.metrics_port + i * step) for i in range(self.replicas)]


class TritonSettings(BaseModel):
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    repository: Path = REPO_ROOT / "triton_models"
    default_model: str = "gemma-3-270m"
    # Models loaded at start-up (explicit model control): Gemma 3 (base), SmolLM2 (instruction-tuned) and
    # all-MiniLM-L6-v2 (embeddings, ONNX).
    load_models: list[str] = Field(
        default_factory=lambda: ["gemma-3-270m", "smollm2-135m-instruct", "all-minilm-l6-v2"]
    )

    # The secret ferry's processes show Triton: Triton answers inference, metadata, model-config,
    # repository (load/unload), statistics, shared-memory, trace and logging calls only with it (its
    # restricted protocols/APIs); health stays open for probes. `make run` makes a fresh one per start
    # when unset; Compose and Kubernetes pass one from a secret (docs/deploy.md).
    access_secret: SecretStr | None = None

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"


class UpstreamModel(BaseModel):
    """A model served by an OpenAI-compatible upstream server (LM Studio, vLLM, llama.cpp's server,
    OpenAI) instead of Triton. Its API key is never in a config file: an environment variable or a
    secret file names where it is."""

    model_config = ConfigDict(extra="forbid")

    # e.g. http://127.0.0.1:8081/v1 (the prefix the OpenAI SDK would take as base_url).
    base_url: str
    # The model's name at the upstream (default: ferry's name for it).
    upstream_model: str = ""
    api_key_env: str = ""
    api_key_file: Path | None = None
    connect_timeout_seconds: float = Field(default=5.0, gt=0)
    # Longest gap between two bytes of an answer (a whole generation may take longer).
    read_timeout_seconds: float = Field(default=60.0, gt=0)
    # Retries on connection errors, 429 and 5xx before the first byte, with exponential backoff.
    max_retries: int = Field(default=2, ge=0)
    max_connections: int = Field(default=16, ge=1)
    # Metadata the registry shows and the policy enforces, as a Triton model's config.pbtxt says it.
    context_length: int = Field(default=4096, ge=1)
    max_tokens: int = Field(default=4096, ge=1)
    owned_by: str = "upstream"
    capabilities: list[str] = Field(default_factory=lambda: ["completion", "chat"])
    # Requests in flight at the upstream at once (the admission gate's slots).
    max_in_flight: int = Field(default=4, ge=1)

    # Settings that would fail every request are refused at start, naming the field.
    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                "base_url must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:8081/v1"
            )
        return value.strip()

    @field_validator("capabilities")
    @classmethod
    def _known_capabilities(cls, value: list[str]) -> list[str]:
        # An upstream server is asked for generations only (ferry sends it no embedding requests).
        known = ", ".join(c for c in Capability if c in ALL_CAPABILITIES)
        names = [name.strip().lower() for name in value if name.strip()]
        unknown = [name for name in names if name not in ALL_CAPABILITIES]
        if unknown:
            raise ValueError(f"{', '.join(map(repr, unknown))} unknown; each capability is one of {known}")
        if not names:
            raise ValueError(f"capabilities must name at least one of {known}")
        return names

    @model_validator(mode="after")
    def _a_connection_per_request(self) -> UpstreamModel:
        # Each request in flight holds one pooled connection for its whole answer.
        if self.max_in_flight > self.max_connections:
            raise ValueError(
                f"max_in_flight ({self.max_in_flight}) must be at most max_connections"
                f" ({self.max_connections}): each request in flight holds a connection"
            )
        return self


class EnvoySettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8080
    admin_port: int = 9901
    # Largest request body accepted at the edge (413 beyond it).
    max_request_bytes: int = 4 * 1024 * 1024
    # Browser origins allowed by CORS (`*` for any); empty turns CORS off.
    cors_allow_origins: list[str] = Field(default_factory=list)
    # Proxies in front of Envoy whose X-Forwarded-For entries are trusted: the client address is the
    # entry that many hops from the right (0: the TCP peer, whatever the client sends).
    xff_num_trusted_hops: int = Field(default=0, ge=0)
    # Generations (every inference replica together) beyond which Envoy itself refuses at once with
    # the service's 429 / RESOURCE_EXHAUSTED OVERLOADED (docs/deploy.md, "Resilience"). 0: derived,
    # replicas x the sum over the repository's generation models of max_in_flight + max_queued; set it
    # where that is not known here (Kubernetes pods, a remote Triton) or never above what is served.
    generation_max_requests: int = Field(default=0, ge=0)


class TelemetrySettings(BaseModel):
    """Tracing (docs/observability.md). Off by default: `none` keeps the trace context in-process only
    (logs, records and Triton still get the trace id); `console` prints spans; `otlp` exports them over
    gRPC from every service and Envoy (whose tracer is configured only then)."""

    exporter: Literal["none", "console", "otlp"] = "none"
    otlp_endpoint: str = "http://127.0.0.1:4317"
    service_namespace: str = "ferry"
    # Head sampling of traces that start here (Envoy, or a service called directly): the share kept.
    # Parent-based: a caller's `traceparent` decides for its own trace (sampled flag honoured).
    sampling_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    # Prompts and generated text on spans (gen_ai.input.messages / gen_ai.output.messages); keys never.
    capture_content: bool = False
    # Triton exports its own spans over OTLP/HTTP only (e.g. http://127.0.0.1:4318/v1/traces); empty:
    # Triton does not trace.
    triton_otlp_http_endpoint: str = ""

    @property
    def enabled(self) -> bool:
        return self.exporter != "none"


class EmbeddingSettings(BaseModel):
    """Limits of one embeddings request (/v1/embeddings, :embed) and what its record keeps."""

    # Inputs per request (OpenAI's limit).
    max_inputs: int = Field(default=2048, ge=1)
    # UTF-8 bytes of all inputs together: a bound on the work one request asks for before any of it is
    # tokenised (a token is ~4 bytes of English; the model's own limit is per input).
    max_input_bytes: int = Field(default=1_000_000, ge=1)
    # Keep the vectors in the transaction record (its `output`, JSON); off: the inputs and usage only.
    record_vectors: bool = False


class ResponseCacheSettings(BaseModel):
    """The response cache of deterministic generations (temperature 0 or a fixed seed): identical
    requests to the same model version are answered from it (services/inference/response_cache.py)."""

    enabled: bool = True
    # The in-process LRU (always in front; the only store without `redis_url`): at most this many
    # answers and this many bytes of them.
    max_entries: int = Field(default=10_000, ge=1)
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    # An answer is kept this long (in every store).
    ttl_seconds: float = Field(default=3600.0, gt=0)
    # A Redis-compatible store shared by every Inference replica (`redis://host:6379/0`); empty: local
    # only. FERRY_INFERENCE__RESPONSE_CACHE__REDIS_URL, else the conventional REDIS_URL.
    redis_url: str = Field(default_factory=lambda: os.environ.get("REDIS_URL", ""))
    # Seconds a store call may take before it counts as an outage (the request then goes on as a miss).
    redis_timeout_seconds: float = Field(default=0.25, gt=0)
    # Answers larger than this (bytes) are not kept.
    max_entry_bytes: int = Field(default=1024 * 1024, ge=1)
    # Who a kept answer may be replayed to: "key", the API key (principal) that asked it (a hit never
    # tells one tenant what another asked); "everyone", any caller with access to the model.
    sharing: Literal["key", "everyone"] = "key"


class InferenceSettings(ServiceSettings):
    port: int = 50051
    metrics_port: int = 9101
    # In-flight generations admitted at once; 0 means the engine's slot count.
    max_in_flight: int = 0
    # Requests allowed to wait for a slot; beyond it the service answers RESOURCE_EXHAUSTED.
    max_queued: int = -1  # -1: 8 x in-flight
    # Slots per model a background request (a job's, `x-ferry-priority: background`) leaves free for
    # interactive ones: jobs run only on spare capacity (docs/jobs.md).
    background_reserve: int = Field(default=1, ge=0)
    # Global input limits (0: only the model's own); a key's limits may be lower, never higher.
    max_prompt_tokens: int = 0
    max_tokens: int = 0
    embeddings: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    response_cache: ResponseCacheSettings = Field(default_factory=ResponseCacheSettings)


class ModelsServiceSettings(ServiceSettings):
    port: int = 50052
    metrics_port: int = 9102


class TransactionsServiceSettings(ServiceSettings):
    port: int = 50053
    metrics_port: int = 9103


class AuditServiceSettings(ServiceSettings):
    port: int = 50054
    metrics_port: int = 9104


class GrammarsServiceSettings(ServiceSettings):
    """The grammar registry: grammars that generation requests name, checked by the engine on change."""

    port: int = 50056
    metrics_port: int = 9106


class ConversationsServiceSettings(ServiceSettings):
    """Stored chats (docs/conversations.md) and the web chat process (page + WebSocket) beside them."""

    port: int = 50058
    metrics_port: int = 9110
    # The web chat process (`python -m services.conversations.web`): the page at /chat/ and the
    # WebSocket at /chat/ws, both behind Envoy. Its own address (a container of its own in Compose and
    # Kubernetes: `conversations-web`); it reaches the service at host:port.
    web_host: str = "127.0.0.1"
    web_port: int = 8095


class JobsServiceSettings(ServiceSettings):
    """Asynchronous jobs (docs/jobs.md): the JobsService, its workers and the NATS bridge."""

    port: int = 50057
    metrics_port: int = 9107
    # Worker processes `make run` starts (each pulls from the one durable consumer).
    workers: int = Field(default=1, ge=0)
    # Jobs one worker runs at once.
    worker_concurrency: int = Field(default=2, ge=1)
    # Metrics of worker i (from 0) on worker_metrics_port + i.
    worker_metrics_port: int = 9108
    # Starts of one job before it is FAILED with the last error (redeliveries after a crash count).
    max_attempts: int = Field(default=3, ge=1)
    # JetStream's ack wait: a job whose worker stops answering is redelivered after this long.
    # Workers send in-progress acks while they generate, so a long generation is not redelivered.
    ack_wait_seconds: float = Field(default=30.0, gt=0)
    # How long a worker waits before asking again when the engine had no spare slot.
    busy_backoff_seconds: float = Field(default=0.5, gt=0)
    # Bound on one job's generation (the deadline of its Inference call).
    run_timeout_seconds: float = Field(default=600.0, gt=0)


def _without_userinfo(url: str) -> str:
    scheme, sep, rest = url.rpartition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"


class NatsSettings(BaseModel):
    """NATS with JetStream. Empty `url`: `make run` starts an embedded nats-server (storing under
    <home>/nats) on `port`; a URL (`nats://a:4222,nats://b:4222`) uses an existing cluster instead."""

    # FERRY_NATS__URL, else the conventional NATS_URL.
    url: str = Field(default_factory=lambda: os.environ.get("NATS_URL", ""))
    host: str = "127.0.0.1"
    port: int = 4250
    # The embedded server's monitoring endpoint (/healthz, /varz, /jsz): readiness and metrics.
    monitor_port: int = 8250
    # Replicas of ferry's streams: 1 embedded; 3 on a JetStream cluster.
    replicas: int = Field(default=1, ge=1, le=5)
    stream: str = "FERRY_JOBS"
    # Where queued jobs wait (a work-queue stream: one worker takes each).
    run_subject: str = "ferry.jobs.run"
    # NATS access: publish a CreateJobRequest here (JetStream); request-reply generation below.
    submit_subject: str = "ferry.jobs.submit"
    generate_prefix: str = "ferry.generate"
    # The embedded server's two users (docs/jobs.md, NATS permissions): `internal_user` (ferry's own
    # processes: jobs service, workers, bridge) may do everything; `client_user` (NATS clients) may only
    # submit jobs and request generations. The launcher makes fresh passwords per start; with `url` set,
    # `internal_password` (if any) is what ferry's processes log in with.
    internal_user: str = "ferry"
    internal_password: SecretStr | None = None
    client_user: str = "ferry-client"
    client_password: SecretStr | None = None

    @property
    def servers(self) -> list[str]:
        if self.url:
            return [u.strip() for u in self.url.split(",") if u.strip()]
        return [f"nats://{self.host}:{self.port}"]

    @property
    def shown_servers(self) -> list[str]:
        """`servers` without any user:password in them: what logs and banners may show."""
        return [_without_userinfo(server) for server in self.servers]

    @property
    def embedded(self) -> bool:
        return not self.url


class WebhookSource(BaseModel):
    """A sender whose signed webhooks `POST /api/v1/webhooks/{source}:ingest` turns into jobs
    (docs/webhooks.md): its Standard Webhooks secret, and how its payload becomes a job."""

    model_config = ConfigDict(extra="forbid")

    # The sender's signing secret, `whsec_<base64>` (Standard Webhooks).
    secret: SecretStr
    # How far a webhook-timestamp may be from now; at most the spec's (and the library's) 5 minutes.
    tolerance_seconds: int = Field(default=300, ge=1, le=300)
    # The job's request: `chat_completion` (the rendered text is the user message) or `completion`.
    api: Literal["chat_completion", "completion"] = "chat_completion"
    model: str
    # Jinja (sandboxed) rendering the prompt from `payload` (the JSON body), `source` and `webhook_id`.
    template: str
    # A system message put before the rendered one (chat_completion only).
    system: str = ""
    max_tokens: int = Field(default=256, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)

    @field_validator("secret")
    @classmethod
    def _standard_secret(cls, value: SecretStr) -> SecretStr:
        from standardwebhooks.webhooks import Webhook

        try:
            Webhook(value.get_secret_value())
        except Exception:
            raise ValueError("must be a Standard Webhooks secret, whsec_<base64>") from None
        return value


class WebhookSettings(BaseModel):
    """Job webhooks out (signed, retried, SSRF-guarded) and signed webhooks in (docs/webhooks.md)."""

    # Networks a webhook URL may resolve into although private, loopback, link-local, multicast or
    # unspecified (CIDRs, e.g. ["127.0.0.0/8", "::1/128"] for a receiver on the same machine).
    allowed_networks: list[str] = Field(default_factory=list)
    # Plain http:// receivers (https only when off).
    allow_http: bool = False
    # One delivery try: connect + send + the receiver's answer.
    timeout_seconds: float = Field(default=10.0, gt=0)
    # Retries: exponential (initial x multiplier^n, capped), +-jitter, until retry_for_seconds after the
    # event; defaults: 5 s, 20 s, 80 s, 5 min, 21 min, 85 min, then every 4 h, for 24 h.
    retry_initial_seconds: float = Field(default=5.0, gt=0)
    retry_multiplier: float = Field(default=4.0, ge=1.0)
    retry_max_interval_seconds: float = Field(default=4 * 3600.0, gt=0)
    retry_for_seconds: float = Field(default=24 * 3600.0, ge=0)
    retry_jitter: float = Field(default=0.2, ge=0.0, lt=1.0)
    # Due events are looked for this often (and at once when this process enqueues one).
    poll_seconds: float = Field(default=1.0, gt=0)
    max_in_flight: int = Field(default=8, ge=1)
    # How long a key's signing secret is reused before it is asked of the gateway again (a rotation
    # takes effect within it).
    secret_cache_seconds: float = Field(default=60.0, ge=0)
    # Sources of ingested webhooks, by the name in the URL.
    sources: dict[str, WebhookSource] = Field(default_factory=dict)

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not a network (CIDR, e.g. 127.0.0.0/8)") from None
        return value

    @field_validator("sources")
    @classmethod
    def _source_names(cls, value: dict[str, WebhookSource]) -> dict[str, WebhookSource]:
        import re

        for name in value:
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", name):
                raise ValueError(f"source name {name!r}: lower-case letters, digits, - and _ (at most 63)")
        return value


class GatewaySettings(ServiceSettings):
    """The gateway process: API keys, authorization decisions, rate limits, Envoy's ext_authz."""

    port: int = 50055
    metrics_port: int = 9105


_SWITCH = {
    "on": True,
    "true": True,
    "1": True,
    "yes": True,
    "off": False,
    "false": False,
    "0": False,
    "no": False,
}


class RateLimitSettings(BaseModel):
    """Defaults for keys without their own limits, and per client address; 0 means unlimited."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    per_address_requests_per_minute: int = 0
    per_address_tokens_per_minute: int = 0
    # Where counters live (the `limits` library's storage URI). `memory://` counts in the gateway
    # process: shared by every Envoy worker and service replica that uses that gateway. Several
    # machines share limits only through a shared store, e.g. `redis://host:6379`.
    storage: str = "memory://"


class AuthSettings(BaseModel):
    """API-key authentication. On unless turned off explicitly (`FERRY_AUTH=off`)."""

    enabled: bool = True
    # Secret shared by ferry's own processes (record delivery, authorization calls, Envoy's
    # forwarded client address). `make run` makes a fresh one per start when unset.
    service_token: SecretStr | None = None
    # How long the gateway trusts a key it looked up: the bound on how late a revocation made
    # through another gateway replica (or straight in the database) takes effect.
    cache_seconds: float = 2.0
    # Serving through a database outage (stale-if-error): a key the gateway read (looked up, or in its
    # background read of every working key: gateway/key_memory.py) keeps working this long after that
    # read, but only while the key store cannot answer; unknown
    # keys are refused with 503 meanwhile. It is also the bound on how late a revocation made through
    # another gateway replica (or in the database) takes effect when it falls in an outage. 0: off.
    stale_if_error_seconds: float = Field(default=300.0, ge=0)
    # How long a check of a key with a stale record waits for the store before it is answered from
    # that record (well below Envoy's 1 s ext_authz timeout). Not the outage threshold: the gateway
    # counts the store as down when a lookup fails or goes unanswered for 0.8 s (or this, if longer).
    key_store_timeout_seconds: float = Field(default=0.25, gt=0)
    # Edge leases (docs/deploy.md, "Edge leases"): after a key check allows a request, Envoy may admit
    # up to this many more requests of the same key, method and client address without asking the
    # gateway, for as long as the gateway would keep trusting its cached copy of the key (what is left
    # of cache_seconds), so the revocation bound stays cache_seconds. Each lease is counted against the
    # key's request limits when it is granted. 0: every request is checked by the gateway.
    edge_lease_requests: int = Field(default=256, ge=0)
    rate_limits: RateLimitSettings = Field(default_factory=RateLimitSettings)

    @model_validator(mode="before")
    @classmethod
    def _switch(cls, value: object) -> object:
        # `auth: off` in YAML (PyYAML reads it as False) or FERRY_AUTH=off.
        if isinstance(value, bool):
            return {"enabled": value}
        if isinstance(value, str) and value.strip().lower() in _SWITCH:
            return {"enabled": _SWITCH[value.strip().lower()]}
        return value


class DatabaseSettings(BaseModel):
    # `create_if_not_exists` keeps data; `drop_recreate` (development) deletes the owned tables at start.
    migration_mode: Literal["create_if_not_exists", "drop_recreate"] = "create_if_not_exists"
    pool_min_size: int = 1
    pool_max_size: int = 8
    connect_timeout_seconds: float = 5.0


class RecordingSettings(BaseModel):
    """The local spool through which every process delivers transaction records and audit events."""

    # Default: <home>/spool.
    spool_dir: Path | None = None
    # SQLite `synchronous`: NORMAL survives a killed process; FULL also a power cut (an fsync per record).
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    batch_size: int = 200
    # A started transaction waits this long for its outcome, so that a request finishing within it is
    # delivered as ONE record; a longer one is delivered as started, then completed. Both are on disk
    # from the start either way. 0: starts are delivered at once.
    merge_window_seconds: float = 1.0
    # After a new record wakes delivery, it waits this long so that what arrives meanwhile goes in
    # the same batch (one AppendEvents for many audit events; one BatchCreateTransactions /
    # BatchCompleteTransactions for many transaction records).
    batch_delay_seconds: float = 0.1
    # Health `ferry.recording` turns NOT_SERVING (the process stays SERVING) beyond either threshold.
    degraded_depth: int = 1000
    degraded_lag_seconds: float = 30.0
    max_backoff_seconds: float = 10.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FERRY_", env_nested_delimiter="__", extra="ignore")

    home: Path = REPO_ROOT / ".ferry"
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    # Seconds a stopping service waits for in-flight RPCs before it cancels them.
    drain_grace_seconds: float = 10.0
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("FERRY_DATABASE_URL", "DATABASE_URL")
    )
    # An admin key to create at start if it does not exist (`make run` otherwise makes one on first
    # start and writes it to <home>/admin.key).
    bootstrap_admin_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("FERRY_BOOTSTRAP_ADMIN_KEY", "bootstrap_admin_key"),
    )

    # Encrypts secrets ferry must keep readable (webhook signing secrets): 32 bytes as base64 or hex.
    # Unset: <home>/master.key, created owner-only on first use. Replicas must share one.
    master_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("FERRY_MASTER_KEY", "master_key")
    )
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    models: ModelsServiceSettings = Field(default_factory=ModelsServiceSettings)
    transactions: TransactionsServiceSettings = Field(default_factory=TransactionsServiceSettings)
    audit: AuditServiceSettings = Field(default_factory=AuditServiceSettings)
    grammars: GrammarsServiceSettings = Field(default_factory=GrammarsServiceSettings)
    jobs: JobsServiceSettings = Field(default_factory=JobsServiceSettings)
    conversations: ConversationsServiceSettings = Field(default_factory=ConversationsServiceSettings)
    nats: NatsSettings = Field(default_factory=NatsSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    triton: TritonSettings = Field(default_factory=TritonSettings)
    # Model names clients may use; empty: every model. Others are hidden from lists and refused
    # (NOT_FOUND, as for a model that does not exist).
    allowed_models: list[str] = Field(default_factory=list)
    # Extra names that resolve to a model (for clients that hard-code a model name): alias -> model.
    model_aliases: dict[str, str] = Field(default_factory=dict)
    # Models served by OpenAI-compatible upstream servers: ferry's model name -> where and how.
    upstream_models: dict[str, UpstreamModel] = Field(default_factory=dict)
    envoy: EnvoySettings = Field(default_factory=EnvoySettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    recording: RecordingSettings = Field(default_factory=RecordingSettings)

    @model_validator(mode="after")
    def _check_model_names(self) -> Settings:
        # A name no request could ever use is a mistake in the config: refused at start, by every process.
        problems = config_problems(
            self.allowed_models, self.model_aliases, self.upstream_models, self.triton.load_models
        )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win: explicit arguments, then the environment, then YAML, then defaults.
        return (
            init_settings,
            _EnvSource(settings_cls),
            YamlConfigSettingsSource(settings_cls, yaml_file=config_file()),
        )

    @property
    def model_dir(self) -> Path:
        return self.home / "models"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def spool_dir(self) -> Path:
        return self.recording.spool_dir or self.home / "spool"


class _EnvSource(EnvSettingsSource):
    """FERRY_* variables, where `FERRY_AUTH=off` (a switch, not JSON) turns authentication off."""

    def prepare_field_value(
        self, field_name: str, field: FieldInfo, value: object, value_is_complex: bool
    ) -> object:
        if field_name == "auth" and isinstance(value, str) and value.strip().lower() in _SWITCH:
            nested = self.explode_env_vars(field_name, field, self.env_vars)
            return {"enabled": _SWITCH[value.strip().lower()], **nested}
        return super().prepare_field_value(field_name, field, value, value_is_complex)


def config_file() -> Path | None:
    explicit = os.environ.get("FERRY_CONFIG")
    if explicit:
        return Path(explicit)
    local = Path("ferry.yaml")
    return local if local.exists() else None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
