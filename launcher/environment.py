"""The Settings a launcher was given, written out as the `FERRY_*` environment of its children; and the
environment of the children that are not ferry's processes, which gets none of it.

Every field is exported explicitly, so a child process sees exactly the launcher's settings:
environment variables win over a YAML file in the child, and these replace any inherited ones.

supervisord runs every program with that environment (its own, to which a program's `environment=`
can only add), secrets included: the service token, the Triton access secret, NATS and database
passwords. PostgreSQL and Triton (with its Python backend stubs) need none of it, and a process's
environment is readable by whoever controls it (any SQL superuser can read the postmaster's; a model's
code runs in Triton's stubs). `foreign_environment` is what such a process gets instead, and
`python -m launcher.environment [--keep NAME]... -- PROGRAM ARGS...` runs a program with it (Triton's
supervisord command; the embedded PostgreSQL applies it itself before its exec).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, SecretStr
from pydantic_core import to_jsonable_python

if TYPE_CHECKING:  # not at run time: `python -m launcher.environment` stays quick to start
    from services.common.config import Settings

PREFIX = "FERRY_"
DELIMITER = "__"
# Beyond every FERRY_* variable: what else settings_env exports (the database URL, with its password),
# the conventional names ferry's settings also read (REDIS_URL, NATS_URL: URLs that may hold a
# password) and a PostgreSQL client's password, which a server has no use for.
SECRET_NAMES = frozenset({"DATABASE_URL", "REDIS_URL", "NATS_URL", "PGPASSWORD"})


def _encode(value: Any) -> str:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    # Lists and mappings (of models too, e.g. `upstream_models`): pydantic-settings parses JSON.
    return json.dumps(to_jsonable_python(_revealed(value)))


def _revealed(value: Any) -> Any:
    """`value` with the secrets nested in it (e.g. `webhooks.sources.<name>.secret`) as their values:
    JSON would write them masked, and the child would read the mask as the secret."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, BaseModel):
        return {name: _revealed(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, dict):
        return {key: _revealed(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_revealed(item) for item in value]
    return value


def _flatten(prefix: str, model: BaseModel, out: dict[str, str]) -> None:
    for name in type(model).model_fields:
        value = getattr(model, name)
        key = f"{prefix}{name.upper()}"
        if isinstance(value, BaseModel):
            _flatten(f"{key}{DELIMITER}", value, out)
        elif value is not None:
            out[key] = _encode(value)


def settings_env(settings: Settings) -> dict[str, str]:
    """`FERRY_*` variables (plus DATABASE_URL) that reproduce `settings` in a child process."""
    env: dict[str, str] = {}
    _flatten(PREFIX, settings, env)
    # The database URL is read from either alias; set both so neither can disagree.
    env.pop(f"{PREFIX}DATABASE_URL", None)
    if settings.database_url:
        env["DATABASE_URL"] = settings.database_url
        env["FERRY_DATABASE_URL"] = settings.database_url
    return env


def foreign_environment(environ: Mapping[str, str], keep: Iterable[str] = ()) -> dict[str, str]:
    """`environ` for a program that is not a ferry process: without ferry's settings and secrets (every
    FERRY_* variable and SECRET_NAMES) except the names in `keep` (e.g. Triton's backends
    read FERRY_HOME); everything else (PATH, LANG, LC_*, HOME, LD_LIBRARY_PATH, ...) stays."""
    kept = set(keep)
    return {
        key: value
        for key, value in environ.items()
        if key in kept or not (key.startswith(PREFIX) or key in SECRET_NAMES)
    }


def foreign_argv(argv: list[str], keep: Iterable[str] = ()) -> list[str]:
    """A command line that runs `argv` with `foreign_environment` (see `main`)."""
    keeps = [arg for name in keep for arg in ("--keep", name)]
    return [sys.executable, "-m", "launcher.environment", *keeps, "--", *argv]


def main(args: list[str]) -> None:
    """`[--keep NAME]... -- PROGRAM ARGS...`: replaces this process (same pid, so supervisord's signals
    reach the program) with PROGRAM, in `foreign_environment`."""
    keep = []
    while args and args[0] == "--keep" and len(args) > 1:
        keep.append(args[1])
        args = args[2:]
    if not args or args[0] != "--" or len(args) < 2:
        sys.exit("usage: python -m launcher.environment [--keep NAME]... -- PROGRAM [ARGS...]")
    program = args[1:]
    os.execve(program[0], program, foreign_environment(os.environ, keep))


if __name__ == "__main__":
    main(sys.argv[1:])
