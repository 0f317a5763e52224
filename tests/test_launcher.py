"""The platform as `make run` starts it: readiness, REST and native gRPC to the Models service,
per-service health and metrics, restarts, drain, and a second launch failing fast.

Tests using the `stack` fixture share one real stack per session (tests/conftest.py); the ones that
stop or kill a service wait for the stack to be ready again before they return.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from ferry.models.v1 import models_pb2, models_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from launcher.__main__ import auth_lines
from launcher.credentials import ADMIN_KEY_NAME, with_credentials
from launcher.environment import settings_env
from launcher.ports import free_ports
from launcher.stack import ADMIN_KEY_ENV, service_program
from services.common.config import REPO_ROOT, Settings
from tests.stack import RunningStack, python_env, stack_settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_NAMES = {
    "inference": "ferry.inference.v1.InferenceService",
    "models": "ferry.models.v1.ModelsService",
    "transactions": "ferry.transactions.v1.TransactionsService",
    "audit": "ferry.audit.v1.AuditService",
    "grammars": "ferry.grammars.v1.GrammarsService",
    "jobs": "ferry.jobs.v1.JobsService",
    "conversations": "ferry.conversations.v1.ConversationsService",
    "gateway": "ferry.keys.v1.KeysService",
}
DEFAULT_MODEL = "models/gemma-3-270m"


# -- without the stack ------------------------------------------------------------------------------


def test_children_see_exactly_the_launchers_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = stack_settings(
        tmp_path, database_url="postgresql://u@h/db", triton={"load_models": ["a", "b"], "grpc_port": 1234}
    )
    # A stray variable in the launcher's environment must not win over what it was given.
    monkeypatch.setenv("FERRY_MODELS__PORT", "1")
    for key, value in settings_env(settings).items():
        monkeypatch.setenv(key, value)
    assert Settings() == settings


def test_first_start_makes_a_private_admin_key_and_later_starts_reuse_it(tmp_path: Path) -> None:
    settings = stack_settings(tmp_path, bootstrap_admin_key=None)
    first, made = with_credentials(settings)
    assert made is not None and made.created
    path = tmp_path / ADMIN_KEY_NAME
    assert made.path == path
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text().strip() == made.secret
    assert made.secret.startswith("fry_")
    assert first.bootstrap_admin_key is not None
    assert first.bootstrap_admin_key.get_secret_value() == made.secret
    # The banner shows it this once ...
    assert any(made.secret in line for line in auth_lines(first, made))

    second, reused = with_credentials(settings)
    assert reused is not None and not reused.created
    assert reused.secret == made.secret
    # ... and never again: it names the file instead.
    lines = auth_lines(second, reused)
    assert not any(made.secret in line for line in lines)
    assert any(str(path) in line for line in lines)
    # The service token is fresh on every start.
    assert first.auth.service_token is not None and second.auth.service_token is not None
    assert first.auth.service_token != second.auth.service_token


def test_a_bootstrap_admin_key_from_the_settings_writes_no_file(tmp_path: Path) -> None:
    settings = stack_settings(tmp_path, bootstrap_admin_key="fry_chosen-by-the-operator")
    updated, admin = with_credentials(settings)
    assert admin is not None and admin.path is None and not admin.created
    assert admin.secret == "fry_chosen-by-the-operator"
    assert not (tmp_path / ADMIN_KEY_NAME).exists()
    assert not any(admin.secret in line for line in auth_lines(updated, admin))


def test_with_auth_off_nothing_is_made_and_the_banner_warns(tmp_path: Path) -> None:
    settings = stack_settings(tmp_path, bootstrap_admin_key=None, auth={"enabled": False})
    updated, admin = with_credentials(settings)
    assert admin is None
    assert updated.auth.service_token is None
    assert not (tmp_path / ADMIN_KEY_NAME).exists()
    assert "authentication is OFF" in "\n".join(auth_lines(updated, admin))


def test_only_the_gateway_is_given_the_admin_key(tmp_path: Path) -> None:
    settings, _ = with_credentials(stack_settings(tmp_path))
    assert settings.bootstrap_admin_key is not None
    secret = settings.bootstrap_admin_key.get_secret_value()
    assert service_program("gateway", settings).env[ADMIN_KEY_ENV] == secret
    assert service_program("gateway", settings).argv[-2:] == ["-m", "gateway"]
    assert ADMIN_KEY_ENV not in service_program("models", settings).env


def test_sigterm_reports_not_serving_before_the_process_exits(tmp_path: Path) -> None:
    """The drain of services/common/server.py, on a tiny service of its own."""
    port, metrics_port = free_ports(2)
    script = (
        "import asyncio\n"
        "from services.common.server import serve\n"
        "async def setup(runtime): pass\n"
        "asyncio.run(serve('tiny', lambda s: s.models, setup, service_names=['tiny.v1.Tiny']))\n"
    )
    env = {
        **os.environ,
        "FERRY_HOME": str(tmp_path),
        "FERRY_MODELS__PORT": str(port),
        "FERRY_MODELS__METRICS_PORT": str(metrics_port),
    }
    process = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO_ROOT)
    try:
        seen = _watch_through_sigterm(
            f"127.0.0.1:{port}", "tiny.v1.Tiny", lambda: process.send_signal(signal.SIGTERM)
        )
        assert process.wait(15) == 0
    finally:
        process.kill()
    assert seen[0] == SERVING
    assert NOT_SERVING in seen, seen


def _watch_through_sigterm(target: str, service: str, send_sigterm: object) -> list[int]:
    """Health statuses a Watch stream sees from before SIGTERM until the server goes away."""
    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=30)
    stub = health_pb2_grpc.HealthStub(channel)
    seen: list[int] = []
    first = threading.Event()

    def watch() -> None:
        try:
            for response in stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=30):
                seen.append(response.status)
                first.set()
        except grpc.RpcError:
            pass  # the server went away: the stream ends
        finally:
            first.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert first.wait(10)
    assert callable(send_sigterm)
    send_sigterm()
    watcher.join(20)
    channel.close()
    return seen


# -- on the stack ---------------------------------------------------------------------------------


@pytest.mark.stack
def test_ready_within_a_minute_of_the_start(stack: RunningStack) -> None:
    assert stack.ready_seconds < 60
    assert httpx.get(f"{stack.rest}/healthz").status_code == 200
    assert httpx.get(f"{stack.rest}/readyz").status_code == 200


@pytest.mark.stack
def test_rest_lists_the_default_model_as_ready(stack: RunningStack) -> None:
    with stack.http() as http:
        response = http.get("/api/v1/models", headers={"x-request-id": "rest-list-1"}, timeout=10)
    assert response.status_code == 200, response.text
    models = {m["name"]: m for m in response.json()["models"]}
    assert models[DEFAULT_MODEL]["state"] == "STATE_READY"
    assert models[DEFAULT_MODEL]["model_id"] == "gemma-3-270m"
    # Envoy's id and the service's (trailing metadata) are the same one, sent once.
    assert response.headers.get_list("x-request-id") == ["rest-list-1"]


@pytest.mark.stack
def test_native_grpc_through_envoy_reaches_the_models_service(stack: RunningStack) -> None:
    stub = models_pb2_grpc.ModelsServiceStub(stack.channel())
    listed = stub.ListModels(models_pb2.ListModelsRequest(), timeout=10)
    assert DEFAULT_MODEL in [m.name for m in listed.models]
    model = stub.GetModel(models_pb2.GetModelRequest(name=DEFAULT_MODEL), timeout=10)
    assert model.state == models_pb2.Model.STATE_READY
    with pytest.raises(grpc.RpcError) as missing:
        stub.GetModel(models_pb2.GetModelRequest(name="models/no-such-model"), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.stack
def test_rest_errors_carry_the_mapped_status_and_details(stack: RunningStack) -> None:
    with stack.http() as http:
        response = http.get("/api/v1/models/no-such-model", headers={"x-request-id": "rest-missing-1"})
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.headers.get_list("x-request-id") == ["rest-missing-1"]
    body = response.json()
    assert body["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert any(d["@type"].endswith("google.rpc.ErrorInfo") for d in body["details"])


@pytest.mark.stack
@pytest.mark.parametrize("name", sorted(SERVICE_NAMES))
def test_each_service_answers_health_on_its_own_port(stack: RunningStack, name: str) -> None:
    stub = health_pb2_grpc.HealthStub(stack.channel(stack.service_targets[name]))
    for service in ("", SERVICE_NAMES[name]):
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == SERVING, (name, service)


@pytest.mark.stack
@pytest.mark.parametrize("name", sorted(SERVICE_NAMES))
def test_each_service_exposes_ferry_metrics(stack: RunningStack, name: str) -> None:
    response = httpx.get(stack.metrics_urls[name], timeout=5)
    assert response.status_code == 200
    assert "ferry_grpc_server_handled" in response.text


@pytest.mark.stack
def test_envoy_and_triton_expose_metrics(stack: RunningStack) -> None:
    envoy = httpx.get(f"{stack.envoy_admin}/stats/prometheus", timeout=5).text
    assert "envoy_cluster_health_check_healthy" in envoy
    triton = httpx.get(stack.stack.endpoints.triton_metrics, timeout=5).text
    assert 'nv_inference_count{model="gemma-3-270m"' in triton


@pytest.mark.stack
@pytest.mark.parametrize("name", ["models", "gateway"])  # any service, and the gateway too
def test_readyz_fails_while_a_service_is_down_and_recovers(stack: RunningStack, name: str) -> None:
    supervisor = stack.supervisor()
    supervisor.stop(name)
    try:
        assert _readyz_becomes(stack, 503, seconds=5.0)
    finally:
        supervisor.start(name)
    stack.wait_serving(name)


@pytest.mark.stack
def test_a_killed_service_is_restarted_and_the_restart_is_logged(stack: RunningStack) -> None:
    supervisor = stack.supervisor()
    before = supervisor.pid("models")
    supervisor.signal("models", "KILL")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = supervisor.process("models")
        if info["statename"] in {"STARTING", "RUNNING"} and info["pid"] not in (0, before):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"models was not restarted: {supervisor.process('models')}")
    log = (stack.settings.log_dir / "supervisord.log").read_text()
    assert "exited: models (terminated by SIGKILL; not expected)" in log
    stack.wait_serving("models")


@pytest.mark.stack
def test_a_stopping_service_reports_not_serving_before_it_exits(stack: RunningStack) -> None:
    supervisor = stack.supervisor()
    seen = _watch_through_sigterm(
        stack.service_targets["models"],
        SERVICE_NAMES["models"],
        lambda: supervisor.signal("models", "TERM"),
    )
    assert seen[0] == SERVING
    assert NOT_SERVING in seen, seen
    stack.wait_serving("models")


def _launch(settings: Settings) -> subprocess.CompletedProcess[str]:
    """`python -m launcher` with these settings, to its end (one that should refuse to start)."""
    return subprocess.run(
        [sys.executable, "-m", "launcher"],
        env=python_env(settings),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.stack
def test_a_second_launcher_fails_fast_with_a_clear_message(stack: RunningStack) -> None:
    started = time.monotonic()
    result = _launch(stack.settings)
    assert result.returncode == 1
    assert "another ferry is already running" in result.stdout
    assert time.monotonic() - started < 15
    assert httpx.get(f"{stack.rest}/readyz").status_code == 200  # the first one is untouched


@pytest.mark.stack
def test_a_launcher_whose_ports_are_taken_fails_fast(stack: RunningStack, tmp_path: Path) -> None:
    other = stack_settings(tmp_path / "home", envoy={"port": stack.settings.envoy.port})
    result = _launch(other)
    assert result.returncode == 1
    assert "already in use" in result.stdout
    assert "envoy.port" in result.stdout and "FERRY_ENVOY__PORT" in result.stdout
    # Nothing was started: no database, no supervisord configuration.
    assert not (tmp_path / "home" / "pgdata").exists()
    assert not (other.run_dir / "supervisord.conf").exists()


def _readyz_becomes(stack: RunningStack, status: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if httpx.get(f"{stack.rest}/readyz").status_code == status:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.stack
def test_the_service_token_is_only_in_files_no_one_else_can_read(stack: RunningStack) -> None:
    token = stack.stack.settings.auth.service_token
    assert token is not None
    secret = token.get_secret_value().encode()
    holders = []
    for folder in (stack.settings.run_dir, stack.settings.log_dir):
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink() and secret in path.read_bytes():
                holders.append(path)
                assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    # Envoy's configuration holds it (ext_authz, x-ferry-edge); no log does.
    assert stack.settings.run_dir / "envoy.yaml" in holders
    assert not [p for p in holders if p.is_relative_to(stack.settings.log_dir)]
