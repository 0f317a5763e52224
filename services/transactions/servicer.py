"""TransactionsService over PostgreSQL: idempotent create/complete, get, and keyset-paginated list."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
from ferry.transactions.v1 import transactions_pb2, transactions_pb2_grpc
from google.protobuf import json_format, struct_pb2
from psycopg import AsyncCursor
from psycopg.rows import dict_row

from services.common import listing
from services.common.database import Database, nul_free
from services.common.errors import RpcError, invalid_argument, not_found
from services.common.names import REQUEST_ID, REQUEST_ID_RULE, TRANSACTIONS, is_request_id, resource_id
from services.common.timestamps import now, to_datetime, to_duration, to_micros, to_timestamp

Transaction = transactions_pb2.Transaction
_Status = Transaction.Status

FINAL = {
    _Status.STATUS_SUCCEEDED,
    _Status.STATUS_FAILED,
    _Status.STATUS_CANCELLED,
    _Status.STATUS_INCOMPLETE,
}


def _status_name(value: int) -> str:
    return _Status.Name(value).removeprefix("STATUS_")  # type: ignore[arg-type]


FILTER_FIELDS = {
    "model": listing.Field("model"),
    "principal": listing.Field("principal"),
    "operation": listing.Field("operation"),
    "request_id": listing.Field("request_id"),
    "trace_id": listing.Field("trace_id"),
    "finish_reason": listing.Field("finish_reason"),
    "status": listing.Field(
        "status",
        "enum",
        listing.enum_values(list(_Status.keys()), "STATUS_", lambda n: n.removeprefix("STATUS_")),
    ),
    "create_time": listing.Field("create_time", "time"),
    "complete_time": listing.Field("complete_time", "time"),
}
LISTED = listing.Table("transactions", FILTER_FIELDS, key=[("create_time", "time"), ("request_id", "text")])

COLUMNS = (
    "request_id, principal, model, operation, prompt, messages, parameters, output, finish_reason, "
    "prompt_tokens, completion_tokens, total_tokens, ttft_us, latency_us, status, error_code, "
    "error_message, trace_id, create_time, complete_time, cache_hit"
)


# A request id's record is its first try's, except that a try that did not succeed (failed, cancelled,
# incomplete) is replaced by a later try of the same request id: one that started after it ended.
# That is how a job's generation, retried under the job's id after its worker died, ends as one
# record of the try that answered (services/jobs). A redelivered copy of the first try's own record
# started before that end, so it never replaces anything. Only the same principal's try replaces a
# record: request ids are the callers' own, and another caller reusing one must not overwrite it.
RETRY_CONDITION = (
    "transactions.status IN ('FAILED', 'CANCELLED', 'INCOMPLETE') "
    "AND EXCLUDED.create_time > transactions.complete_time "
    "AND transactions.principal = EXCLUDED.principal"
)
RETRY_ASSIGNMENTS = ", ".join(
    f"{column} = EXCLUDED.{column}"
    for column in COLUMNS.replace(" ", "").split(",")
    if column != "request_id"
)


class TransactionsServicer(transactions_pb2_grpc.TransactionsServiceServicer):
    def __init__(self, db: Database) -> None:
        self.db = db

    async def CreateTransaction(
        self, request: transactions_pb2.CreateTransactionRequest, context: grpc.aio.ServicerContext
    ) -> Transaction:
        row = _create_row(request)
        async with self.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            return await _create(cur, row)

    async def BatchCreateTransactions(
        self, request: transactions_pb2.BatchCreateTransactionsRequest, context: grpc.aio.ServicerContext
    ) -> transactions_pb2.BatchCreateTransactionsResponse:
        rows = _batch(request.requests, _create_row)
        async with self.db.connection() as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            created = [await _create(cur, row) for row in rows]
        return transactions_pb2.BatchCreateTransactionsResponse(transactions=created)

    async def CompleteTransaction(
        self, request: transactions_pb2.CompleteTransactionRequest, context: grpc.aio.ServicerContext
    ) -> Transaction:
        request_id, values = _completion(request)
        async with self.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            return await _complete(cur, request_id, values)

    async def BatchCompleteTransactions(
        self, request: transactions_pb2.BatchCompleteTransactionsRequest, context: grpc.aio.ServicerContext
    ) -> transactions_pb2.BatchCompleteTransactionsResponse:
        completions = _batch(request.requests, _completion)
        async with self.db.connection() as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            completed = [await _complete(cur, request_id, values) for request_id, values in completions]
        return transactions_pb2.BatchCompleteTransactionsResponse(transactions=completed)

    async def GetTransaction(
        self, request: transactions_pb2.GetTransactionRequest, context: grpc.aio.ServicerContext
    ) -> Transaction:
        request_id = resource_id(request.name, TRANSACTIONS, REQUEST_ID)
        async with self.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            return await _stored(cur, request_id)

    async def ListTransactions(
        self, request: transactions_pb2.ListTransactionsRequest, context: grpc.aio.ServicerContext
    ) -> transactions_pb2.ListTransactionsResponse:
        rows, token = await LISTED.list(self.db, request)
        return transactions_pb2.ListTransactionsResponse(
            transactions=[_proto_from_row(r) for r in rows], next_page_token=token
        )


# The most requests one Batch* call may carry (the spool sends at most its batch_size).
MAX_BATCH = 1000
Request = TypeVar("Request")
Checked = TypeVar("Checked")


def _batch(requests: Sequence[Request], check: Callable[[Request], Checked]) -> list[Checked]:
    """Every request of a batch checked as its single call checks it; an error names its index."""
    if not requests:
        raise invalid_argument("requests", "must hold at least one request")
    if len(requests) > MAX_BATCH:
        raise invalid_argument("requests", f"must hold at most {MAX_BATCH} requests, got {len(requests)}")
    checked = []
    for index, item in enumerate(requests):
        try:
            checked.append(check(item))
        except RpcError as err:
            field, description = err.field_violations[0] if err.field_violations else ("", err.message)
            raise invalid_argument(
                f"requests[{index}]" + (f".{field}" if field else ""), description
            ) from err
    return checked


def _create_row(request: transactions_pb2.CreateTransactionRequest) -> dict[str, Any]:
    if not request.HasField("transaction"):
        raise invalid_argument("transaction", "is required")
    return _row_from_proto(request.transaction)


async def _create(cur: AsyncCursor[dict[str, Any]], row: dict[str, Any]) -> Transaction:
    placeholders = ", ".join(["%s"] * len(row))
    await cur.execute(
        f"INSERT INTO transactions ({COLUMNS}) VALUES ({placeholders}) "
        f"ON CONFLICT (request_id) DO UPDATE SET {RETRY_ASSIGNMENTS}, update_time = now() "
        f"WHERE {RETRY_CONDITION} RETURNING *",
        list(row.values()),
    )
    created = await cur.fetchone()
    if created is None:  # a retry, or the same id used twice: the first record wins (see RETRY_CONDITION)
        await cur.execute("SELECT * FROM transactions WHERE request_id = %s", (row["request_id"],))
        created = await cur.fetchone()
    assert created is not None
    return _proto_from_row(created)


def _completion(request: transactions_pb2.CompleteTransactionRequest) -> tuple[str, dict[str, Any]]:
    """The record's id and the columns a completion sets."""
    request_id = resource_id(request.name, TRANSACTIONS, REQUEST_ID)
    if request.status not in FINAL:
        raise invalid_argument("status", "must be a final status (not UNSPECIFIED or IN_PROGRESS)")
    usage = request.usage
    _check_usage(usage, "usage")
    values = {
        "status": _status_name(request.status),
        "output": nul_free(request.output),
        "finish_reason": nul_free(request.finish_reason),
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens or usage.prompt_tokens + usage.completion_tokens,
        "ttft_us": _micros_or_none(request, "time_to_first_token"),
        "latency_us": _micros_or_none(request, "latency"),
        "error_code": nul_free(request.error_code),
        "error_message": nul_free(request.error_message),
        "complete_time": (
            to_datetime(request.complete_time, "complete_time")
            if request.HasField("complete_time")
            else now()
        ),
    }
    return request_id, values


