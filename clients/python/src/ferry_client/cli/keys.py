"""`ferry keys`: create, list, inspect and revoke API keys, and rotate their webhook secrets (admin)."""

from __future__ import annotations

import argparse
import re
import sys

from ferry.auth.v1 import auth_pb2
from ferry.keys.v1 import keys_pb2
from google.protobuf import duration_pb2

from ferry_client import Client, paginate
from ferry_client.cli.base import (
    CliError,
    Exit,
    as_dict,
    enum_name,
    fields_table,
    open_client,
    print_json,
    stdout,
    table,
    timestamp,
)
from ferry_client.errors import InvalidArgument, NotFound

SCOPES = ("inference", "read", "admin")
TTL = re.compile(r"^(\d+)([smhdw])$")
TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
SHOWN_ONCE = "store the secret now: it is not shown again (only its hash is kept)"


def parse_ttl(text: str) -> duration_pb2.Duration:
    match = TTL.match(text.strip())
    if not match or int(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: write a positive number and a unit, e.g. 90s, 12h, 30d")
    return duration_pb2.Duration(seconds=int(match.group(1)) * TTL_UNITS[match.group(2)])


def add_parser(groups: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    keys = groups.add_parser(
        "keys", parents=[common], help="create, list, inspect and revoke API keys (admin scope)"
    )
    commands = keys.add_subparsers(dest="command", required=True, metavar="COMMAND")

    create = commands.add_parser("create", parents=[common], help="create a key; its secret is printed once")
    create.add_argument("--name", required=True, help="a label for people: who or what uses the key")
    create.add_argument("--scope", action="append", required=True, choices=SCOPES, help="repeat for several")
    create.add_argument("--ttl", type=parse_ttl, help="lifetime, e.g. 12h, 30d (default: no expiry)")
    create.add_argument("--rpm", type=int, default=0, help="requests per minute (0: the default)")
    create.add_argument("--tpm", type=int, default=0, help="generated tokens per minute (0: the default)")
    create.add_argument("--max-tokens", type=int, default=0, help="largest max_tokens a request may ask")
    create.add_argument("--max-prompt-tokens", type=int, default=0, help="longest prompt, in tokens")

    listing = commands.add_parser("list", parents=[common], help="list keys (active ones unless --all)")
    listing.add_argument("--all", action="store_true", help="include revoked and expired keys")
    for name, text in (
        ("get", "show one key"),
        ("revoke", "revoke a key (calls with it are refused)"),
        ("rotate-webhook-secret", "give a key a new webhook signing secret, printed once"),
    ):
        command = commands.add_parser(name, parents=[common], help=text)
        command.add_argument("name", help="keys/<id>, <id>, or a display name that names one key")
    keys.set_defaults(run=run)


class Keys:
    def __init__(self, client: Client) -> None:
        self.stub = client.keys

    def create(self, args: argparse.Namespace) -> keys_pb2.Key:
        key = keys_pb2.Key(
            display_name=args.name,
            scopes=args.scope,
            limits=auth_pb2.Limits(
                requests_per_minute=args.rpm,
                tokens_per_minute=args.tpm,
                max_tokens=args.max_tokens,
                max_prompt_tokens=args.max_prompt_tokens,
            ),
        )
        if args.ttl is not None:
            key.ttl.CopyFrom(args.ttl)
        created: keys_pb2.Key = self.stub.CreateKey(keys_pb2.CreateKeyRequest(key=key))
        return created

    def list(self, show_inactive: bool) -> list[keys_pb2.Key]:
        request = keys_pb2.ListKeysRequest(page_size=1000, show_inactive=show_inactive)
        return list(paginate(self.stub.ListKeys, request, "keys"))

    def resolve(self, name: str) -> str:
        """`keys/<id>` for a resource name, a bare id, or a display name that names exactly one key.

        An existing id wins over a display name, so a label can never redirect a revoke to another key.
        """
        if name.startswith("keys/"):
            return name
        try:
            self.stub.GetKey(keys_pb2.GetKeyRequest(name=f"keys/{name}"))
            return f"keys/{name}"
        except (NotFound, InvalidArgument):
            pass  # not an id, or not even shaped like one: try labels
        by_label = [k.name for k in self.list(show_inactive=True) if k.display_name == name]
        if len(by_label) > 1:
            raise CliError(f"{len(by_label)} keys are named {name!r}; give the id: {', '.join(by_label)}")
        return by_label[0] if by_label else f"keys/{name}"


def limits_text(key: keys_pb2.Key) -> str:
    limits = {k: v for k, v in as_dict(key.limits).items() if v}
    return ", ".join(f"{k}={v}" for k, v in limits.items()) or "defaults"


def state_of(key: keys_pb2.Key) -> str:
    return enum_name(keys_pb2.Key.State.Name(key.state), "STATE_")


def show(key: keys_pb2.Key) -> None:
    rows = [
        ("name", key.name),
        ("display name", key.display_name),
        ("state", state_of(key)),
        ("scopes", ", ".join(key.scopes)),
        ("limits", limits_text(key)),
        ("created", timestamp(key, "create_time")),
        ("expires", timestamp(key, "expire_time") if key.HasField("expire_time") else "never"),
        ("created by", key.creator or "-"),
    ]
    if key.HasField("revoke_time"):
        rows.append(("revoked", timestamp(key, "revoke_time")))
    stdout.print(fields_table(rows))


def run(args: argparse.Namespace) -> Exit:
    with open_client(args, key_required=True) as client:
        keys = Keys(client)
        if args.command == "create":
            key = keys.create(args)
            if args.json:
                print_json(as_dict(key))
            else:
                show(key)
                stdout.print(f"\nsecret: {key.secret}")
                if key.HasField("webhook_secret"):
                    stdout.print(f"webhook secret: {key.webhook_secret}")
            print(f"ferry: {SHOWN_ONCE}", file=sys.stderr)
        elif args.command == "list":
            found = keys.list(args.all)
            if args.json:
                print_json([as_dict(k) for k in found])
            elif not found:
                stdout.print("no keys")
            else:
                grid = table("NAME", "DISPLAY NAME", "STATE", "SCOPES", "EXPIRES", "LIMITS")
                for k in found:
                    expires = timestamp(k, "expire_time") if k.HasField("expire_time") else "never"
                    grid.add_row(
                        k.name, k.display_name, state_of(k), ",".join(k.scopes), expires, limits_text(k)
                    )
                stdout.print(grid)
        else:
            name = keys.resolve(args.name)
            if args.command == "get":
                key = keys.stub.GetKey(keys_pb2.GetKeyRequest(name=name))
            elif args.command == "revoke":
                key = keys.stub.RevokeKey(keys_pb2.RevokeKeyRequest(name=name))
            else:
                key = keys.stub.RotateWebhookSecret(keys_pb2.RotateWebhookSecretRequest(name=name))
            if args.json:
                print_json(as_dict(key))
            else:
                show(key)
                if key.HasField("webhook_secret"):
                    stdout.print(f"\nwebhook secret: {key.webhook_secret}")
            if key.HasField("webhook_secret"):
                print("ferry: store the webhook secret now: it is not shown again", file=sys.stderr)
    return Exit.OK
