"""`ferry status`: whether every service answers SERVING (grpc.health.v1) and every model's state."""

from __future__ import annotations

import argparse
from typing import Any

import grpc
from ferry.models.v1 import models_pb2
from grpc_health.v1 import health_pb2
from rich.markup import escape

from ferry_client import Client
from ferry_client.cli.base import Exit, describe_error, open_client, print_json, stdout, table, target_of
from ferry_client.cli.models import list_models, state_of
from ferry_client.errors import FerryError

# Each process behind Envoy, by its cluster name, and the service its health is asked about. A health
# check carrying `x-ferry-health-service: <cluster>` is routed by Envoy to that process (one without
# the header reaches the gateway, Envoy's default route).
SERVICES = (
    ("inference", "ferry.inference.v1.InferenceService"),
    ("models", "ferry.models.v1.ModelsService"),
    ("transactions", "ferry.transactions.v1.TransactionsService"),
    ("audit", "ferry.audit.v1.AuditService"),
    ("grammars", "ferry.grammars.v1.GrammarsService"),
    ("jobs", "ferry.jobs.v1.JobsService"),
    ("conversations", "ferry.conversations.v1.ConversationsService"),
    ("gateway", "ferry.keys.v1.KeysService"),
)
ROUTING_HEADER = "x-ferry-health-service"
HEALTH_TIMEOUT_SECONDS = 5.0


def add_parser(groups: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    status = groups.add_parser(
        "status",
        parents=[common],
        help="health of every service and every model's state; exit 5 when something is not serving",
    )
    status.set_defaults(run=run)


def service_health(client: Client, cluster: str, service: str) -> dict[str, str]:
    try:
        reply = client.health.Check(
            health_pb2.HealthCheckRequest(service=service),
            metadata=((ROUTING_HEADER, cluster),),
            timeout=HEALTH_TIMEOUT_SECONDS,
        )
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        detail = ""
    except grpc.RpcError as err:
        code = err.code()
        # NOT_FOUND: the process does not serve that service (or this ferry has no such process).
        status = "UNKNOWN" if code == grpc.StatusCode.NOT_FOUND else "UNREACHABLE"
        detail = f"{code.name}: {err.details()}"
    return {"name": cluster, "service": service, "status": status, "detail": detail}


def run(args: argparse.Namespace) -> Exit:
    with open_client(args) as client:
        services = [service_health(client, cluster, name) for cluster, name in SERVICES]
        if all(s["status"] == "UNREACHABLE" for s in services):
            # Nothing answered at all: the target is wrong or ferry is down (exit 3, one line).
            try:
                client.health.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_SECONDS)
            except grpc.RpcError as err:
                raise describe_error(err, target_of(args)) from None
        models: list[dict[str, Any]] = []
        models_error = ""
        try:
            models = [
                {
                    "name": m.model_id or m.name.removeprefix("models/"),
                    "state": models_pb2.Model.State.Name(m.state),
                    "state_reason": m.state_reason,
                    "backend": m.backend,
                    "ready": m.state == models_pb2.Model.STATE_READY,
                }
                for m in list_models(client)
            ]
        except FerryError as err:
            models_error = f"{err.code().name}: {err.message}"
    # Absent processes (a deployment without conversations, say) are not failures; the rest must serve.
    serving = all(s["status"] in ("SERVING", "UNKNOWN") for s in services)
    healthy = serving and not models_error and all(m["ready"] for m in models)
    if args.json:
        document: dict[str, Any] = {
            "healthy": healthy,
            "target": target_of(args),
            "services": services,
            "models": models,
        }
        if models_error:
            document["models_error"] = models_error
        print_json(document)
    else:
        grid = table("SERVICE", "STATUS", "DETAIL")
        for s in services:
            style = "green" if s["status"] == "SERVING" else "dim" if s["status"] == "UNKNOWN" else "red"
            grid.add_row(
                s["name"], f"[{style}]{s['status'].lower().replace('_', ' ')}[/]", escape(s["detail"])
            )
        stdout.print(grid)
        stdout.print()
        if models_error:
            stdout.print(f"models: [red]{escape(models_error)}[/]")
        else:
            grid = table("MODEL", "STATE", "BACKEND", "REASON")
            for m in models:
                style = "green" if m["ready"] else "red"
                state = state_of(models_pb2.Model(state=models_pb2.Model.State.Value(m["state"])))
                grid.add_row(
                    m["name"], f"[{style}]{state}[/]", m["backend"] or "-", escape(m["state_reason"])
                )
            stdout.print(grid if models else "no models")
        stdout.print()
        stdout.print("[green]all serving[/]" if healthy else "[red]not everything is serving[/]")
    return Exit.OK if healthy else Exit.UNHEALTHY
