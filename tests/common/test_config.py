"""Configuration layering: defaults, then YAML, then FERRY_* environment (highest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.config import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("FERRY_") or key == "DATABASE_URL":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_defaults_match_documented_ports() -> None:
    s = Settings()
    assert (s.inference.port, s.models.port, s.transactions.port, s.audit.port) == (
        50051,
        50052,
        50053,
        50054,
    )
    assert (s.inference.metrics_port, s.audit.metrics_port) == (9101, 9104)
    assert s.envoy.port == 8080
    assert s.database_url is None


def test_yaml_overrides_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "custom.yaml"
    config.write_text("models:\n  port: 6000\nlog_level: DEBUG\n")
    monkeypatch.setenv("FERRY_CONFIG", str(config))
    s = Settings()
    assert s.models.port == 6000
    assert s.models.metrics_port == 9102  # untouched keys of a section keep their defaults
    assert s.log_level == "DEBUG"


def test_ferry_yaml_in_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / "ferry.yaml").write_text("envoy:\n  port: 18080\n")
    assert Settings().envoy.port == 18080


def test_environment_overrides_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "custom.yaml"
    config.write_text("models:\n  port: 6000\n")
    monkeypatch.setenv("FERRY_CONFIG", str(config))
    monkeypatch.setenv("FERRY_MODELS__PORT", "7000")
    assert Settings().models.port == 7000


def test_database_url_is_taken_from_the_standard_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db:5432/ferry")
    assert Settings().database_url == "postgresql://u@db:5432/ferry"


def test_invalid_value_is_refused_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_MODELS__PORT", "not-a-port")
    with pytest.raises(ValueError, match="port"):
        Settings()


def test_authentication_is_on_by_default() -> None:
    s = Settings()
    assert s.auth.enabled is True
    assert s.bootstrap_admin_key is None


@pytest.mark.parametrize("value", ["off", "OFF", "false", "0"])
def test_ferry_auth_off_turns_authentication_off(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("FERRY_AUTH", value)
    monkeypatch.setenv("FERRY_AUTH__CACHE_SECONDS", "5")
    s = Settings()
    assert s.auth.enabled is False
    assert s.auth.cache_seconds == 5.0


def test_auth_off_in_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "ferry.yaml"
    config.write_text("auth: off\n")
    monkeypatch.setenv("FERRY_CONFIG", str(config))
    assert Settings().auth.enabled is False


def test_bootstrap_admin_key_is_read_and_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_BOOTSTRAP_ADMIN_KEY", "fry_not-a-real-key-but-long-enough")
    s = Settings()
    assert s.bootstrap_admin_key is not None
    assert s.bootstrap_admin_key.get_secret_value() == "fry_not-a-real-key-but-long-enough"
    assert "fry_not-a-real" not in repr(s)
