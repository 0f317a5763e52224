"""The embedded PostgreSQL that `make run` runs when no DATABASE_URL is given: a supervisord program.

PostgreSQL 16 comes from the `pgserver` package (its bundled binaries and its arrangement: as root, the
server runs as the `pgserver` system user). The launcher does not start it as a daemon of its own
(`pg_ctl start`): supervisord runs `python -m launcher.postgres`, which prepares and then *becomes*
the server (exec), in the foreground, so that supervisord restarts it with backoff when it dies
(even by SIGKILL) and stops it last, with a fast shutdown (SIGINT to the postmaster only).

Before the exec, as root: the data directory is created owner-only (0700) for the server's user and
its parent folders made traversable (pgserver's rule). Then, as that user: a server left running on
this data directory by an older ferry (`pg_ctl start`) is stopped; after a crash, the dead
postmaster's children are waited for (PostgreSQL refuses to start while they still hold its shared
memory; a stale postmaster.pid it removes itself); the first start runs initdb. The server listens on
a unix socket only, owner-only (`unix_socket_permissions=0700`): trust authentication over it admits
only its owner (and root).

The server gets none of ferry's settings and secrets: supervisord's environment carries every FERRY_*
variable (service token, passwords) and DATABASE_URL, and any SQL superuser can read the postmaster's
environment; `launcher.environment.foreign_environment` leaves them out of initdb's and the server's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from launcher.environment import foreign_environment
from launcher.programs import Program
from services.common.config import REPO_ROOT, Settings

log = logging.getLogger("launcher.postgres")

PROGRAM = "postgres"
# Below NATS (50) and Triton (100): started first, stopped last.
PRIORITY = 10
PORT = 5432
SOCKET_NAME = f".s.PGSQL.{PORT}"
# Unix socket paths are limited to 108 bytes (with the terminating NUL).
MAX_SOCKET_PATH = 107
DATABASE_USER = "postgres"
SYSTEM_USER = "pgserver"
# A crashed postmaster's children notice its death at once; beyond this they are ended.
ORPHAN_WAIT_SECONDS = 10.0
LEFTOVER_STOP_SECONDS = 30.0


def data_dir(settings: Settings) -> Path:
    # The same folder services.common.database falls back to without DATABASE_URL.
    return settings.home / "pgdata"


def socket_dir(pgdata: Path) -> Path:
    """The data directory itself (owner-only); a private folder in the temp dir when its path is
    too long for a unix socket."""
    pgdata = pgdata.resolve()
    if len(str(pgdata / SOCKET_NAME)) <= MAX_SOCKET_PATH:
        return pgdata
    digest = hashlib.sha256(str(pgdata).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"ferry-pg-{digest}"


def embedded_uri(settings: Settings) -> str:
    """The connection URI of the embedded server (the unix socket; known before it starts)."""
    return f"postgresql://{DATABASE_USER}:@/{DATABASE_USER}?host={socket_dir(data_dir(settings))}"


def _bin(name: str) -> Path:
    with warnings.catch_warnings():
        # platformdirs (imported by pgserver) warns when XDG_RUNTIME_DIR is unset: harmless here.
        warnings.simplefilter("ignore")
        from pgserver._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH) / name


def postgres_program(settings: Settings) -> Program:
    pgdata = data_dir(settings).resolve()
    return Program(
        name=PROGRAM,
        argv=[sys.executable, "-m", "launcher.postgres", str(pgdata), str(socket_dir(pgdata))],
        env={"PYTHONUNBUFFERED": "1"},
        cwd=REPO_ROOT,
        priority=PRIORITY,
        # Fast shutdown: sessions are ended, the server stops at once (SIGTERM would wait for every
        # client to leave). To the postmaster only: it stops its children itself.
        stop_signal="INT",
        stop_as_group=False,
        stop_wait_seconds=30,
    )


# -- the program (runs under supervisord) ------------------------------------------------------------


def _prepare_as_root(pgdata: Path, sockets: Path) -> tuple[int, int]:
    """Creates what the server's user needs; returns its (uid, gid)."""
    import pwd

    from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

    entry = ensure_user_exists(SYSTEM_USER)
    assert entry is not None
    pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
    ensure_prefix_permissions(pgdata)
    for folder in {pgdata, sockets}:
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
        folder.chmod(0o700)
    user = pwd.getpwnam(SYSTEM_USER)
    return user.pw_uid, user.pw_gid


