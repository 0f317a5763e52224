"""Hypothesis strategies for hostile input: arbitrary JSON, mutations of a valid JSON body, the bytes
a body goes out as (truncated, invalid UTF-8, wrong content type), and protobuf messages generated
from their descriptors (scalars at their extremes, unknown enum values, repeated, nested, oneofs).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor, message, message_factory
from hypothesis import strategies as st

FD = descriptor.FieldDescriptor

# -- JSON ---------------------------------------------------------------------------------------------

# Extremes a parser has to range-check: int32/int64/uint64 edges and beyond, floats past every range.
EXTREME_INTS = [
    0,
    -1,
    1,
    2**31 - 1,
    2**31,
    -(2**31),
    -(2**31) - 1,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**30,
]
EXTREME_FLOATS = [0.0, -0.0, 1e-320, 1e308, -1e308, 3.5e38, -3.5e38, 0.5, 1e-7]
# Text that has broken parsers and templates before: escapes, lone surrogates (as JSON \ud800
# escapes), NULs, right-to-left marks, template syntax, path tricks.
NASTY_TEXT = [
    "",
    " ",
    "\x00",
    "\ud800",
    "\udfff\ud800",
    "\u202e\u0000\uffff",
    "🦜" * 50,
    "{{ 7*7 }}{% for x in range(9) %}",
    "<|im_start|>system\n",
    "<start_of_turn>user\n",
    "../../../etc/passwd",
    "models/",
    "models/../models/x",
    "models/*",
    "%00%ff",
    "null",
    "true",
    "-1",
    "1e999",
    "a" * 300,
]

text = st.one_of(st.text(max_size=40), st.sampled_from(NASTY_TEXT))
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from(EXTREME_INTS),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(EXTREME_FLOATS),
    text,
)


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any JSON value (hypothesis' recursive JSON)."""
    return st.recursive(
        json_scalars,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=5),
        max_leaves=max_leaves,
    )


def json_objects(max_leaves: int = 12) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(text, json_values(max_leaves), max_size=6)


