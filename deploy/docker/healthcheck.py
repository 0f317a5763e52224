"""Container HEALTHCHECK for a ferry service: the standard gRPC health protocol, overall status.

The service is named by $FERRY_SERVICE (inference, models, transactions, audit, grammars, jobs, gateway); its port comes from
the same Settings the service reads, so FERRY_* overrides move the check with the server. Exit 0 only
when the server answers SERVING, so `depends_on: service_healthy` waits for real readiness (a service
reports NOT_SERVING while its own dependencies are down or while it drains).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import ServiceSettings, Settings

SERVICES = ("inference", "models", "transactions", "audit", "grammars", "jobs", "gateway")
TIMEOUT_SECONDS = 2.0


def endpoint(settings: Settings, service: str) -> ServiceSettings:
    where: ServiceSettings = getattr(settings, service)
    return where


def probe_address(where: ServiceSettings) -> str:
    # A server bound to every interface is probed on loopback, from inside its own container.
    host = "127.0.0.1" if where.host in ("0.0.0.0", "::", "[::]") else where.host
    return f"{host}:{where.port}"


def check(address: str, service_name: str = "") -> bool:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=TIMEOUT_SECONDS)
        except grpc.RpcError as err:
            print(f"health check of {address} failed: {err.code().name}", file=sys.stderr)
            return False
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        print(
            f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", file=sys.stderr
        )
    return serving


def main() -> int:
    service = os.environ.get("FERRY_SERVICE", "")
    if service not in SERVICES:
        print(f"FERRY_SERVICE must be one of {', '.join(SERVICES)} (got {service!r})", file=sys.stderr)
        return 2
    return 0 if check(probe_address(endpoint(Settings(), service))) else 1


if __name__ == "__main__":
    sys.exit(main())
