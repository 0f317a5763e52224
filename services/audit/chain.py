"""The hash of one audit event: sha256 over the previous hash and a canonical JSON of the content.

Canonical JSON: sorted keys, no spaces, UTF-8, timestamps as RFC 3339 UTC with microseconds (the
database's precision), latency in whole microseconds, so a row read back hashes to the same value.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from services.common.timestamps import iso

GENESIS = "0" * 64

# Every column that describes the event; `hash` itself is the only one left out.
HASHED = (
    "sequence",
    "event_id",
    "kind",
    "event_time",
    "record_time",
    "source",
    "principal",
    "service",
    "method",
    "resource",
    "action",
    "code",
    "message",
    "latency_us",
    "request_id",
    "trace_id",
    "peer",
    "attributes",
    "previous_hash",
)


def canonical(row: dict[str, Any]) -> bytes:
    content = {}
    for key in HASHED:
        value = row[key]
        content[key] = iso(value) if isinstance(value, datetime) else value
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def event_hash(row: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(row)).hexdigest()
