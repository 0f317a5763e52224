"""TransactionsService against real PostgreSQL: idempotent create/complete, get, list, bad input."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from ferry.transactions.v1 import transactions_pb2 as tx
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from services.common.errors import error_details

Status = tx.Transaction.Status


def _ts(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def _new(**fields: Any) -> tx.Transaction:
    fields.setdefault("request_id", uuid.uuid4().hex)
    fields.setdefault("status", Status.STATUS_IN_PROGRESS)
    return tx.Transaction(**fields)


async def _create(stub: Any, **fields: Any) -> tx.Transaction:
    reply: tx.Transaction = await stub.CreateTransaction(
        tx.CreateTransactionRequest(transaction=_new(**fields))
    )
    return reply


async def _fails(call: Any, code: grpc.StatusCode, field: str | None = None) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    if field is not None:
        bad = error_details(info.value)["BadRequest"]
        assert [v.field for v in bad.field_violations] == [field]  # type: ignore[attr-defined]


async def test_create_is_idempotent_on_request_id(transactions: Any) -> None:
    rid = uuid.uuid4().hex
    first = await _create(
        transactions,
        request_id=rid,
        model="gemma-3-270m",
        principal="alice",
        prompt="Hello",
        parameters={"temperature": 0.5, "max_tokens": 16},
        trace_id="ab" * 16,
    )
    assert first.name == f"transactions/{rid}"
    assert first.status == Status.STATUS_IN_PROGRESS
    assert dict(first.parameters) == {"temperature": 0.5, "max_tokens": 16}
    # A retry, even one carrying different content, returns the first record unchanged.
    again = await _create(transactions, request_id=rid, model="other", principal="mallory", prompt="changed")
    assert again == first
    got = await transactions.GetTransaction(tx.GetTransactionRequest(name=first.name))
    assert got == first


async def test_complete_once_first_completion_wins(transactions: Any) -> None:
    created = await _create(
        transactions,
        model="gemma-3-270m",
        messages=[tx.Transaction.Message(role="user", content="Hi")],
    )
    done = await transactions.CompleteTransaction(
        tx.CompleteTransactionRequest(
            name=created.name,
            status=Status.STATUS_SUCCEEDED,
            output="Hello there",
            finish_reason="stop",
            usage=tx.Transaction.Usage(prompt_tokens=5, completion_tokens=3),
            time_to_first_token=duration_pb2.Duration(nanos=250_000_000),
            latency=duration_pb2.Duration(seconds=1, nanos=500_000_000),
        )
    )
    assert done.status == Status.STATUS_SUCCEEDED
    assert (done.output, done.finish_reason) == ("Hello there", "stop")
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (5, 3, 8)
    assert done.time_to_first_token.ToMilliseconds() == 250
    assert done.latency.ToMilliseconds() == 1500
    assert done.HasField("complete_time")
    assert [(m.role, m.content) for m in done.messages] == [("user", "Hi")]
    later = await transactions.CompleteTransaction(
        tx.CompleteTransactionRequest(name=created.name, status=Status.STATUS_FAILED, output="other")
    )
    assert later == done


async def test_create_final_record_directly(transactions: Any) -> None:
    rec = await _create(
        transactions, status=Status.STATUS_CANCELLED, output="partial", finish_reason="cancelled"
    )
    assert rec.status == Status.STATUS_CANCELLED and rec.HasField("complete_time")


async def test_nul_characters_are_stored_not_refused(transactions: Any) -> None:
    rec = await _create(
        transactions, prompt="a\x00b", messages=[tx.Transaction.Message(role="user", content="\x00")]
    )
    assert rec.prompt == "a\ufffdb" and rec.messages[0].content == "\ufffd"


async def test_unknown_and_malformed_names(transactions: Any) -> None:
    await _fails(
        transactions.GetTransaction(tx.GetTransactionRequest(name="transactions/does-not-exist")),
        grpc.StatusCode.NOT_FOUND,
    )
    for name in ("", "transactions/", "models/x", "transactions/a b", "transactions/" + "x" * 200):
        await _fails(
            transactions.GetTransaction(tx.GetTransactionRequest(name=name)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "name",
        )
    await _fails(
        transactions.CompleteTransaction(
            tx.CompleteTransactionRequest(name="transactions/nope", status=Status.STATUS_SUCCEEDED)
        ),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_invalid_create_changes_nothing(transactions: Any) -> None:
    rid = uuid.uuid4().hex
    cases = [
        (tx.CreateTransactionRequest(), "transaction"),
        (tx.CreateTransactionRequest(transaction=_new(request_id="")), "transaction.request_id"),
        (tx.CreateTransactionRequest(transaction=_new(request_id="bad id!")), "transaction.request_id"),
        (
            tx.CreateTransactionRequest(transaction=_new(request_id=rid, status=Status.STATUS_UNSPECIFIED)),
            "transaction.status",
        ),
        (
            tx.CreateTransactionRequest(
                transaction=_new(request_id=rid, create_time=timestamp_pb2.Timestamp(seconds=10**12))
            ),
            "transaction.create_time",
        ),
        (
            tx.CreateTransactionRequest(transaction=_new(request_id=rid, latency={"seconds": -1})),
            "transaction.latency",
        ),
        (
            tx.CreateTransactionRequest(
                transaction=_new(request_id=rid, usage=tx.Transaction.Usage(prompt_tokens=-1))
            ),
            "transaction.usage.prompt_tokens",
        ),
        (
            tx.CreateTransactionRequest(
                transaction=_new(
                    request_id=rid,
                    parameters=struct_pb2.Struct(fields={"t": struct_pb2.Value(number_value=math.nan)}),
                )
            ),
            "transaction.parameters",
        ),
    ]
    for request, field in cases:
        await _fails(transactions.CreateTransaction(request), grpc.StatusCode.INVALID_ARGUMENT, field)
    await _fails(
        transactions.GetTransaction(tx.GetTransactionRequest(name=f"transactions/{rid}")),
        grpc.StatusCode.NOT_FOUND,
    )
    created = await _create(transactions)
    await _fails(
        transactions.CompleteTransaction(
            tx.CompleteTransactionRequest(name=created.name, status=Status.STATUS_IN_PROGRESS)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "status",
    )
    await _fails(
        transactions.CompleteTransaction(
            tx.CompleteTransactionRequest(
                name=created.name,
                status=Status.STATUS_SUCCEEDED,
                complete_time=timestamp_pb2.Timestamp(nanos=-5),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "complete_time",
    )
    unchanged = await transactions.GetTransaction(tx.GetTransactionRequest(name=created.name))
    assert unchanged == created


async def test_list_filters_and_pagination(transactions: Any) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    base = datetime(2031, 1, 1, tzinfo=UTC)
    ids = []
    for i in range(23):
        rec = await _create(
            transactions,
            request_id=f"{model}-{i:02d}",
            model=model,
            principal="alice" if i % 2 else "bob",
            # Three records share each timestamp: ordering must still be total and stable.
            create_time=_ts(base + timedelta(minutes=i // 3)),
            status=Status.STATUS_SUCCEEDED if i % 3 else Status.STATUS_FAILED,
        )
        ids.append(rec.request_id)

    async def all_pages(filter_: str, page_size: int, order_by: str = "") -> list[str]:
        seen: list[str] = []
        token = ""
        while True:
            page = await transactions.ListTransactions(
                tx.ListTransactionsRequest(
                    filter=filter_, page_size=page_size, page_token=token, order_by=order_by
                )
            )
            assert len(page.transactions) <= page_size
            seen += [t.request_id for t in page.transactions]
            token = page.next_page_token
            if not token:
                return seen

    everything = await all_pages(f'model = "{model}"', 5)
    expected = sorted(ids, key=lambda r: (base + timedelta(minutes=int(r[-2:]) // 3), r), reverse=True)
    assert everything == expected  # newest first, ties by request id, no duplicates, nothing missed
    assert await all_pages(f'model = "{model}"', 7, order_by="create_time") == expected[::-1]
    alice = await all_pages(f'model = "{model}" AND principal = alice', 4)
    assert sorted(alice) == sorted(r for r in ids if int(r[-2:]) % 2)
    failed = await all_pages(f"model = {model} AND status = FAILED", 100)
    assert sorted(failed) == sorted(r for r in ids if int(r[-2:]) % 3 == 0)
    assert failed == await all_pages(f"model = {model} AND status = STATUS_FAILED", 100)
    window = await all_pages(
        f'model = "{model}" AND create_time >= "2031-01-01T00:02:00Z" AND create_time < "2031-01-01T00:04:00+00:00"',
        100,
    )
    assert sorted(window) == [f"{model}-{i:02d}" for i in range(6, 12)]
    assert await all_pages(f'model = "{model}" AND status != SUCCEEDED AND principal = bob', 100) == [
        r for r in expected if int(r[-2:]) % 3 == 0 and int(r[-2:]) % 2 == 0
    ]


async def test_list_bad_input(transactions: Any) -> None:
    page = await transactions.ListTransactions(tx.ListTransactionsRequest(page_size=1))
    assert page.next_page_token
    bad: list[tuple[tx.ListTransactionsRequest, str]] = [
        (tx.ListTransactionsRequest(page_token="not-a-token"), "page_token"),
        (tx.ListTransactionsRequest(page_token="eyJxIjoxfQ"), "page_token"),  # {"q":1}
        # A token must be used with the query it came from.
        (tx.ListTransactionsRequest(page_token=page.next_page_token, filter="model = x"), "page_token"),
        (tx.ListTransactionsRequest(page_size=-1), "page_size"),
        (tx.ListTransactionsRequest(filter="x" * 2000), "filter"),
        (tx.ListTransactionsRequest(filter=" AND ".join(["model = a"] * 20)), "filter"),
        (tx.ListTransactionsRequest(filter="nosuchfield = 1"), "filter"),
        (tx.ListTransactionsRequest(filter="model > a"), "filter"),
        (tx.ListTransactionsRequest(filter="model = a OR model = b"), "filter"),
        (tx.ListTransactionsRequest(filter='create_time > "yesterday"'), "filter"),
        (tx.ListTransactionsRequest(filter='create_time > "2025-01-01"'), "filter"),
        (tx.ListTransactionsRequest(filter='create_time > "2025-13-01T00:00:00Z"'), "filter"),
        (tx.ListTransactionsRequest(filter="status = HAPPY"), "filter"),
        (tx.ListTransactionsRequest(filter="model ="), "filter"),
        (tx.ListTransactionsRequest(filter="model = 'unterminated"), "filter"),
        (tx.ListTransactionsRequest(order_by="model"), "order_by"),
    ]
    for request, field in bad:
        await _fails(transactions.ListTransactions(request), grpc.StatusCode.INVALID_ARGUMENT, field)
    # A filter cannot reach SQL: a quote-laden value is just a value.
    odd = await transactions.ListTransactions(tx.ListTransactionsRequest(filter='model = "x\' OR 1=1 --"'))
    assert list(odd.transactions) == []


async def test_batch_create_records_each_once_all_or_none(transactions: Any) -> None:
    existing = await _create(transactions, prompt="first")
    fresh = [_new(prompt=f"p{i}") for i in range(3)]
    batch = tx.BatchCreateTransactionsRequest(
        requests=[
            tx.CreateTransactionRequest(transaction=t) for t in [*fresh, _new(request_id=existing.request_id)]
        ]
    )
    reply = await transactions.BatchCreateTransactions(batch)
    # In order; the record that existed comes back as stored (the first record wins).
    assert [t.prompt for t in reply.transactions] == ["p0", "p1", "p2", "first"]
    assert reply.transactions[3] == existing
    again = await transactions.BatchCreateTransactions(batch)
    assert list(again.transactions) == list(reply.transactions)
    # One invalid record refuses the whole batch, naming it; nothing of it is written.
    valid = _new(prompt="never")
    bad = tx.BatchCreateTransactionsRequest(
        requests=[
            tx.CreateTransactionRequest(transaction=valid),
            tx.CreateTransactionRequest(transaction=_new(request_id="not a valid id!")),
        ]
    )
    await _fails(
        transactions.BatchCreateTransactions(bad),
        grpc.StatusCode.INVALID_ARGUMENT,
        "requests[1].transaction.request_id",
    )
    await _fails(
        transactions.GetTransaction(tx.GetTransactionRequest(name=f"transactions/{valid.request_id}")),
        grpc.StatusCode.NOT_FOUND,
    )
    await _fails(
        transactions.BatchCreateTransactions(tx.BatchCreateTransactionsRequest()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "requests",
    )


async def test_batch_complete_first_completion_wins(transactions: Any) -> None:
    a, b = await _create(transactions), await _create(transactions)
    await transactions.CompleteTransaction(
        tx.CompleteTransactionRequest(name=b.name, status=Status.STATUS_FAILED, error_code="INTERNAL")
    )
    reply = await transactions.BatchCompleteTransactions(
        tx.BatchCompleteTransactionsRequest(
            requests=[
                tx.CompleteTransactionRequest(name=n, status=Status.STATUS_SUCCEEDED, output="ok")
                for n in (a.name, b.name)
            ]
        )
    )
    assert [(t.status, t.output) for t in reply.transactions] == [
        (Status.STATUS_SUCCEEDED, "ok"),
        (Status.STATUS_FAILED, ""),
    ]
    # A bad completion refuses the batch, naming it; the others stay in progress.
    c = await _create(transactions)
    await _fails(
        transactions.BatchCompleteTransactions(
            tx.BatchCompleteTransactionsRequest(
                requests=[
                    tx.CompleteTransactionRequest(name=c.name, status=Status.STATUS_SUCCEEDED),
                    tx.CompleteTransactionRequest(name=c.name, status=Status.STATUS_IN_PROGRESS),
                ]
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "requests[1].status",
    )
    got = await transactions.GetTransaction(tx.GetTransactionRequest(name=c.name))
    assert got.status == Status.STATUS_IN_PROGRESS
