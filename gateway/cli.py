"""`ferry keys`: manage API keys from a shell, over gRPC to the gateway.

    python -m gateway.cli keys create --name ci --scope inference [--scope read] [--ttl 30d] [--rpm N]
    python -m gateway.cli keys list [--all]
    python -m gateway.cli keys get NAME        # keys/<id>, <id>, or a unique display name
    python -m gateway.cli keys revoke NAME

The admin key comes from `--api-key-file`, else `$FERRY_API_KEY`, else `<home>/admin.key`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from ferry.auth.v1 import auth_pb2
from ferry.keys.v1 import keys_pb2, keys_pb2_grpc
from google.protobuf import duration_pb2, json_format

from services.common.access import KEY_SCOPES
from services.common.config import get_settings

TIMEOUT_SECONDS = 10.0
TTL = re.compile(r"^(\d+)([smhdw])$")
TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# What a person should do about the refusals a key command meets.
HINTS = {
    grpc.StatusCode.UNAUTHENTICATED: "the admin key was refused; pass --api-key-file, set FERRY_API_KEY, "
    "or check <home>/admin.key",
    grpc.StatusCode.PERMISSION_DENIED: "this key lacks the admin scope needed to manage keys",
    grpc.StatusCode.UNAVAILABLE: "the gateway did not answer at {target}; is ferry running?",
}


class CliError(Exception):
    """A failure to report in one line (exit code 1)."""


def parse_ttl(text: str) -> duration_pb2.Duration:
    match = TTL.match(text.strip())
    if not match or int(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: write a positive number and a unit, e.g. 90s, 12h, 30d")
    return duration_pb2.Duration(seconds=int(match.group(1)) * TTL_UNITS[match.group(2)])


def admin_key(key_file: Path | None) -> str:
    # Never a secret on the command line: argv shows in `ps` and shell history.
    if key_file is not None:
        try:
            return key_file.read_text().strip()
        except OSError as exc:
            raise CliError(f"cannot read --api-key-file {key_file}: {exc.strerror}") from None
    if os.environ.get("FERRY_API_KEY"):
        return os.environ["FERRY_API_KEY"]
    path = get_settings().home / "admin.key"
    try:
        return Path(path).read_text().strip()
    except OSError:
        raise CliError(f"no admin key: pass --api-key-file, set FERRY_API_KEY, or create {path}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferry", description="Manage ferry's API keys.")
    groups = parser.add_subparsers(dest="group", required=True)
    keys = groups.add_parser("keys", help="create, list, inspect and revoke API keys")
    # Options every command takes, after its name (`keys list --json`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", help="gateway address (default: settings gateway.address)")
    common.add_argument(
        "--api-key-file",
        type=Path,
        help="file holding the admin key (default: $FERRY_API_KEY, else <home>/admin.key)",
    )
    common.add_argument("--json", action="store_true", help="print JSON")
    commands = keys.add_subparsers(dest="command", required=True)

    create = commands.add_parser("create", parents=[common], help="create a key; its secret is printed once")
    create.add_argument("--name", required=True, help="a label for people: who or what uses the key")
    create.add_argument(
        "--scope", action="append", required=True, choices=KEY_SCOPES, help="repeat for several"
    )
    create.add_argument("--ttl", type=parse_ttl, help="lifetime, e.g. 12h, 30d (default: no expiry)")
    create.add_argument("--rpm", type=int, default=0, help="requests per minute (0: the default)")
    create.add_argument("--tpm", type=int, default=0, help="generated tokens per minute (0: the default)")
    create.add_argument("--max-tokens", type=int, default=0, help="largest max_tokens a request may ask")
    create.add_argument("--max-prompt-tokens", type=int, default=0, help="longest prompt, in tokens")

    listing = commands.add_parser("list", parents=[common], help="list keys (active ones unless --all)")
    listing.add_argument("--all", action="store_true", help="include revoked and expired keys")
    for name, text in (("get", "show one key"), ("revoke", "revoke a key (calls with it are refused)")):
        command = commands.add_parser(name, parents=[common], help=text)
        command.add_argument("name", help="keys/<id>, <id>, or a display name that names one key")
    return parser


class Keys:
    def __init__(self, stub: keys_pb2_grpc.KeysServiceStub, metadata: Sequence[tuple[str, str]]) -> None:
        self.stub = stub
        self.metadata = tuple(metadata)

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
        return self.stub.CreateKey(  # type: ignore[no-any-return]
            keys_pb2.CreateKeyRequest(key=key), metadata=self.metadata, timeout=TIMEOUT_SECONDS
        )

    def list(self, show_inactive: bool) -> list[keys_pb2.Key]:
        keys: list[keys_pb2.Key] = []
        token = ""
        while True:
            page = self.stub.ListKeys(
                keys_pb2.ListKeysRequest(page_size=1000, page_token=token, show_inactive=show_inactive),
                metadata=self.metadata,
                timeout=TIMEOUT_SECONDS,
            )
            keys.extend(page.keys)
            token = page.next_page_token
            if not token:
                return keys

    def resolve(self, name: str) -> str:
        """`keys/<id>` for a resource name, a bare id, or a display name that names exactly one key.

        An existing id wins over a display name, so a label can never redirect a revoke to another key.
        """
        if name.startswith("keys/"):
            return name
        try:
            self.stub.GetKey(
                keys_pb2.GetKeyRequest(name=f"keys/{name}"), metadata=self.metadata, timeout=TIMEOUT_SECONDS
            )
            return f"keys/{name}"
        except grpc.RpcError as err:
            # Not an id (NOT_FOUND), or not even shaped like one (INVALID_ARGUMENT): try labels.
            if err.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):  # type: ignore[attr-defined]
                raise
        by_label = [k.name for k in self.list(show_inactive=True) if k.display_name == name]
        if len(by_label) > 1:
            raise CliError(f"{len(by_label)} keys are named {name!r}; give the id: {', '.join(by_label)}")
        return by_label[0] if by_label else f"keys/{name}"

    def get(self, name: str) -> keys_pb2.Key:
        return self.stub.GetKey(  # type: ignore[no-any-return]
            keys_pb2.GetKeyRequest(name=self.resolve(name)), metadata=self.metadata, timeout=TIMEOUT_SECONDS
        )

    def revoke(self, name: str) -> keys_pb2.Key:
        return self.stub.RevokeKey(  # type: ignore[no-any-return]
            keys_pb2.RevokeKeyRequest(name=self.resolve(name)),
            metadata=self.metadata,
            timeout=TIMEOUT_SECONDS,
        )


def as_dict(key: keys_pb2.Key) -> dict[str, object]:
    return json_format.MessageToDict(key, preserving_proto_field_name=True)


def describe(key: keys_pb2.Key) -> str:
    state = keys_pb2.Key.State.Name(key.state).removeprefix("STATE_").lower()
    expires = key.expire_time.ToJsonString() if key.HasField("expire_time") else "never"
    limits = ", ".join(f"{k}={v}" for k, v in as_dict(key).get("limits", {}).items())  # type: ignore[attr-defined]
    lines = [
        f"{key.name}  {key.display_name!r}  {state}",
        f"  scopes: {', '.join(key.scopes)}   expires: {expires}   created by: {key.creator or '-'}",
    ]
    if limits:
        lines.append(f"  limits: {limits}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    target = args.target or get_settings().gateway.address
    metadata = (("authorization", f"Bearer {admin_key(args.api_key_file)}"),)
    with grpc.insecure_channel(target) as channel:
        keys = Keys(keys_pb2_grpc.KeysServiceStub(channel), metadata)
        try:
            if args.command == "create":
                key = keys.create(args)
                if args.json:
                    print(json.dumps(as_dict(key), indent=2))
                else:
                    print(describe(key))
                    print(f"\nsecret: {key.secret}")
                print("store the secret now: it is not shown again (only its hash is kept)", file=sys.stderr)
            elif args.command == "list":
                found = keys.list(args.all)
                if args.json:
                    print(json.dumps([as_dict(k) for k in found], indent=2))
                else:
                    print("\n".join(describe(k) for k in found) or "no keys")
            else:
                key = keys.get(args.name) if args.command == "get" else keys.revoke(args.name)
                print(json.dumps(as_dict(key), indent=2) if args.json else describe(key))
        except grpc.RpcError as err:
            code = err.code()  # type: ignore[attr-defined]
            hint = HINTS.get(code, "").format(target=target)
            message = f"{code.name}: {err.details()}"  # type: ignore[attr-defined]
            raise CliError(f"{message}\n{hint}" if hint else message) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except CliError as err:
        print(f"ferry: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
