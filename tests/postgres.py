"""An embedded PostgreSQL (pgserver) in a fresh temporary directory, for tests of services that own
tables. Not under pytest's basetemp: every pytest run resets /tmp/pytest-of-<user> to mode 0700,
which locks the `pgserver` system user (PostgreSQL runs as it under root) out of its data dir.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def embedded_postgres(prefix: str = "ferry-pg-") -> Iterator[str]:
    """Starts a private PostgreSQL and yields its URL; stops it and removes its data afterwards."""
    import pgserver

    top = Path(tempfile.mkdtemp(prefix=prefix))
    top.chmod(0o755)
    server = pgserver.get_server(top / "data", cleanup_mode="stop")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()
        shutil.rmtree(top, ignore_errors=True)
