"""The TCP ports a stack listens on: which are needed, whether they are free, and picking free ones."""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass

from services.common.config import Settings

# Below Linux's default ephemeral range (32768-60999) and above well-known and common dev ports.
_PICK_RANGE = (20000, 32000)
_random = random.SystemRandom()


@dataclass(frozen=True)
class PortUse:
    setting: str  # dotted settings path, e.g. "envoy.admin_port"
    host: str
    port: int

    @property
    def env_var(self) -> str:
        return "FERRY_" + self.setting.upper().replace(".", "__")


def needed_ports(settings: Settings) -> list[PortUse]:
    uses = [
        PortUse("envoy.port", settings.envoy.host, settings.envoy.port),
        PortUse("envoy.admin_port", "127.0.0.1", settings.envoy.admin_port),
    ]
    for name in (
        "inference",
        "models",
        "transactions",
        "audit",
        "grammars",
        "jobs",
        "conversations",
        "gateway",
    ):
        service = getattr(settings, name)
        uses.append(PortUse(f"{name}.port", service.host, service.port))
        uses.append(PortUse(f"{name}.metrics_port", service.host, service.metrics_port))
        # More replicas (`make run`): each on the ports replica_port_step further on.
        for port, metrics_port in service.replica_ports()[1:]:
            uses.append(PortUse(f"{name}.replica_port_step", service.host, port))
            uses.append(PortUse(f"{name}.replica_port_step", service.host, metrics_port))
    conversations = settings.conversations
    uses.append(PortUse("conversations.web_port", conversations.web_host, conversations.web_port))
    jobs = settings.jobs
    for index in range(jobs.workers):
        # Worker i's metrics are on worker_metrics_port + i (the first one's setting names them all).
        uses.append(PortUse("jobs.worker_metrics_port", jobs.host, jobs.worker_metrics_port + index))
    if settings.nats.embedded:
        nats = settings.nats
        uses.append(PortUse("nats.port", nats.host, nats.port))
        uses.append(PortUse("nats.monitor_port", nats.host, nats.monitor_port))
    triton = settings.triton
    for field in ("grpc_port", "http_port", "metrics_port"):
        uses.append(PortUse(f"triton.{field}", triton.host, getattr(triton, field)))
    return uses


def is_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port and we may bind it (as the real server will)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # The servers set SO_REUSEADDR too, so TIME_WAIT leftovers do not count as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def taken_ports(settings: Settings) -> list[PortUse]:
    uses = needed_ports(settings)
    seen: dict[int, PortUse] = {}
    taken = []
    for use in uses:
        if use.port in seen:  # two settings naming one port: the second process could not bind
            taken.append(use)
        elif not is_free(use.host, use.port):
            taken.append(use)
        seen[use.port] = use
    return taken


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports that are free now, drawn at random below the kernel's ephemeral range.

    Ports the kernel hands out for port 0 come from the ephemeral range, where outgoing connections
    take their local ports too and could grab one before our server binds it; below it, they cannot.
    """
    low, high = _PICK_RANGE
    picked: list[int] = []
    while len(picked) < count:
        port = _random.randrange(low, high)
        if port not in picked and is_free(host, port):
            picked.append(port)
    return picked
