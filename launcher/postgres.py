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
import warnings
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
        from pgserver._commands import POSTGRES_BIN_PATH

        if not (self.pgdata / "postmaster.pid").exists():
            return
        result = subprocess.run(
            [
                str(POSTGRES_BIN_PATH / "pg_ctl"),
                "-D",
                str(self.pgdata),
                "-w",
                "-m",
                "fast",
                "-t",
                "30",
                "stop",
            ],
            user=self.system_user,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            log.warning("pg_ctl stop failed (%s); PostgreSQL may already be stopped", result.stderr.strip())


def start_embedded(settings: Settings) -> EmbeddedPostgres:
    """Initialises the data directory on first use, starts PostgreSQL (or adopts a running one)."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (it falls back to /tmp): harmless here.
        warnings.simplefilter("ignore")
        import pgserver

    pgdata = data_dir(settings)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: stopping is ours to do (its own bookkeeping skips the stop when a stale
    # process id from an earlier, killed run is still on its list).
    server = pgserver.get_server(pgdata, cleanup_mode=None)
    system_user = "pgserver" if os.geteuid() == 0 else None
    return EmbeddedPostgres(pgdata=pgdata, uri=str(server.get_uri()), system_user=system_user)
