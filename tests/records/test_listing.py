"""Unit tests of the list plumbing: the AIP-160 subset, page tokens, page sizes (pure logic)."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest

from services.common import listing
from services.common.errors import RpcError

FIELDS = {
    "model": listing.Field("model"),
    "status": listing.Field(
        "status", "enum", listing.enum_values(["STATUS_UNSPECIFIED", "STATUS_OK"], "STATUS_", str)
    ),
    "create_time": listing.Field("create_time", "time"),
    "sequence": listing.Field("seq", "int"),
}


def test_compiles_to_parameters_only() -> None:
    where, params = listing.compile_filter(
        'model = "a b" AND status = ok AND create_time >= "2025-01-02T03:04:05+02:00" AND sequence > 7',
        FIELDS,
    )
    assert where == "model = %s AND status = %s AND create_time >= %s AND seq > %s"
    assert params == ["a b", "STATUS_OK", datetime(2025, 1, 2, 1, 4, 5, tzinfo=UTC), 7]
    assert listing.compile_filter("  ", FIELDS) == ("TRUE", [])
    assert listing.compile_filter("model = ;DROP", FIELDS)[1] == [";DROP"]  # a value, never SQL
    assert listing.compile_filter(r'model = "say \"hi\""', FIELDS)[1] == ['say "hi"']


@pytest.mark.parametrize(
    "text",
    [
        "model",
        "model =",
        "= a",
        "model = a b",
        "model = a AND",
        "model = a and model = b",
        "model < a",
        "status = STATUS_UNSPECIFIED",
        "sequence = 1.5",
        'create_time > "2025-01-01T00:00:00"',  # no zone
        "create_time > 2025-01-01",
        "other = 1",
        "x" * 1025,
    ],
)
def test_bad_filters_name_the_field(text: str) -> None:
    with pytest.raises(RpcError) as info:
        listing.compile_filter(text, FIELDS)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field_violations[0][0] == "filter"


def test_page_tokens_round_trip_and_bind_to_the_query() -> None:
    fp = listing.query_fingerprint("x", "model = a", "DESC")
    token = listing.encode_page_token(fp, ["2025-01-01T00:00:00.000000Z", "id"])
    assert listing.decode_page_token(token, fp, 2) == ["2025-01-01T00:00:00.000000Z", "id"]
    assert listing.decode_page_token("", fp, 2) is None
    for bad, other_fp, arity in [
        (token, listing.query_fingerprint("x", "model = b", "DESC"), 2),
        (token, fp, 1),
        ("%%%", fp, 2),
        ("bm90IGpzb24", fp, 2),  # "not json"
    ]:
        with pytest.raises(RpcError) as info:
            listing.decode_page_token(bad, other_fp, arity)
        assert info.value.field_violations[0][0] == "page_token"


def test_page_size_and_order_by() -> None:
    assert listing.page_size(0) == listing.DEFAULT_PAGE_SIZE
    assert listing.page_size(5000) == listing.MAX_PAGE_SIZE
    with pytest.raises(RpcError):
        listing.page_size(-1)
    assert listing.parse_order_by("", "seq").descending
    assert not listing.parse_order_by("seq", "seq").descending
    assert listing.parse_order_by("seq DESC", "seq").descending
    for bad in ("other", "seq up", "seq desc extra"):
        with pytest.raises(RpcError):
            listing.parse_order_by(bad, "seq")


def test_a_page_splits_off_one_extra_row_and_resumes_typed_where_it_ended() -> None:
    when = datetime(2025, 1, 1, tzinfo=UTC)
    rows = [(when, "a"), (when, "b"), (when, "c")]
    first = listing.page(2, "", query=("x", ""), key=("time", "text"))
    assert (first.after, first.limit) == (None, 3)
    shown, token = first.split(rows, lambda r: r)
    assert list(shown) == rows[:2]
    second = listing.page(2, token, query=("x", ""), key=("time", "text"))
    assert second.after == (when, "b")
    assert second.split(rows[2:], lambda r: r) == (rows[2:], "")


@pytest.mark.parametrize(
    ("written", "kinds"),
    [
        (["yesterday", "a"], ("time", "text")),
        ([1, 2], ("time", "text")),
        ([True], ("int",)),
        (["7"], ("int",)),
    ],
)
def test_a_page_token_with_keys_of_the_wrong_kind_is_refused(
    written: list[object], kinds: tuple[str, ...]
) -> None:
    token = listing.encode_page_token(listing.query_fingerprint("x"), written)
    with pytest.raises(RpcError) as info:
        listing.page(10, token, query=("x",), key=kinds)  # type: ignore[arg-type]
    assert info.value.reason == "INVALID_PAGE_TOKEN"
