"""The `ferry` command: parser, dispatch, and one-line errors with documented exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from ferry_client.cli import generation, keys, models, records, status
from ferry_client.cli.base import CliError, Exit, describe_error, target_of

EPILOG = """\
exit codes: 0 ok, 1 the request failed, 2 bad command line, 3 ferry unreachable or unavailable,
4 key refused or lacking the scope, 5 not healthy (status, audit verify, models load/unload),
130 interrupted. The API key comes from --api-key-file, else $FERRY_API_KEY, else <home>/admin.key
(home: $FERRY_HOME, else ./.ferry); never from the command line.
"""

# Options every command takes, before or after its name (`ferry --json models list`,
# `ferry models list --json`); SUPPRESS keeps a later level from resetting an earlier one.
DEFAULTS: dict[str, Any] = {
    "target": None,
    "api_key_file": None,
    "json": False,
    "timeout": 30.0,
    "tls": False,
    "ca_file": None,
}


def common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    options = common.add_argument_group("connection and output")
    options.add_argument(
        "--target",
        default=argparse.SUPPRESS,
        help="ferry's gRPC address (default: $FERRY_TARGET, else localhost:8080)",
    )
    options.add_argument(
        "--api-key-file",
        type=Path,
        default=argparse.SUPPRESS,
        help="file holding the API key (default: $FERRY_API_KEY, else <home>/admin.key)",
    )
    options.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document (for scripts)"
    )
    options.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help="deadline of each call (default: 30)",
    )
    options.add_argument("--tls", action="store_true", default=argparse.SUPPRESS, help="connect with TLS")
    options.add_argument(
        "--ca-file",
        type=Path,
        default=argparse.SUPPRESS,
        help="root certificates for TLS (PEM); implies --tls",
    )
    return common


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line and exit code 2, as argparse does, plus the hint
        self.print_usage(sys.stderr)
        print(f"ferry: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(Exit.USAGE)


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = Parser(
        prog="ferry",
        description="Operate ferry and talk to its models, over its public gRPC API.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND", parser_class=Parser)
    generation.add_parsers(groups, common)
    models.add_parser(groups, common)
    records.add_parsers(groups, common)
    keys.add_parser(groups, common)
    status.add_parser(groups, common)
    return parser


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name, value in DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    run: Callable[[argparse.Namespace], Exit] = args.run
    try:
        return int(run(args))
    except CliError as err:
        message, code = str(err), err.code
    except grpc.RpcError as err:
        failure = describe_error(err, target_of(args))
        message, code = str(failure), failure.code
    except KeyboardInterrupt:
        message, code = "interrupted", Exit.INTERRUPTED
    except BrokenPipeError:  # `ferry ... | head`: the reader left; nothing more to say
        sys.stderr.close()
        return int(Exit.OK)
    print(f"ferry: {message}", file=sys.stderr)
    return int(code)
