"""ferry under test: the whole platform started through the launcher's own `Stack`, as `make run` does.

Each stack gets its own FERRY_HOME (a scratch folder; the model file is shared by a symlink) and free
ports, so the benchmark runs beside anyone's `make run` or test session.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from launcher.ports import free_ports
from launcher.stack import SERVICES, Stack
from services.common.config import REPO_ROOT, Settings
from services.common.tokens import new_key_secret

BENCH_MODELS = REPO_ROOT / "bench" / "models"
READY_TIMEOUT_S = 180.0


def _settings(home: Path, **overrides: Any) -> Settings:
    ports = iter(free_ports(5 + 2 * len(SERVICES)))
    values: dict[str, Any] = {
        "home": home,
        "log_level": "WARNING",
        # Authentication stays on, as users run it: the clients send this admin key.
        "bootstrap_admin_key": new_key_secret(),
        "envoy": {"port": next(ports), "admin_port": next(ports)},
        "triton": {"grpc_port": next(ports), "http_port": next(ports), "metrics_port": next(ports)},
    }
    for name in SERVICES:
        values[name] = {"port": next(ports), "metrics_port": next(ports)}
    _other_ports_free(values)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return Settings(**values)


def _other_ports_free(values: dict[str, Any]) -> None:
    """Every other port setting (NATS, job workers' metrics, ...) on a free port too, so that two
    stacks (the tracing comparison) or a stack beside `make run` never collide."""
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        if not isinstance(default, BaseModel):
            continue
        section = values.get(name, {})
        missing = [k for k in type(default).model_fields if k.endswith("port") and k not in section]
        if missing:
            values[name] = {**section, **dict(zip(missing, free_ports(len(missing)), strict=True))}


@contextmanager
def running(model_dir: Path, keep_logs: Path | None = None, **overrides: Any) -> Iterator[Stack]:
    """A ready stack; stopped (and its scratch home removed) on exit. Logs go to `keep_logs` if set."""
    # Not under a 0700 pytest-style folder: embedded PostgreSQL runs as its own user when we are root.
    scratch = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
    home = scratch / "home"
    home.mkdir()
    (home / "models").symlink_to(model_dir, target_is_directory=True)
    settings = _settings(home, **overrides)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    try:
        with (settings.log_dir / "supervisord.out").open("w") as output:
            stack = Stack(settings, supervisor_output=output)
            stack.start()
            try:
                stack.wait_ready(READY_TIMEOUT_S)
                yield stack
            finally:
                stack.stop()
    finally:
        if keep_logs is not None and settings.log_dir.exists():
            shutil.copytree(settings.log_dir, keep_logs, dirs_exist_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)


def bench_model_overrides() -> dict[str, Any]:
    """Settings that point a stack's Triton and Inference service at the trivial streaming model."""
    return {
        "triton": {
            "repository": BENCH_MODELS,
            "default_model": "bench-stream",
            "load_models": ["bench-stream"],
        }
    }


def api_key(stack: Stack) -> str | None:
    """The key the benchmark's clients send (None when authentication is off)."""
    return stack.admin_key.secret if stack.admin_key is not None else None
