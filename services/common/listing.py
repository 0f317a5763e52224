"""List RPC plumbing (AIP-132/158/160): page sizes, opaque page tokens and a small filter language.

The filter language is an AIP-160 subset: comparisons `field op value` joined by `AND`. Each resource
declares its filterable fields and their kinds; the parser turns a filter into a SQL condition with
bound parameters over whitelisted columns only, so a filter can never inject SQL. Every mistake is an
`INVALID_ARGUMENT` naming the request field (`filter`, `page_token`, `page_size`, `order_by`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar

from psycopg.rows import dict_row

from services.common.database import Database
from services.common.errors import Reason, RpcError, invalid_argument
from services.common.timestamps import iso

T = TypeVar("T")
# How each column of a page token's keyset is written: RFC 3339 text, plain text, or an integer.
KeyKind = Literal["time", "text", "int"]

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_FILTER_LENGTH = 1024
MAX_FILTER_TERMS = 16

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<op><=|>=|!=|=|<|>)
      | "(?P<dq>(?:[^"\\]|\\.)*)"
      | '(?P<sq>(?:[^'\\]|\\.)*)'
      | (?P<word>[^\s"'<>=!]+)
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class Field:
    """A filterable field: its SQL column and how its values are read."""

    column: str
    # `text` compares strings; `enum` maps names through `values`; `time` reads RFC 3339; `int`.
    kind: str = "text"
    values: Mapping[str, Any] | None = None


def page_size(value: int) -> int:
    if value < 0:
        raise invalid_argument("page_size", "must not be negative")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def parse_time(value: str, field: str) -> datetime:
    """RFC 3339 with a zone (`2025-01-01T00:00:00Z`), as AIP-160 wants timestamps written."""
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise invalid_argument(field, f"{value!r} is not an RFC 3339 timestamp") from None
    if parsed.tzinfo is None or "T" not in text.upper():
        raise invalid_argument(field, f"{value!r} needs a date, a time and a zone (RFC 3339)")
    return parsed.astimezone(UTC)


def compile_filter(text: str, fields: Mapping[str, Field]) -> tuple[str, list[Any]]:
    """Filter string -> (`a = %s AND b >= %s`, params). An empty filter is `TRUE`."""
    if len(text) > MAX_FILTER_LENGTH:
        raise invalid_argument(
            "filter", f"longer than {MAX_FILTER_LENGTH} characters", Reason.FILTER_TOO_LONG
        )
    tokens = _tokenize(text)
    if not tokens:
        return "TRUE", []
    clauses: list[str] = []
    params: list[Any] = []
    i = 0
    while True:
        if len(tokens) < i + 3:
            raise invalid_argument("filter", "expected `field operator value`")
        (k1, name), (k2, op), (k3, raw) = tokens[i], tokens[i + 1], tokens[i + 2]
        if k1 != "word" or k2 != "op" or k3 not in ("word", "str"):
            raise invalid_argument("filter", f"expected `field operator value` near {name!r}")
        field = fields.get(name)
        if field is None:
            known = ", ".join(sorted(fields))
            raise invalid_argument("filter", f"unknown field {name!r} (known: {known})")
        clauses.append(_clause(name, field, op, raw, params))
        i += 3
        if i == len(tokens):
            break
        if tokens[i] != ("word", "AND"):
            raise invalid_argument("filter", f"expected AND, found {tokens[i][1]!r}")
        i += 1
        if len(clauses) >= MAX_FILTER_TERMS:
            raise invalid_argument(
                "filter", f"more than {MAX_FILTER_TERMS} comparisons", Reason.FILTER_TOO_LONG
            )
    return " AND ".join(clauses), params


def _tokenize(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise invalid_argument("filter", f"cannot read the filter at character {pos + 1}")
        pos = match.end()
        if match.group("op"):
            out.append(("op", match.group("op")))
        elif match.group("word") is not None:
            out.append(("word", match.group("word")))
        else:
            quoted = match.group("dq") if match.group("dq") is not None else match.group("sq")
            out.append(("str", re.sub(r"\\(.)", r"\1", quoted)))
    return out


def _clause(name: str, field: Field, op: str, raw: str, params: list[Any]) -> str:
    if field.kind in ("text", "enum") and op not in ("=", "!="):
        raise invalid_argument("filter", f"{name} can only be compared with = or !=")
    value: Any = raw
    if field.kind == "enum":
        assert field.values is not None
        value = field.values.get(raw.upper())
        if value is None:
            choices = ", ".join(sorted(field.values))
            raise invalid_argument("filter", f"{name} has no value {raw!r} (one of: {choices})")
    elif field.kind == "time":
        value = parse_time(raw, "filter")
    elif field.kind == "int":
        try:
            value = int(raw)
        except ValueError:
            raise invalid_argument("filter", f"{name} needs an integer, not {raw!r}") from None
    params.append(value)
    sql_op = "<>" if op == "!=" else op
    return f"{field.column} {sql_op} %s"


def enum_values(names: Sequence[str], prefix: str, convert: Callable[[str], Any]) -> dict[str, Any]:
    """Accepts both `SUCCEEDED` and `STATUS_SUCCEEDED` for the enum value named `STATUS_SUCCEEDED`."""
    out: dict[str, Any] = {}
    for full in names:
        if full.endswith("_UNSPECIFIED"):
            continue
        value = convert(full)
        out[full] = value
        out[full.removeprefix(prefix)] = value
    return out


@dataclass(frozen=True)
class Ordering:
    """A keyset ordering: `key` columns compared as a row, ascending or descending."""

    descending: bool

    @property
    def sql_dir(self) -> str:
        return "DESC" if self.descending else "ASC"

    @property
    def cmp(self) -> str:
        return "<" if self.descending else ">"


def parse_order_by(text: str, field: str) -> Ordering:
    words = text.split()
    if not words:
        return Ordering(descending=True)
    if words[0] != field or len(words) > 2 or (len(words) == 2 and words[1].lower() not in ("asc", "desc")):
        raise invalid_argument("order_by", f"must be `{field}` or `{field} desc`")
    return Ordering(descending=len(words) == 2 and words[1].lower() == "desc")


def query_fingerprint(*parts: str) -> str:
    """Ties a page token to the query it continues (AIP-158: other fields must not change)."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def encode_page_token(fingerprint: str, key: Sequence[Any]) -> str:
    payload = json.dumps({"q": fingerprint, "k": list(key)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode_page_token(token: str, fingerprint: str, arity: int) -> list[Any] | None:
    """None for an empty token; the keyset of the last row of the previous page otherwise."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        key = data["k"]
        same_query = data["q"] == fingerprint
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise invalid_argument(
            "page_token", "is not a token this service issued", Reason.INVALID_PAGE_TOKEN
        ) from None
    if not isinstance(key, list) or len(key) != arity:
        raise invalid_argument("page_token", "is not a token this service issued", Reason.INVALID_PAGE_TOKEN)
    if not same_query:
        raise invalid_argument(
            "page_token", "was issued for a different filter or order_by", Reason.INVALID_PAGE_TOKEN
        )
    return key


def bad_token() -> RpcError:
    return invalid_argument("page_token", "is not a token this service issued", Reason.INVALID_PAGE_TOKEN)


@dataclass(frozen=True)
class Page:
    """One List call's page (AIP-158): its size, the query its tokens belong to, and the keyset
    (typed per `KeyKind`) of the previous page's last row, where this page resumes."""

    size: int
    fingerprint: str
    after: tuple[Any, ...] | None

    @property
    def limit(self) -> int:
        """Rows to fetch: one more than the page, which says whether another page follows."""
        return self.size + 1

    def split(self, rows: Sequence[T], key: Callable[[T], Sequence[Any]]) -> tuple[Sequence[T], str]:
        """(this page's rows, next_page_token) from up to `limit` rows in keyset order."""
        if len(rows) <= self.size:
            return rows, ""
        last = key(rows[self.size - 1])
        written = [iso(v) if isinstance(v, datetime) else v for v in last]
        return rows[: self.size], encode_page_token(self.fingerprint, written)


def page(requested_size: int, page_token: str, query: Sequence[str], key: Sequence[KeyKind]) -> Page:
    """The page a List request asks for. `query` is what its token must not change (the resource,
    filter, order); `key` the kinds of the keyset columns, read back typed from the token."""
    size = page_size(requested_size)
    fingerprint = query_fingerprint(*query)
    after = decode_page_token(page_token, fingerprint, len(key))
    return Page(size, fingerprint, None if after is None else tuple(map(_key_value, key, after)))


def _key_value(kind: KeyKind, value: Any) -> Any:
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "text" and isinstance(value, str):
        return value
    if kind == "time" and isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass
    raise bad_token()


class ListRequest(Protocol):
    """What every filtered List request carries (AIP-132, 158, 160)."""

    page_size: int
    page_token: str
    filter: str
    order_by: str


@dataclass(frozen=True)
class Table:
    """A resource listed from one SQL table: its filterable fields and its keyset, the columns
    that order it uniquely (the first is the one `order_by` names)."""

    name: str
    fields: Mapping[str, Field]
    key: Sequence[tuple[str, KeyKind]]

    async def list(self, db: Database, request: ListRequest) -> tuple[Sequence[dict[str, Any]], str]:
        """(rows of the requested page, next_page_token)."""
        where, params = compile_filter(request.filter, self.fields)
        columns = [column for column, _ in self.key]
        order = parse_order_by(request.order_by, columns[0])
        this = page(
            request.page_size,
            request.page_token,
            query=(self.name, request.filter, order.sql_dir),
            key=[kind for _, kind in self.key],
        )
        if this.after is not None:
            where += f" AND ({', '.join(columns)}) {order.cmp} ({', '.join(['%s'] * len(columns))})"
            params += this.after
        ordering = ", ".join(f"{column} {order.sql_dir}" for column in columns)
        sql = f"SELECT * FROM {self.name} WHERE {where} ORDER BY {ordering} LIMIT %s"
        async with db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(sql, [*params, this.limit])  # type: ignore[arg-type]
            rows = await cur.fetchall()
        return this.split(rows, lambda row: [row[column] for column in columns])
