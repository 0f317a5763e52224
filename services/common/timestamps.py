"""Conversions between protobuf Timestamp/Duration and the database's microsecond precision."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import duration_pb2, timestamp_pb2

from services.common.errors import invalid_argument

# Timestamp's valid range (AIP-142): 0001-01-01 to 9999-12-31.
_MIN_SECONDS = -62135596800
_MAX_SECONDS = 253402300799


def now() -> datetime:
    return datetime.now(UTC)


def to_datetime(ts: timestamp_pb2.Timestamp, field: str) -> datetime:
    """A valid Timestamp as an aware UTC datetime (microseconds); INVALID_ARGUMENT naming `field` if not."""
    if not (_MIN_SECONDS <= ts.seconds <= _MAX_SECONDS) or not (0 <= ts.nanos < 1_000_000_000):
        raise invalid_argument(field, "is not a valid timestamp (years 1 to 9999, nanos in [0, 1e9))")
    return ts.ToDatetime(tzinfo=UTC)


def to_timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def to_micros(d: duration_pb2.Duration, field: str) -> int:
    if d.seconds < 0 or d.nanos < 0 or d.nanos >= 1_000_000_000 or d.seconds > 315_576_000_000:
        raise invalid_argument(field, "must be a non-negative duration")
    return d.seconds * 1_000_000 + d.nanos // 1000


def to_duration(micros: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=micros // 1_000_000, nanos=(micros % 1_000_000) * 1000)


def micros_to_seconds(micros: int) -> float:
    return micros / 1_000_000


def seconds_to_duration(seconds: float) -> duration_pb2.Duration:
    return to_duration(max(0, round(seconds * 1_000_000)))


def iso(value: datetime) -> str:
    """RFC 3339 in UTC with microseconds: the canonical text form used in hashes and page tokens."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
