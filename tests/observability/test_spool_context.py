"""The spool keeps each record's span context (a W3C traceparent) for its delivery span's link, and a
spool written before that column existed gets it when opened, its records intact."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from services.common.telemetry import link_to
from services.recording.spool import Spool

START = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
FINISH = "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"

OLD_SCHEMA = """
CREATE TABLE txn (seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL UNIQUE, started BLOB,
    finished BLOB, start_sent INTEGER NOT NULL DEFAULT 0, pending INTEGER NOT NULL DEFAULT 1, since REAL NOT NULL);
CREATE TABLE audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, event BLOB NOT NULL, since REAL NOT NULL);
INSERT INTO txn (request_id, started, since) VALUES ('old-request', x'01', 1.0);
INSERT INTO audit (event, since) VALUES (x'02', 1.0);
"""


def test_a_start_keeps_its_context_and_a_finish_does_not_replace_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    try:
        spool.put_started("r1", b"start", START)
        spool.put_finished("r1", b"finish", FINISH)
        spool.put_finished("r2", b"finish only", FINISH)
        contexts = {row.request_id: row.context for row in spool.pending_txn(10)}
        assert contexts == {"r1": START, "r2": FINISH}
        spool.put_audit(b"event", START)
        spool.put_audit(b"event outside any trace")
        assert spool.audit_contexts([seq for seq, _ in spool.pending_audit(10)]) == [START]
    finally:
        spool.close()


def test_an_older_spool_gets_the_column_and_keeps_its_records(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.close()
    spool = Spool(path)
    try:
        (row,) = spool.pending_txn(10)
        assert (row.request_id, row.started, row.context) == ("old-request", b"\x01", "")
        assert [event for _, event in spool.pending_audit(10)] == [b"\x02"]
        spool.put_started("new-request", b"start", START)
        assert spool.pending_txn(10)[-1].context == START
    finally:
        spool.close()


def test_links_only_to_sampled_contexts() -> None:
    link = link_to(START)
    assert link is not None and format(link.context.span_id, "016x") == "b7ad6b7169203331"
    assert link_to(START[:-2] + "00") is None
    assert link_to("") is None and link_to("not a traceparent") is None
