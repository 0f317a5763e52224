"""The local durable spool: a SQLite database in WAL mode, one per producing process.

Writes are single small autocommit transactions on the caller's thread (tens of microseconds, no
network, no fsync with `synchronous=NORMAL`); what is committed survives a killed process. The writer
never checkpoints the WAL itself (`wal_autocheckpoint=0`): `checkpoint()` does it, off the hot path.

Tables:
- `txn`: one row per request id while it still needs delivering: `started` (a serialized
  `Transaction`, IN_PROGRESS) and `finished` (a serialized `CompleteTransactionRequest`);
  `start_sent` once the start reached the Transactions service; `pending` = there is work to send;
  `since` = when the start (later: the finish) was spooled. The row is deleted once the finish has
  been delivered. Delivery may hold a start back for a moment (`pending_txn(started_before=...)`) so
  that start and finish go out together.
- `audit`: serialized `AuditEvent`s waiting for delivery, in order.
- `dead`: records the services refused as invalid (kept, counted, never retried automatically).

`txn` and `audit` rows keep the span context of the request they carry (`context`, a W3C
`traceparent`; empty outside a trace), so that their delivery span can link to it.

One process owns a spool at a time (an exclusive `flock` on `<name>.lock`), so the rows left open
(`finished` IS NULL) when a spool is opened belong to a process that died mid-request.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS txn (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT    NOT NULL UNIQUE,
    started    BLOB,
    finished   BLOB,
    start_sent INTEGER NOT NULL DEFAULT 0,
    pending    INTEGER NOT NULL DEFAULT 1,
    since      REAL    NOT NULL,
    context    TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS txn_pending ON txn (pending, seq);
CREATE TABLE IF NOT EXISTS audit (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    event   BLOB    NOT NULL,
    since   REAL    NOT NULL,
    context TEXT    NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS dead (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    kind    TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    error   TEXT    NOT NULL,
    since   REAL    NOT NULL
);
"""
# Columns added after the first release: a spool written by an older ferry gets them when opened.
ADDED_COLUMNS = {"txn": "context TEXT NOT NULL DEFAULT ''", "audit": "context TEXT NOT NULL DEFAULT ''"}


class SpoolLocked(RuntimeError):
    """Another live process holds this spool."""


@dataclass(frozen=True)
class TxnRow:
    seq: int
    request_id: str
    started: bytes | None
    finished: bytes | None
    start_sent: bool
    # The request's span context (`traceparent`), empty when none was recorded.
    context: str = ""


