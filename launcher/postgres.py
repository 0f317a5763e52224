"""The embedded PostgreSQL (pgserver) that `make run` starts when no DATABASE_URL is given.

pgserver runs `pg_ctl start`, so PostgreSQL is a daemon of its own rather than a supervisord
child; the launcher starts it before the services and stops it after them. It listens on a Unix
socket only (in the data directory), so it takes no TCP port. As root, pgserver runs it as the
`pgserver` system user.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from services.common.config import Settings

log = logging.getLogger(__name__)


def data_dir(settings: Settings) -> Path:
    # The same folder services.common.database falls back to without DATABASE_URL.
    return settings.home / "pgdata"


@dataclass
class EmbeddedPostgres:
    pgdata: Path
    uri: str
    system_user: str | None

    def stop(self) -> None:
        """Fast shutdown (open sessions are ended); a server that is already gone is fine."""
        from pgserver._commands import pg_ctl  # pgserver's own wrapper: right binary and user

        if not (self.pgdata / "postmaster.pid").exists():
            return
        try:
            pg_ctl(["-w", "-m", "fast", "-t", "30", "stop"], pgdata=self.pgdata, user=self.system_user)
        except subprocess.CalledProcessError as err:
            log.warning("pg_ctl stop failed (%s); PostgreSQL may already be stopped", err)


def start_embedded(settings: Settings) -> EmbeddedPostgres:
    """Initialises the data directory on first use, starts PostgreSQL (or adopts a running one)."""
    import pgserver

    pgdata = data_dir(settings)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: stopping is ours to do (its own bookkeeping skips the stop when a stale
    # process id from an earlier, killed run is still on its list).
    server = pgserver.get_server(pgdata, cleanup_mode=None)
    system_user = "pgserver" if os.geteuid() == 0 else None
    return EmbeddedPostgres(pgdata=pgdata, uri=str(server.get_uri()), system_user=system_user)
