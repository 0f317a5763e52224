"""`<service>.replicas` for `make run`: the launcher's programs, ports and spools of each replica (no
stack: tests/resilience/test_envoy_replicas.py runs them behind Envoy)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from launcher.ports import needed_ports
from launcher.stack import MODULES, default_programs, endpoints, replica_name, service_program
from services.common.config import Settings


def settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(home=tmp_path / "home", **overrides)  # type: ignore[arg-type]


def test_one_replica_is_the_default_and_changes_nothing(tmp_path: Path) -> None:
    s = settings(tmp_path)
    assert s.models.replica_ports() == [(50052, 9102)]
    program = service_program("models", s)
    assert program.name == "models"
    assert "FERRY_MODELS__PORT" not in program.env
    assert "FERRY_RECORDING__SPOOL_DIR" not in program.env


def test_each_replica_is_a_program_with_its_own_ports_and_spool(tmp_path: Path) -> None:
    s = settings(
        tmp_path,
        models={"replicas": 3, "replica_port_step": 100},
        # What the launcher adds per start (the service token), and no embedded NATS to configure.
        auth={"service_token": "token"},
        nats={"url": "nats://127.0.0.1:4222"},
    )
    names = [p.name for p in default_programs(s)]
    assert [n for n in names if n.startswith("models")] == ["models", "models-1", "models-2"]
    second = service_program("models", s, 2)
    assert second.name == replica_name("models", 2) == "models-2"
    assert second.env["FERRY_MODELS__PORT"] == "50252"
    assert second.env["FERRY_MODELS__METRICS_PORT"] == "9302"
    assert second.env["FERRY_RECORDING__SPOOL_DIR"] == str(s.spool_dir / "replicas" / "models-2")
    assert second.group == "services"
    # The port check and the leftover check know every replica's ports.
    ports = {u.port for u in needed_ports(s)}
    assert {50052, 50152, 50252, 9102, 9202, 9302} <= ports
    assert endpoints(s).replicas["models"] == ["127.0.0.1:50052", "127.0.0.1:50152", "127.0.0.1:50252"]
    assert any("models-2" in line for line in endpoints(s).lines())


def test_the_gateway_replicas_keep_the_bootstrap_key(tmp_path: Path) -> None:
    s = settings(tmp_path, gateway={"replicas": 2}, bootstrap_admin_key="fy_test_key_1234567890")
    assert all(
        service_program("gateway", s, i).env["FERRY_BOOTSTRAP_ADMIN_KEY"] == "fy_test_key_1234567890"
        for i in (0, 1)
    )


def test_a_replica_count_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        settings(tmp_path, models={"replicas": 0})


def test_the_record_keepers_stop_after_the_services_that_send_them_records(tmp_path: Path) -> None:
    # supervisord stops programs in reverse priority order, one priority after another: a stopping
    # service delivers its last records (its service.stop event) while transactions and audit still
    # answer, and the transactions service its audit events while audit does.
    s = settings(tmp_path, auth={"service_token": "token"}, nats={"url": "nats://127.0.0.1:4222"})
    programs = {p.name: p for p in default_programs(s)}
    audit, transactions = programs["audit"].priority, programs["transactions"].priority
    senders = [p for name, p in programs.items() if name in MODULES and name not in ("audit", "transactions")]
    assert senders and audit < transactions < min(p.priority for p in senders)
    # Each in a group of its own: supervisord stops a group's programs together.
    assert len({programs["audit"].group, programs["transactions"].group, senders[0].group}) == 3
