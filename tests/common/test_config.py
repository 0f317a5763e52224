"""Configuration layering: defaults, then YAML, then FERRY_* environment (highest)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

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


# --- upstream model entries: settings that would fail every request are refused at start -----------


def upstream_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str) -> Settings:
    config = tmp_path / "upstreams.yaml"
    config.write_text(f"upstream_models:\n  remote:\n    base_url: http://10.0.0.7:8081/v1\n{entry}")
    monkeypatch.setenv("FERRY_CONFIG", str(config))
    return Settings()


def refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str) -> str:
    with pytest.raises(ValidationError) as err:
        upstream_config(tmp_path, monkeypatch, entry)
    return str(err.value)


def test_a_valid_upstream_entry_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = "    capabilities: [Chat, ' logprobs ']\n    max_in_flight: 8\n    max_connections: 8\n"
    remote = upstream_config(tmp_path, monkeypatch, entry).upstream_models["remote"]
    assert remote.capabilities == ["chat", "logprobs"] and remote.max_in_flight == 8


def test_an_unknown_capability_is_refused_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = refusal(tmp_path, monkeypatch, "    capabilities: [completions, chat]\n")
    assert "upstream_models.remote.capabilities" in message
    assert "'completions'" in message and "completion, chat, logprobs" in message
    assert "at least one" in refusal(tmp_path, monkeypatch, "    capabilities: []\n")


@pytest.mark.parametrize("url", ["localhost:8081/v1", "10.0.0.7:8081", "ftp://host/v1", "http:///v1"])
def test_a_base_url_without_an_http_scheme_and_host_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    config = tmp_path / "upstreams.yaml"
    config.write_text(f"upstream_models:\n  remote:\n    base_url: '{url}'\n")
    monkeypatch.setenv("FERRY_CONFIG", str(config))
    with pytest.raises(ValidationError) as err:
        Settings()
    assert "upstream_models.remote.base_url" in str(err.value) and "http://" in str(err.value)


def test_more_requests_in_flight_than_connections_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = refusal(tmp_path, monkeypatch, "    max_in_flight: 9\n    max_connections: 4\n")
    assert "upstream_models.remote" in message
    assert "max_in_flight (9) must be at most max_connections (4)" in message
