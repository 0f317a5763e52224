"""`ferry models`: list, inspect, load and unload models (loading and unloading: admin scope)."""

from __future__ import annotations

import argparse
import time

from ferry.models.v1 import models_pb2

from ferry_client import Client, paginate
from ferry_client.cli.base import (
    CliError,
    Exit,
    Progress,
    as_dict,
    enum_name,
    fields_table,
    open_client,
    print_json,
    stdout,
    table,
    while_waiting,
)

Model = models_pb2.Model


def add_parser(groups: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    models = groups.add_parser("models", parents=[common], help="list, inspect, load and unload models")
    commands = models.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", parents=[common], help="every model with its state")
    for name, text in (
        ("get", "one model in full"),
        ("load", "load (or reload) a model and wait until it is ready (admin)"),
        ("unload", "unload a model and wait until it is gone (admin)"),
    ):
        command = commands.add_parser(name, parents=[common], help=text)
        command.add_argument("model", help="model id or models/<id>")
        if name in ("load", "unload"):
            command.add_argument(
                "--wait",
                type=float,
                default=300.0,
                metavar="SECONDS",
                help="how long to wait for the model's state (default: 300)",
            )
    models.set_defaults(run=run)


def resource(model: str) -> str:
    return model if model.startswith("models/") else f"models/{model}"


def state_of(model: models_pb2.Model) -> str:
    return enum_name(Model.State.Name(model.state), "STATE_")


def list_models(client: Client) -> list[models_pb2.Model]:
    return list(paginate(client.models.ListModels, models_pb2.ListModelsRequest(page_size=1000), "models"))


def show(model: models_pb2.Model) -> None:
    rows = [
        ("name", model.name),
        ("state", state_of(model) + (f" ({model.state_reason})" if model.state_reason else "")),
        ("version", model.version or "-"),
        ("provider", enum_name(Model.Provider.Name(model.provider), "PROVIDER_")),
        ("backend", model.backend or "-"),
        (
            "family",
            " ".join(x for x in (model.family, model.parameter_count, model.quantization) if x) or "-",
        ),
        ("capabilities", ", ".join(model.capabilities) or "-"),
        ("context length", str(model.context_length or "-")),
        ("max tokens", str(model.max_tokens or "-")),
        ("aliases", ", ".join(model.aliases) or "-"),
        ("owned by", model.owned_by or "-"),
    ]
    if model.dimensions:
        rows.append(("dimensions", str(model.dimensions)))
    stdout.print(fields_table(rows))


def change(client: Client, args: argparse.Namespace) -> models_pb2.Model:
    """Loads or unloads, showing the model's state until it is the one asked for (or the wait ends)."""
    name = resource(args.model)
    loading = args.command == "load"
    wanted = Model.STATE_READY if loading else Model.STATE_UNAVAILABLE
    timeout = max(args.wait, 1.0)
    with Progress(f"{'loading' if loading else 'unloading'} {name}") as progress:

        def look() -> models_pb2.Model:
            model: models_pb2.Model = client.models.GetModel(models_pb2.GetModelRequest(name=name))
            progress.update(state_of(model))
            return model

        model: models_pb2.Model
        if loading:
            request = models_pb2.LoadModelRequest(name=name)
            model = while_waiting(lambda: client.models.LoadModel(request, timeout=timeout), look)
        else:
            unload = models_pb2.UnloadModelRequest(name=name)
            model = while_waiting(lambda: client.models.UnloadModel(unload, timeout=timeout), look)
        progress.update(state_of(model))
        # Triton unloads in the background: the answer may still say UNLOADING (or READY).
        deadline = time.monotonic() + timeout
        while model.state != wanted and time.monotonic() < deadline:
            time.sleep(0.5)
            model = look()
    if model.state != wanted:
        reason = f": {model.state_reason}" if model.state_reason else ""
        raise CliError(
            f"{name} is {state_of(model)}{reason} after {progress.elapsed:.1f} s "
            f"(wanted {enum_name(Model.State.Name(wanted), 'STATE_')})",
            Exit.UNHEALTHY,
        )
    return model


def run(args: argparse.Namespace) -> Exit:
    with open_client(args) as client:
        if args.command == "list":
            found = list_models(client)
            if args.json:
                print_json([as_dict(m) for m in found])
                return Exit.OK
            grid = table("MODEL", "STATE", "BACKEND", "CONTEXT", "MAX TOKENS", "CAPABILITIES", "ALIASES")
            for m in found:
                grid.add_row(
                    m.model_id or m.name.removeprefix("models/"),
                    state_of(m),
                    m.backend or "-",
                    str(m.context_length or "-"),
                    str(m.max_tokens or "-"),
                    ",".join(m.capabilities) or "-",
                    ",".join(m.aliases) or "-",
                )
            stdout.print(grid if found else "no models")
            return Exit.OK
        if args.command == "get":
            model = client.models.GetModel(models_pb2.GetModelRequest(name=resource(args.model)))
        else:
            model = change(client, args)
        if args.json:
            print_json(as_dict(model))
        else:
            show(model)
    return Exit.OK