class Spool:
    def __init__(self, path: Path, synchronous: str = "NORMAL") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock_file = open(path.with_suffix(".lock"), "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise SpoolLocked(f"spool {path} is in use by another process") from None
        self._lock_file.truncate(0)
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()
        self._mutex = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'FULL' else 'NORMAL'}")
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.executescript(SCHEMA)
        for table, column in ADDED_COLUMNS.items():
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column.split()[0] not in present:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")

    # -- writes on the request path ------------------------------------------------------------

    def put_started(self, request_id: str, started: bytes, context: str = "") -> bool:
        """False when the request id is already spooled (a duplicate start is ignored)."""
        with self._mutex:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO txn (request_id, started, since, context) VALUES (?, ?, ?, ?)",
                (request_id, started, time.time(), context),
            )
            return cur.rowcount == 1

    def put_finished(self, request_id: str, finished: bytes, context: str = "") -> bool:
        """Records the outcome; the first finish wins. False when this request already had one. The
        start's span context stays (`context` fills it only where the start had none)."""
        with self._mutex:
            cur = self._db.execute(
                "UPDATE txn SET finished = ?, pending = 1, since = ?, "
                "context = CASE WHEN context = '' THEN ? ELSE context END "
                "WHERE request_id = ? AND finished IS NULL",
                (finished, time.time(), context, request_id),
            )
            if cur.rowcount == 1:
                return True
            # No start spooled (or already delivered and gone): spool the finish on its own.
            cur = self._db.execute(
                "INSERT OR IGNORE INTO txn (request_id, finished, since, context) VALUES (?, ?, ?, ?)",
                (request_id, finished, time.time(), context),
            )
            return cur.rowcount == 1

    def put_audit(self, event: bytes, context: str = "") -> None:
        with self._mutex:
            self._db.execute(
                "INSERT INTO audit (event, since, context) VALUES (?, ?, ?)", (event, time.time(), context)
            )

    # -- delivery side -----------------------------------------------------------------------------

    def open_requests(self) -> list[str]:
        """Request ids started and not finished (after a crash: the ones cut off mid-way)."""
        with self._mutex:
            return [r[0] for r in self._db.execute("SELECT request_id FROM txn WHERE finished IS NULL")]

    def pending_txn(self, limit: int, started_before: float | None = None) -> list[TxnRow]:
        """Rows with something to deliver, oldest first. With `started_before` (wall-clock time), a
        start still waiting for its outcome is left out unless it was spooled before then."""
        with self._mutex:
            if started_before is None:
                rows = self._db.execute(
                    "SELECT seq, request_id, started, finished, start_sent, context FROM txn "
                    "WHERE pending = 1 ORDER BY seq LIMIT ?",
                    (limit,),
                ).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT seq, request_id, started, finished, start_sent, context FROM txn "
                    "WHERE pending = 1 AND (finished IS NOT NULL OR since < ?) ORDER BY seq LIMIT ?",
                    (started_before, limit),
                ).fetchall()
        return [TxnRow(r[0], r[1], r[2], r[3], bool(r[4]), r[5]) for r in rows]

    def first_waiting_start(self) -> float | None:
        """When the oldest start still waiting for delivery without its outcome was spooled."""
        with self._mutex:
            row = self._db.execute(
                "SELECT min(since) FROM txn WHERE pending = 1 AND finished IS NULL"
            ).fetchone()
        return row[0] if row else None

    def start_delivered(self, seq: int) -> None:
        # A finish written meanwhile keeps the row pending.
        self.starts_delivered([seq])

    def txn_delivered(self, seq: int) -> None:
        self.txns_delivered([seq])

    def starts_delivered(self, seqs: list[int]) -> None:
        """`start_delivered` for a batch, in one transaction (one WAL commit, not one per row)."""
        self._each("UPDATE txn SET start_sent = 1, pending = (finished IS NOT NULL) WHERE seq = ?", seqs)

    def txns_delivered(self, seqs: list[int]) -> None:
        """Forgets delivered rows, in one transaction (one WAL commit, not one per row)."""
        self._each("DELETE FROM txn WHERE seq = ?", seqs)

    def _each(self, statement: str, seqs: list[int]) -> None:
        if not seqs:
            return
        with self._mutex:
            if len(seqs) == 1:
                self._db.execute(statement, (seqs[0],))
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(statement, [(seq,) for seq in seqs])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def pending_audit(self, limit: int) -> list[tuple[int, bytes]]:
        with self._mutex:
            return self._db.execute("SELECT seq, event FROM audit ORDER BY seq LIMIT ?", (limit,)).fetchall()

    def audit_contexts(self, seqs: list[int]) -> list[str]:
        """The span contexts (non-empty ones) that audit events `seqs` were spooled with."""
        if not seqs:
            return []
        with self._mutex:
            rows = self._db.execute(
                "SELECT context FROM audit WHERE seq BETWEEN ? AND ? AND context != ''",
                (min(seqs), max(seqs)),
            ).fetchall()
        return [r[0] for r in rows]

    def audit_delivered(self, up_to_seq: int, seqs: list[int] | None = None) -> None:
        with self._mutex:
            if seqs is None:
                self._db.execute("DELETE FROM audit WHERE seq <= ?", (up_to_seq,))
            else:
                self._db.executemany("DELETE FROM audit WHERE seq = ?", [(s,) for s in seqs])

    def bury(self, kind: str, seq: int, payload: bytes, error: str) -> None:
        """Moves a record the service refused as invalid to `dead`, atomically."""
        table = "txn" if kind == "transaction" else "audit"
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO dead (kind, payload, error, since) VALUES (?, ?, ?, ?)",
                    (kind, payload, error, time.time()),
                )
                self._db.execute(f"DELETE FROM {table} WHERE seq = ?", (seq,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def depth(self) -> tuple[int, int]:
        """(transaction rows, audit events) waiting for delivery."""
        with self._mutex:
            txn = self._db.execute("SELECT count(*) FROM txn WHERE pending = 1").fetchone()[0]
            audit = self._db.execute("SELECT count(*) FROM audit").fetchone()[0]
        return int(txn), int(audit)

    def oldest(self) -> tuple[float | None, float | None]:
        """Wall-clock time of the oldest undelivered (transaction, audit) record, None when none."""
        with self._mutex:
            txn = self._db.execute("SELECT since FROM txn WHERE pending = 1 ORDER BY seq LIMIT 1").fetchone()
            audit = self._db.execute("SELECT since FROM audit ORDER BY seq LIMIT 1").fetchone()
        return (txn[0] if txn else None), (audit[0] if audit else None)

    def dead_count(self) -> int:
        with self._mutex:
            return int(self._db.execute("SELECT count(*) FROM dead").fetchone()[0])

    def checkpoint(self) -> None:
        """Folds the WAL back into the database file. Run it off the event loop (it fsyncs): it uses its
        own connection and PASSIVE mode, so writers never wait for it."""
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            db.close()

    def close(self) -> None:
        with self._mutex:
            self._db.close()
        self._lock_file.close()