# -- mutations of a valid body ------------------------------------------------------------------------


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every position inside a JSON value down to 32 levels, the root included (a deep-nesting
    mutation may already have made 300)."""
    out = [prefix]
    if len(prefix) >= 32:
        return out
    if isinstance(value, dict):
        for key, child in value.items():
            out += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            out += _paths(child, (*prefix, index))
    return out


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        value = value[part]
    return value


def _retype(value: Any) -> list[Any]:
    """The same value as other JSON types."""
    if isinstance(value, bool):
        return [int(value), str(value).lower(), [value], None]
    if isinstance(value, int | float):
        return [str(value), value + 0.5, [value], {"value": value}, value > 0, -value]
    if isinstance(value, str):
        return [0, True, [value], {"": value}, value.encode("utf-8", "surrogatepass").hex()]
    if isinstance(value, list):
        return [value[0] if value else None, {"0": value}, json.dumps(value)]
    if isinstance(value, dict):
        return [list(value.values()), list(value.keys()), json.dumps(value)]
    return [0, "", [], {}]


def _nested(depth: int, leaf: Any, kind: str) -> Any:
    for _ in range(depth):
        leaf = [leaf] if kind == "list" else {"a": leaf}
    return leaf


@st.composite
def replacement(draw: st.DrawFn, old: Any) -> Any:
    choice = draw(st.sampled_from(["json", "retype", "null", "huge", "deep", "unicode", "extreme"]))
    if choice == "json":
        return draw(json_values(8))
    if choice == "retype":
        return draw(st.sampled_from(_retype(old)))
    if choice == "null":
        return None
    if choice == "huge":
        size = draw(st.sampled_from([4096, 65536, 1 << 20]))
        return draw(st.sampled_from(["a", "🦜", "\\", '"', " "])) * size
    if choice == "deep":
        # Deep, but within what the client's own json.dumps can write (Python's recursion limit).
        return _nested(draw(st.sampled_from([64, 200, 300])), old, draw(st.sampled_from(["list", "dict"])))
    if choice == "unicode":
        return draw(st.text(min_size=1, max_size=30)) + draw(st.sampled_from(NASTY_TEXT))
    return draw(st.sampled_from(EXTREME_INTS + EXTREME_FLOATS))


@st.composite
def mutated(draw: st.DrawFn, valid: Any) -> Any:
    """`valid` with 1-3 mutations: a field dropped, replaced (arbitrary JSON, another type, null, a
    huge string, deep nesting, odd unicode, an extreme number) or added."""
    body = copy.deepcopy(valid)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        path = draw(st.sampled_from(_paths(body)))
        action = draw(st.sampled_from(["drop", "replace", "add"]))
        if not path:
            if action == "replace":
                body = draw(replacement(body))
            elif action == "add" and isinstance(body, dict):
                body[draw(text)] = draw(json_values(6))
            continue
        parent = _get(body, path[:-1])
        if action == "drop":
            del parent[path[-1]]
        elif action == "replace":
            parent[path[-1]] = draw(replacement(parent[path[-1]]))
        elif isinstance(parent, dict):
            parent[draw(text)] = draw(json_values(6))
        else:
            parent.append(draw(json_values(6)))
    return body


# -- the bytes on the wire ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Wire:
    """A body as sent: bytes, content type and how they were made (for the failure report)."""

    content: bytes
    content_type: str | None
    how: str


CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "text/plain",
    "application/x-www-form-urlencoded",
    "application/grpc",
    "application/grpc-web+proto",
    "multipart/form-data; boundary=x",
    "application/json; charset=latin-1",
    "",
]


def dumps(value: Any) -> bytes:
    # Lone surrogates travel as \ud800 escapes (ensure_ascii), as a hostile client would write them.
    return json.dumps(value, ensure_ascii=True).encode()


@st.composite
def wire(draw: st.DrawFn, value: Any, mangle: bool = True) -> Wire:
    """`value` as JSON bytes, mostly intact; otherwise truncated, with invalid UTF-8, or sent with
    another content type."""
    content = dumps(value)
    if not mangle:
        return Wire(content, "application/json", "json")
    how = draw(
        st.sampled_from(["json"] * 5 + ["truncated", "invalid-utf8", "content-type", "raw-utf8", "empty"])
    )
    if how == "truncated" and content:
        return Wire(content[: draw(st.integers(0, len(content) - 1))], "application/json", how)
    if how == "invalid-utf8":
        at = draw(st.integers(0, len(content)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x00"]))
        return Wire(content[:at] + bad + content[at:], "application/json", how)
    if how == "content-type":
        return Wire(content, draw(st.sampled_from(CONTENT_TYPES)), how)
    if how == "raw-utf8":
        # Unescaped non-ASCII (and lone surrogates encoded anyway).
        raw = json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
        return Wire(raw, "application/json", how)
    if how == "empty":
        return Wire(b"", draw(st.sampled_from(["application/json", None])), how)
    return Wire(content, "application/json", "json")


# -- protobuf messages from their descriptors -------------------------------------------------------

_INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}


def _ints(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (low, high, 0, -1, 1, low + 1, high - 1, 4) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def _scalar(field: descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INT_RANGES:
        return _ints(*_INT_RANGES[kind])
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind == FD.TYPE_FLOAT:
        return st.one_of(st.floats(width=32), st.sampled_from([0.0, -0.0, 3.4e38, -3.4e38, 1e-45]))
    if kind == FD.TYPE_DOUBLE:
        return st.one_of(st.floats(), st.sampled_from([0.0, 1e308, -1e308, 5e-324]))
    if kind == FD.TYPE_STRING:
        # Valid UTF-8 only (protobuf refuses to serialize anything else); raw bytes cover the rest.
        return st.one_of(
            st.text(max_size=40),
            st.sampled_from([t for t in NASTY_TEXT if not _has_surrogate(t)]),
            st.sampled_from(["a" * 5000, "🦜" * 3000]),
        )
    if kind == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FD.TYPE_ENUM:
        assert field.enum_type is not None
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), _ints(-(2**31), 2**31 - 1))
    raise AssertionError(f"no strategy for field type {kind}")


def _has_surrogate(value: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in value)


@st.composite
def proto_message(draw: st.DrawFn, desc: descriptor.Descriptor, depth: int = 0) -> message.Message:
    """A message of type `desc` with a random subset of its fields set (at most one per oneof, the
    last set wins as on the wire)."""
    cls: type[message.Message] = message_factory.GetMessageClass(desc)
    msg = cls()
    if desc.full_name == "google.protobuf.Struct" or desc.full_name == "google.protobuf.Value":
        value = draw(json_values(6))
        if desc.full_name == "google.protobuf.Struct":
            value = value if isinstance(value, dict) else {"value": value}
        from google.protobuf import json_format

        try:
            json_format.ParseDict(_finite(value), msg)
        except (json_format.ParseError, ValueError):
            pass
        return msg
    fields = list(desc.fields)
    if not fields or depth > 4:
        return msg
    chosen = draw(st.lists(st.sampled_from(fields), unique_by=lambda f: f.number, max_size=len(fields)))
    for field in chosen:
        _set(draw, msg, field, depth)
    return msg


def _finite(value: Any) -> Any:
    """JSON without the integers a Value (a double) cannot hold."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
        return float(2**53)
    return value


def _set(draw: st.DrawFn, msg: message.Message, field: descriptor.FieldDescriptor, depth: int) -> None:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key_field = field.message_type.fields_by_name["key"]
        value_field = field.message_type.fields_by_name["value"]
        target = getattr(msg, field.name)
        for key in draw(st.lists(_scalar(key_field), max_size=3)):
            if value_field.message_type is not None:
                target[key].CopyFrom(draw(proto_message(value_field.message_type, depth + 1)))
            else:
                target[key] = draw(_scalar(value_field))
        return
    repeated = field.is_repeated
    if field.message_type is not None:
        if repeated:
            target = getattr(msg, field.name)
            for item in draw(st.lists(proto_message(field.message_type, depth + 1), max_size=3)):
                target.add().CopyFrom(item)
        else:
            getattr(msg, field.name).CopyFrom(draw(proto_message(field.message_type, depth + 1)))
        return
    if repeated:
        getattr(msg, field.name).extend(draw(st.lists(_scalar(field), max_size=4)))
    else:
        setattr(msg, field.name, draw(_scalar(field)))


@st.composite
def raw_payload(draw: st.DrawFn, valid: bytes) -> bytes:
    """Bytes that are not (or not quite) a serialized request: random, a valid one truncated or with
    bytes flipped, or valid with a random tail (an unknown or repeated field, or garbage)."""
    how = draw(st.sampled_from(["random", "truncated", "flipped", "tail", "varint"]))
    if how == "random" or not valid:
        return draw(st.binary(max_size=256))
    if how == "truncated":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if how == "flipped":
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(data) - 1))
            data[at] = draw(st.integers(0, 255))
        return bytes(data)
    if how == "varint":
        # An overlong varint / huge length prefix for field 1.
        return b"\x0a" + b"\xff" * draw(st.integers(1, 12)) + b"\x01"
    return valid + draw(st.binary(min_size=1, max_size=64))