async def _complete(cur: AsyncCursor[dict[str, Any]], request_id: str, values: dict[str, Any]) -> Transaction:
    assignments = ", ".join(f"{k} = %s" for k in values)
    await cur.execute(
        f"UPDATE transactions SET {assignments}, update_time = now() "
        f"WHERE request_id = %s AND status = 'IN_PROGRESS' RETURNING *",
        [*values.values(), request_id],
    )
    row = await cur.fetchone()
    if row is None:  # already final (first completion wins) or unknown
        return await _stored(cur, request_id)
    return _proto_from_row(row)


async def _stored(cur: AsyncCursor[dict[str, Any]], request_id: str) -> Transaction:
    await cur.execute("SELECT * FROM transactions WHERE request_id = %s", (request_id,))
    row = await cur.fetchone()
    if row is None:
        raise not_found("transaction", f"{TRANSACTIONS}/{request_id}")
    return _proto_from_row(row)


def _check_usage(usage: Transaction.Usage, field: str) -> None:
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        if getattr(usage, name) < 0:
            raise invalid_argument(f"{field}.{name}", "must not be negative")


def _micros_or_none(message: Any, field: str, prefix: str = "") -> int | None:
    if not message.HasField(field):
        return None
    return to_micros(getattr(message, field), prefix + field)


