"""compose.yaml and compose.dev.yaml: valid Compose, and the same ports, names and health as `make run`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from launcher.triton import triton_argv
from services.common.config import Settings
from tests.deploy.tools import (
    COMMANDS,
    COMPOSE,
    COMPOSE_DEV,
    DATABASE_OWNERS,
    REPO_ROOT,
    SERVICES,
    load_yaml,
    unknown_env_names,
    validate_compose,
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(COMPOSE)
    return loaded


@pytest.fixture(scope="module")
def compose_dev() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(COMPOSE_DEV)
    return loaded


def test_compose_files_follow_the_compose_specification() -> None:
    result = validate_compose(COMPOSE, COMPOSE_DEV)
    assert result.returncode == 0, result.output


def test_a_broken_compose_file_fails_the_schema(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    text = COMPOSE.read_text().replace("    restart: unless-stopped\n", "    restart_policy: always\n", 1)
    assert text != COMPOSE.read_text()
    broken.write_text(text)
    result = validate_compose(broken)
    assert result.returncode != 0
    assert "restart_policy" in result.output


def test_published_ports_are_make_runs(compose: dict[str, Any]) -> None:
    s = Settings()
    services = compose["services"]
    for name in SERVICES:
        where = getattr(s, name)
        assert set(services[name]["ports"]) == {
            f"127.0.0.1:{where.port}:{where.port}",
            f"127.0.0.1:{where.metrics_port}:{where.metrics_port}",
        }, name
    triton = {s.triton.http_port, s.triton.grpc_port, s.triton.metrics_port}
    for name in ("triton", "triton-gpu"):
        assert set(services[name]["ports"]) == {f"127.0.0.1:{p}:{p}" for p in triton}, name
    assert set(services["envoy"]["ports"]) == {
        f"${{FERRY_BIND:-127.0.0.1}}:{s.envoy.port}:{s.envoy.port}",
        f"127.0.0.1:{s.envoy.admin_port}:{s.envoy.admin_port}",
    }


def test_each_service_runs_its_module_binds_all_interfaces_and_finds_the_others(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    for name in SERVICES:
        service = services[name]
        env = service["environment"]
        assert service["command"] == COMMANDS[name]
        # The image's HEALTHCHECK asks about the service FERRY_SERVICE names.
        assert env["FERRY_SERVICE"] == name
        assert env[f"FERRY_{name.upper()}__HOST"] == "0.0.0.0"
        for other in set(SERVICES) - {name}:
            assert env[f"FERRY_{other.upper()}__HOST"] == other
            assert other in services
        assert env["FERRY_TRITON__HOST"] == "${FERRY_TRITON_HOST:-triton}"
        assert env["DATABASE_URL"].startswith("postgresql://ferry@postgres:5432/")
        # One spool directory per process: a spool is owned by one process at a time.
        assert env["FERRY_RECORDING__SPOOL_DIR"] == f"/var/lib/ferry/spool/{name}"
        assert "spool:/var/lib/ferry/spool" in service["volumes"]


def test_every_ferry_variable_is_a_setting(compose: dict[str, Any], compose_dev: dict[str, Any]) -> None:
    names = {
        key
        for document in (compose, compose_dev)
        for service in document["services"].values()
        for key in (service.get("environment") or {})
        if key.startswith(("FERRY_", "DATABASE_URL", "PG"))
    }
    assert "FERRY_TRITON__HOST" in names
    assert unknown_env_names(names) == set()


def test_a_misspelt_variable_is_caught() -> None:
    assert unknown_env_names({"FERRY_TRITON__GRPCPORT", "FERRY_MODEL__PORT"}) == {
        "FERRY_TRITON__GRPCPORT",
        "FERRY_MODEL__PORT",
    }


def test_startup_waits_on_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["postgres"]["healthcheck"]["test"][1] == "pg_isready"
    for name in DATABASE_OWNERS:
        assert services[name]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    # The web chat process (services/conversations/web.py) answers HTTP health, not gRPC.
    edge = [*SERVICES, "conversations-web"]
    assert services["envoy"]["depends_on"] == {name: {"condition": "service_healthy"} for name in edge}


def test_record_keepers_stop_after_the_services_that_send_them_records(compose: dict[str, Any]) -> None:
    # Compose stops a service's dependents first: every service that records (transactions, audit
    # events) depends on transactions and audit, and transactions on audit, as `make run` orders them
    # (launcher/stack.py, RECORD_KEEPERS), so a stopping service's last records are delivered.
    services = compose["services"]
    started = {"condition": "service_started"}
    senders = [name for name in SERVICES if name not in ("transactions", "audit")]
    for name in senders:
        depends = services[name]["depends_on"]
        assert depends["transactions"] == started and depends["audit"] == started, name
    assert services["transactions"]["depends_on"]["audit"] == started
    assert "transactions" not in services["audit"]["depends_on"]


def test_volumes_and_secrets(compose: dict[str, Any]) -> None:
    assert {"db", "spool"} <= set(compose["volumes"])
    assert "db:/var/lib/postgresql/data" in compose["services"]["postgres"]["volumes"]
    assert set(compose["secrets"]) == {
        "postgres_password",
        "service_token",
        "bootstrap_admin_key",
        "master_key",
        "nats_internal_password",
        "nats_client_password",
        "triton_secret",
    }
    for secret in compose["secrets"].values():
        # Made by deploy/compose/secrets.sh and kept out of git.
        assert secret["file"].startswith("./deploy/compose/secrets/")
    for name in SERVICES:
        service = compose["services"][name]
        env = service["environment"]
        assert env["PGPASSWORD_FILE"] == "/run/secrets/postgres_password"
        # Every process knows the service token; only the gateway, which inserts it, the admin key.
        assert env["FERRY_AUTH__SERVICE_TOKEN_FILE"] == "/run/secrets/service_token"
        if name == "gateway":
            assert set(service["secrets"]) == {
                "postgres_password",
                "service_token",
                "bootstrap_admin_key",
                "master_key",
            }
            assert env["FERRY_BOOTSTRAP_ADMIN_KEY_FILE"] == "/run/secrets/bootstrap_admin_key"
            # Every gateway replica seals and opens webhook signing secrets with the same key.
            assert env["FERRY_MASTER_KEY_FILE"] == "/run/secrets/master_key"
        elif name == "jobs":
            # It speaks NATS as ferry's internal user.
            assert set(service["secrets"]) == {"postgres_password", "service_token", "nats_internal_password"}
            assert env["FERRY_NATS__INTERNAL_PASSWORD_FILE"] == "/run/secrets/nats_internal_password"
        elif name in TRITON_CALLERS:
            # It calls Triton, which answers only callers showing the access secret.
            assert set(service["secrets"]) == {"postgres_password", "service_token", "triton_secret"}
            assert env["FERRY_TRITON__ACCESS_SECRET_FILE"] == "/run/secrets/triton_secret"
        else:
            assert set(service["secrets"]) == {"postgres_password", "service_token"}
            assert "FERRY_BOOTSTRAP_ADMIN_KEY_FILE" not in env
    worker = compose["services"]["jobs-worker"]
    assert (
        worker["environment"]["FERRY_NATS__INTERNAL_PASSWORD_FILE"] == "/run/secrets/nats_internal_password"
    )
    # NATS takes logins only, with the config Kubernetes uses too (deploy/k8s/base/nats.yaml).
    nats = compose["services"]["nats"]
    assert set(nats["secrets"]) == {"nats_internal_password", "nats_client_password"}
    assert "./deploy/compose/nats.conf:/etc/nats/nats.conf:ro" in nats["volumes"]
    assert "--config /etc/nats/nats.conf" in nats["command"][0]
    # Envoy's entrypoint puts the token into its configuration (ext_authz, x-ferry-edge).
    envoy = compose["services"]["envoy"]
    assert envoy["secrets"] == ["service_token"]
    assert envoy["environment"]["FERRY_AUTH__SERVICE_TOKEN_FILE"] == "/run/secrets/service_token"
    postgres = compose["services"]["postgres"]["environment"]
    assert postgres["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    ignored = (REPO_ROOT / "deploy/compose/secrets/.gitignore").read_text().split()
    assert "*" in ignored


# The services that call Triton (and so need its access secret).
TRITON_CALLERS = ("inference", "models", "grammars", "conversations")


def test_triton_gets_its_access_secret(compose: dict[str, Any]) -> None:
    for name in ("triton", "triton-gpu"):
        triton = compose["services"][name]
        assert triton["secrets"] == ["triton_secret"]
        assert triton["environment"]["FERRY_TRITON__ACCESS_SECRET_FILE"] == "/run/secrets/triton_secret"
    for name in SERVICES:
        if name not in TRITON_CALLERS:
            assert "triton_secret" not in compose["services"][name]["secrets"], name


def test_secret_script_makes_readable_random_secrets(tmp_path: Path) -> None:
    import shutil
    import subprocess

    script = tmp_path / "secrets.sh"
    shutil.copy(REPO_ROOT / "deploy/compose/secrets.sh", script)
    subprocess.run(["sh", str(script)], check=True, capture_output=True)
    first = (tmp_path / "secrets/postgres_password").read_text()
    assert len(first) >= 32 and first.replace("-", "").replace("_", "").isalnum()
    token = (tmp_path / "secrets/service_token").read_text()
    assert len(token) >= 32 and token != first
    assert (tmp_path / "secrets/bootstrap_admin_key").read_text().startswith("fry_")
    # Containers' unprivileged users must read them; the directory keeps other host users out.
    assert (tmp_path / "secrets/postgres_password").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "secrets").stat().st_mode & 0o777 == 0o700
    subprocess.run(["sh", str(script)], check=True, capture_output=True)
    assert (tmp_path / "secrets/postgres_password").read_text() == first


def test_gpu_profile_reserves_a_gpu_for_the_cuda_engine(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["triton-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["args"]["ENGINE"].startswith("cu")
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    cpu = compose["services"]["triton"]
    assert "profiles" not in cpu
    assert cpu["build"]["args"]["ENGINE"] == "cpu"
    assert "deploy" not in cpu


def flag_values(argv: list[str]) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for arg in argv:
        if arg.startswith("--"):
            key, _, value = arg.partition("=")
            values.setdefault(key, []).append(value)
    return values


# Flags whose values are paths of the host or of the container, or bind addresses.
LOCAL_FLAGS = {
    "--model-repository",
    "--backend-directory",
    "--cache-directory",
    "--backend-config",
    "--grpc-address",
    "--http-address",
    "--metrics-address",
}


def test_triton_runs_with_make_runs_flags(compose: dict[str, Any]) -> None:
    launcher = flag_values(triton_argv(Settings()))
    for name in ("triton", "triton-gpu"):
        command = compose["services"][name]["command"]
        assert command[0] == "tritonserver"
        container = flag_values(command[1:])
        for flag, values in launcher.items():
            if flag in LOCAL_FLAGS or (name == "triton-gpu" and flag in GPU_ONLY_DIFFERENCES):
                continue
            assert container.get(flag) == values, (name, flag)
        assert container["--model-repository"] == ["/opt/ferry/model-repository"]


# On a GPU, GPU metrics and pinned memory are wanted: the CPU-only flags are left out.
GPU_ONLY_DIFFERENCES = {"--allow-gpu-metrics", "--pinned-memory-pool-byte-size"}


def test_dev_file_adds_a_database_browser_and_resets_the_database(compose_dev: dict[str, Any]) -> None:
    from typing import get_args

    from services.common.config import DatabaseSettings

    services = compose_dev["services"]
    assert services["adminer"]["image"].startswith("adminer:")
    assert services["adminer"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    mode = DatabaseSettings.model_fields["migration_mode"]
    assert "drop_recreate" in get_args(mode.annotation)
    for owner in ("transactions", "audit", "grammars", "conversations", "jobs"):
        assert services[owner]["environment"]["FERRY_DATABASE__MIGRATION_MODE"] == "drop_recreate"
