"""`ferry transactions` and `ferry audit`: the records every request leaves (read scope)."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterable
from typing import Any

from ferry.audit.v1 import audit_pb2
from ferry.transactions.v1 import transactions_pb2

from ferry_client import paginate
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
    timestamp,
    while_waiting,
)

Transaction = transactions_pb2.Transaction


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive whole number")
    return value


def add_listing_options(command: argparse.ArgumentParser, order_field: str) -> None:
    command.add_argument("--filter", default="", help="AIP-160 filter, e.g. 'model = \"x\" AND ...'")
    command.add_argument(
        "--oldest-first",
        action="store_true",
        help=f"order by {order_field} ascending (default: newest first)",
    )
    command.add_argument("--limit", type=positive, default=20, metavar="N", help="at most N (default: 20)")
    command.add_argument("--all", action="store_true", help="every match, page after page (no --limit)")


def add_parsers(groups: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    transactions = groups.add_parser(
        "transactions", parents=[common], help="the record of every inference request"
    )
    commands = transactions.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_listing_options(commands.add_parser("list", parents=[common], help="newest first"), "create_time")
    get = commands.add_parser("get", parents=[common], help="one record in full")
    get.add_argument("id", help="request id or transactions/<id>")
    transactions.set_defaults(run=run_transactions)

    audit = groups.add_parser("audit", parents=[common], help="the hash-chained audit trail")
    commands = audit.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_listing_options(commands.add_parser("list", parents=[common], help="newest first"), "sequence")
    commands.add_parser("verify", parents=[common], help="walk the whole chain; exit 5 when a link is broken")
    audit.set_defaults(run=run_audit)


def limited(items: Iterable[Any], args: argparse.Namespace) -> list[Any]:
    return list(items if args.all else itertools.islice(items, args.limit))


def page_size(args: argparse.Namespace) -> int:
    return 1000 if args.all else min(args.limit, 1000)


def seconds(message: Any, field: str) -> str:
    if not message.HasField(field):
        return "-"
    return f"{getattr(message, field).ToNanoseconds() / 1e9:.3f} s"


# -- transactions ----------------------------------------------------------------------------------


def status_of(record: transactions_pb2.Transaction) -> str:
    return enum_name(Transaction.Status.Name(record.status), "STATUS_")


def show_transaction(record: transactions_pb2.Transaction) -> None:
    rows = [
        ("name", record.name),
        ("status", status_of(record)),
        ("model", record.model),
        ("operation", record.operation),
        ("principal", record.principal),
        ("created", timestamp(record, "create_time")),
        ("completed", timestamp(record, "complete_time")),
        ("first token after", seconds(record, "time_to_first_token")),
        ("latency", seconds(record, "latency")),
        (
            "tokens",
            f"{record.usage.prompt_tokens} in, {record.usage.completion_tokens} out",
        ),
        ("finish reason", record.finish_reason or "-"),
    ]
    if record.error_code:
        rows.append(("error", f"{record.error_code}: {record.error_message}"))
    if record.trace_id:
        rows.append(("trace id", record.trace_id))
    if record.prompt:
        rows.append(("prompt", record.prompt))
    for message in record.messages:
        rows.append((message.role, message.content))
    rows.append(("output", record.output))
    stdout.print(fields_table(rows))


def run_transactions(args: argparse.Namespace) -> Exit:
    with open_client(args) as client:
        stub = client.transactions
        if args.command == "get":
            name = args.id if args.id.startswith("transactions/") else f"transactions/{args.id}"
            record = stub.GetTransaction(transactions_pb2.GetTransactionRequest(name=name))
            if args.json:
                print_json(as_dict(record))
            else:
                show_transaction(record)
            return Exit.OK
        request = transactions_pb2.ListTransactionsRequest(
            page_size=page_size(args),
            filter=args.filter,
            order_by="create_time" if args.oldest_first else "",
        )
        found = limited(paginate(stub.ListTransactions, request, "transactions"), args)
        if args.json:
            print_json([as_dict(r) for r in found])
            return Exit.OK
        grid = table("REQUEST ID", "CREATED", "MODEL", "STATUS", "TOKENS IN/OUT", "LATENCY", "PRINCIPAL")
        for r in found:
            grid.add_row(
                r.request_id,
                timestamp(r, "create_time"),
                r.model,
                status_of(r),
                f"{r.usage.prompt_tokens}/{r.usage.completion_tokens}",
                seconds(r, "latency"),
                r.principal,
            )
        stdout.print(grid if found else "no transactions")
    return Exit.OK


# -- audit -----------------------------------------------------------------------------------------


def code_name(event: audit_pb2.AuditEvent) -> str:
    return as_dict(event).get("code", "OK") or "OK"


def run_audit(args: argparse.Namespace) -> Exit:
    with open_client(args) as client:
        stub = client.audit
        if args.command == "verify":
            return verify(client.audit, args)
        request = audit_pb2.ListEventsRequest(
            page_size=page_size(args),
            filter=args.filter,
            order_by="sequence" if args.oldest_first else "",
        )
        found: list[audit_pb2.AuditEvent] = limited(paginate(stub.ListEvents, request, "events"), args)
        if args.json:
            print_json([as_dict(e) for e in found])
            return Exit.OK
        grid = table("SEQ", "TIME", "PRINCIPAL", "ACTION", "WHAT", "CODE", "SOURCE")
        for e in found:
            what = f"{e.service.rsplit('.', 1)[-1]}/{e.method}" if e.method else e.resource or "-"
            if e.method and e.resource:
                what += f" {e.resource}"
            grid.add_row(
                str(e.sequence),
                timestamp(e, "event_time"),
                e.principal,
                e.action,
                what,
                code_name(e),
                e.source,
            )
        stdout.print(grid if found else "no audit events")
    return Exit.OK


def head_sequence(stub: Any) -> int:
    """The newest event's sequence: how long the chain is (before the walk)."""
    page = stub.ListEvents(audit_pb2.ListEventsRequest(page_size=1))
    return int(page.events[0].sequence) if page.events else 0


def verify(stub: Any, args: argparse.Namespace) -> Exit:
    # VerifyChain is one unary call that walks the chain on the server: the wait shows how many events
    # it walks and for how long (the API reports no progress of its own).
    length = head_sequence(stub)
    # Walking a long chain takes longer than an ordinary call's deadline.
    deadline = max(args.timeout, 600.0)
    with Progress(f"verifying the audit chain ({length} events)") as progress:
        result = while_waiting(
            lambda: stub.VerifyChain(audit_pb2.VerifyChainRequest(), timeout=deadline),
            lambda: progress.update("walking"),
        )
    if args.json:
        print_json(as_dict(result))
    elif result.valid:
        stdout.print(
            f"valid: {result.checked_count} events checked in {progress.elapsed:.1f} s; head "
            f"#{result.head_sequence} {result.head_hash}"
        )
    else:
        problem = enum_name(audit_pb2.VerifyChainResponse.Problem.Name(result.problem), "PROBLEM_")
        stdout.print(
            fields_table(
                [
                    ("valid", "no"),
                    ("problem", problem.replace("_", " ")),
                    ("broken at", f"#{result.broken_sequence} {result.broken_event or '(gone)'}"),
                    ("checked", f"{result.checked_count} events"),
                    ("description", result.description),
                    ("head", f"#{result.head_sequence} {result.head_hash}"),
                ]
            )
        )
    if not result.valid:
        if args.json:
            return Exit.UNHEALTHY
        raise CliError(f"the audit chain is broken at #{result.broken_sequence}", Exit.UNHEALTHY)
    return Exit.OK
