"""The programs of `make run` that are not ferry's processes -- the embedded PostgreSQL and Triton (with
its Python backend stubs) -- get none of ferry's secrets, although supervisord's environment, which
every program inherits, carries them all (launcher/environment.py `foreign_environment`).

Triton: its real supervisord command line is run with supervisord's real environment (Stack._child_env
plus the program's own), with `env` standing in for tritonserver. PostgreSQL: launcher.postgres.run up
to its exec, which is caught."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

import launcher.postgres as postgres
from launcher.credentials import with_credentials
from launcher.nats import with_nats_credentials
from launcher.stack import Stack
from launcher.triton import TRITON_KEEPS, triton_program
from services.common.config import REPO_ROOT, Settings
from tests.stack import stack_settings

DATABASE_PASSWORD = "db-password-in-the-url"
# Conventional names ferry's settings read too, as an operator may have them in the launcher's shell.
ALIASES = {
    "REDIS_URL": "redis://:redis-password-in-the-url@cache.example:6379/0",
    "NATS_URL": "nats://ferry:nats-password-in-the-url@nats.example:4222",
}
ALIAS_PASSWORDS = {"redis-password-in-the-url", "nats-password-in-the-url"}


@pytest.fixture(autouse=True)
def _aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in ALIASES.items():
        monkeypatch.setenv(key, value)


def _settings(tmp_path: Path) -> Settings:
    """Settings with every secret `make run` makes filled in, as Stack.start leaves them."""
    settings = stack_settings(
        tmp_path,
        database_url=f"postgresql://ferry:{DATABASE_PASSWORD}@db.example/ferry",
        master_key="a-master-key-for-the-test-0123456789abcdef",
        triton={"access_secret": "triton-access-secret-for-the-test"},
    )
    settings, _ = with_credentials(settings)
    return with_nats_credentials(settings)


def _secrets(value: Any) -> set[str]:
    """Every SecretStr value in the settings."""
    if isinstance(value, SecretStr):
        return {value.get_secret_value()}
    if isinstance(value, BaseModel):
        return set().union(*(_secrets(getattr(value, name)) for name in type(value).model_fields))
    if isinstance(value, dict):
        return set().union(*(_secrets(item) for item in value.values()))
    if isinstance(value, list | tuple):
        return set().union(*(_secrets(item) for item in value))
    return set()


def _supervisord_env(settings: Settings, program_env: dict[str, str]) -> dict[str, str]:
    return {**Stack(settings)._child_env(), **program_env}


def _assert_no_secret(env: dict[str, str], settings: Settings, keep: tuple[str, ...] = ()) -> None:
    secrets = _secrets(settings) | {DATABASE_PASSWORD} | ALIAS_PASSWORDS
    assert settings.auth.service_token is not None and settings.triton.access_secret is not None
    assert len(secrets) >= 5, secrets  # service token, admin key, Triton secret, NATS passwords, ...
    leaked = sorted(key for key, value in env.items() if any(secret in value for secret in secrets))
    assert leaked == []
    ferry = sorted(key for key in env if key.startswith("FERRY_") or key in {"DATABASE_URL", *ALIASES})
    assert ferry == sorted(keep)


def test_supervisords_environment_carries_the_secrets(tmp_path: Path) -> None:
    """The premise: without the scrubbing every program would see them."""
    settings = _settings(tmp_path)
    env = _supervisord_env(settings, {})
    token = settings.auth.service_token
    assert token is not None and token.get_secret_value() in env.values()
    assert "DATABASE_URL" in env and ALIASES.items() <= env.items()


def test_triton_and_its_stubs_get_no_secret(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    program = triton_program(settings)
    env = _supervisord_env(settings, program.env)
    # The real command line up to tritonserver, which `env` replaces: it prints what Triton would get.
    argv = program.argv
    assert argv[argv.index("--") + 1].endswith("tritonserver")
    wrapper = [*argv[: argv.index("--") + 1], "/usr/bin/env", "-0"]
    out = subprocess.run(wrapper, env=env, cwd=REPO_ROOT, capture_output=True, check=True, timeout=120)
    seen = dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if item)
    _assert_no_secret(seen, settings, keep=TRITON_KEEPS)
    # What it needs stays: the home its backends read, the program's own library path and PATH.
    assert seen["FERRY_HOME"] == str(settings.home)
    assert seen["LD_LIBRARY_PATH"] == program.env["LD_LIBRARY_PATH"]
    assert seen["PATH"] == program.env["PATH"]


class _Exec(Exception):
    pass


def test_the_embedded_postgresql_gets_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(tmp_path)
    program = postgres.postgres_program(settings)
    for key, value in _supervisord_env(settings, program.env).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LANG", "C.UTF-8")
    seen: dict[str, dict[str, str]] = {}

    def initdb(pgdata: Path, env: dict[str, str]) -> None:
        seen["initdb"] = env

    def execve(path: str, argv: list[str], env: dict[str, str]) -> None:
        seen["postgres"] = env
        raise _Exec

    # Not as root (that would create the pgserver user) and no server started: run() up to its exec.
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(postgres, "_stop_leftover", lambda pgdata: None)
    monkeypatch.setattr(postgres, "_wait_for_orphans", lambda pgdata: None)
    monkeypatch.setattr(postgres, "_initdb", initdb)
    monkeypatch.setattr(os, "execve", execve)
    pgdata = tmp_path / "pgdata"
    with pytest.raises(_Exec):
        postgres.run(pgdata, postgres.socket_dir(pgdata))
    for env in seen.values():
        _assert_no_secret(env, settings)
        assert env["LANG"] == "C.UTF-8"
        assert env["PATH"] == os.environ["PATH"]