def _become(uid: int, gid: int) -> None:
    import pwd

    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    os.environ["HOME"] = pwd.getpwuid(uid).pw_dir
    os.environ["USER"] = os.environ["LOGNAME"] = SYSTEM_USER


def _postmaster_pid(pgdata: Path) -> int | None:
    try:
        first = (pgdata / "postmaster.pid").read_text().splitlines()[0]
        return int(first.strip())
    except (OSError, IndexError, ValueError):
        return None


def _stop_leftover(pgdata: Path) -> None:
    """A live postmaster of this data directory that supervisord does not know (started by an older
    ferry, or by a service run alone): fast shutdown, so that ours can start."""
    import psutil

    pid = _postmaster_pid(pgdata)
    if pid is None or pid == os.getpid():
        return
    try:
        proc = psutil.Process(pid)
        if proc.name() != "postgres" or str(pgdata) not in " ".join(proc.cmdline()):
            return
    except psutil.Error:
        return
    log.warning("stopping a PostgreSQL (pid %d) left running on %s", pid, pgdata)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(LEFTOVER_STOP_SECONDS)
    except psutil.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _wait_for_orphans(pgdata: Path) -> None:
    """After a postmaster was killed, its children exit as soon as they notice; PostgreSQL will not
    start while any of them holds the old shared memory. They run in the data directory."""
    import psutil

    def orphans() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["name", "uids"]):
            try:
                if proc.info["name"] == "postgres" and proc.info["uids"].real == os.getuid():
                    if proc.cwd() == str(pgdata):
                        found.append(proc)
            except psutil.Error:
                continue
        return found

    pid = _postmaster_pid(pgdata)
    if pid is not None and psutil.pid_exists(pid):
        return  # a live postmaster: _stop_leftover's case, not a crash
    deadline = time.monotonic() + ORPHAN_WAIT_SECONDS
    while orphans() and time.monotonic() < deadline:
        time.sleep(0.1)
    for proc in orphans():
        log.warning("ending pid %d, a child of a PostgreSQL that died", proc.pid)
        proc.kill()


def _initdb(pgdata: Path, env: dict[str, str]) -> None:
    if (pgdata / "PG_VERSION").exists():
        return
    log.info("initialising the embedded PostgreSQL in %s", pgdata)
    subprocess.run(
        [
            str(_bin("initdb")),
            "-D",
            str(pgdata),
            "--auth=trust",
            "--auth-local=trust",
            "--encoding=utf8",
            "-U",
            DATABASE_USER,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        env=env,
    )


def run(pgdata: Path, sockets: Path) -> None:
    """Prepares, then replaces this process with the postmaster (never returns)."""
    if os.geteuid() == 0:
        uid, gid = _prepare_as_root(pgdata, sockets)
        _become(uid, gid)
    else:
        pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
        sockets.mkdir(mode=0o700, exist_ok=True)
        sockets.chmod(0o700)
    _stop_leftover(pgdata)
    _wait_for_orphans(pgdata)
    # What the server needs (PATH, HOME and USER as _become set them, LANG/LC_*, TZ) and none of
    # ferry's settings and secrets.
    env = foreign_environment(os.environ)
    _initdb(pgdata, env)
    pgdata.chmod(0o700)
    postgres = str(_bin("postgres"))
    os.execve(
        postgres,
        [
            postgres,
            "-D",
            str(pgdata),
            "-p",
            str(PORT),
            "-k",
            str(sockets),
            "-c",
            "listen_addresses=",
            "-c",
            "unix_socket_permissions=0700",
        ],
        env,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s launcher.postgres %(message)s")
    run(Path(sys.argv[1]), Path(sys.argv[2]))