def _row_from_proto(t: Transaction) -> dict[str, Any]:
    if not t.request_id:
        raise invalid_argument("transaction.request_id", "is required")
    if not is_request_id(t.request_id):
        raise invalid_argument("transaction.request_id", f"must be {REQUEST_ID_RULE}")
    if t.status == _Status.STATUS_UNSPECIFIED:
        raise invalid_argument("transaction.status", "is required")
    _check_usage(t.usage, "transaction.usage")
    try:
        # MessageToDict itself refuses NaN and Infinity (ValueError), before json.dumps would.
        parameters = json_format.MessageToDict(t.parameters) if t.HasField("parameters") else {}
        parameters_json = json.dumps(nul_free(parameters), allow_nan=False)
    except ValueError:
        raise invalid_argument("transaction.parameters", "numbers must be finite") from None
    create_time = (
        to_datetime(t.create_time, "transaction.create_time") if t.HasField("create_time") else now()
    )
    complete_time = None
    if t.HasField("complete_time"):
        complete_time = to_datetime(t.complete_time, "transaction.complete_time")
    elif t.status in FINAL:
        complete_time = now()
    usage = t.usage
    return {
        "request_id": t.request_id,
        "principal": nul_free(t.principal),
        "model": nul_free(t.model),
        "operation": nul_free(t.operation),
        "prompt": nul_free(t.prompt),
        "messages": json.dumps([nul_free({"role": m.role, "content": m.content}) for m in t.messages]),
        "parameters": parameters_json,
        "output": nul_free(t.output),
        "finish_reason": nul_free(t.finish_reason),
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens or usage.prompt_tokens + usage.completion_tokens,
        "ttft_us": _micros_or_none(t, "time_to_first_token", "transaction."),
        "latency_us": _micros_or_none(t, "latency", "transaction."),
        "status": _status_name(t.status),
        "error_code": nul_free(t.error_code),
        "error_message": nul_free(t.error_message),
        "trace_id": nul_free(t.trace_id),
        "create_time": create_time,
        "complete_time": complete_time,
        "cache_hit": t.cache_hit,
    }


def _proto_from_row(row: dict[str, Any]) -> Transaction:
    t = Transaction(
        name=f"transactions/{row['request_id']}",
        request_id=row["request_id"],
        principal=row["principal"],
        model=row["model"],
        operation=row["operation"],
        prompt=row["prompt"],
        messages=[Transaction.Message(role=m["role"], content=m["content"]) for m in row["messages"]],
        output=row["output"],
        finish_reason=row["finish_reason"],
        usage=Transaction.Usage(
            prompt_tokens=row["prompt_tokens"],
            completion_tokens=row["completion_tokens"],
            total_tokens=row["total_tokens"],
        ),
        status=_Status.Value(f"STATUS_{row['status']}"),  # type: ignore[arg-type]
        error_code=row["error_code"],
        error_message=row["error_message"],
        trace_id=row["trace_id"],
        create_time=to_timestamp(row["create_time"]),
        update_time=to_timestamp(row["update_time"]),
        cache_hit=row["cache_hit"],
    )
    if row["parameters"]:
        params = struct_pb2.Struct()
        params.update(_finite(row["parameters"]))
        t.parameters.CopyFrom(params)
    if row["ttft_us"] is not None:
        t.time_to_first_token.CopyFrom(to_duration(row["ttft_us"]))
    if row["latency_us"] is not None:
        t.latency.CopyFrom(to_duration(row["latency_us"]))
    if row["complete_time"] is not None:
        t.complete_time.CopyFrom(to_timestamp(row["complete_time"]))
    return t


def _finite(value: Any) -> Any:
    # jsonb numbers come back as Decimal for non-integers; Struct wants floats.
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    number = float(value)
    return number if math.isfinite(number) else None
