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
    """The Envoy image's config stage has the descriptor set but not the generated `ferry` stubs
    (launcher/envoy.py reads the access option from the descriptor set itself)."""
    script = (
        "import runpy, sys\n"
        "sys.path = [p for p in sys.path if not p.rstrip('/').endswith('clients/python/src')]\n"
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


# -- resilience: retries, outlier detection, circuit breakers, replicas (docs/deploy.md "Resilience") --

SERVICE_CLUSTERS = (
    "inference",
    "models",
    "transactions",
    "audit",
    "grammars",
    "jobs",
    "conversations",
    "gateway",
)


def _clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def _routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    edge = next(lis for lis in config["static_resources"]["listeners"] if lis["name"] == "edge")
    manager = edge["filter_chains"][0]["filters"][0]["typed_config"]
    routes: list[dict[str, Any]] = manager["route_config"]["virtual_hosts"][0]["routes"]
    return routes


def _route_for(routes: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """The first route matching gRPC path `path` (a request without special headers), as Envoy picks it."""
    for route in routes:
        match = route["match"]
        if "headers" in match:
            continue
        if match.get("path") == path or path.startswith(match.get("prefix", "\0")):
            return route
    raise AssertionError(f"no route for {path}")


def _get_methods() -> set[str]:
    from launcher.envoy import read_methods

    return {f"/{s}/{m}" for s, methods in read_methods(DESCRIPTOR).items() for m in methods}


def test_every_service_cluster_ejects_a_failing_replica_and_has_deliberate_limits(tmp_path: Path) -> None:
    from launcher.envoy import LIMITS, UNARY_LIMITS

    clusters = _clusters(load_yaml(render(tmp_path / "home")))
    for name in SERVICE_CLUSTERS:
        cluster = clusters[name]
        outlier = cluster["outlier_detection"]
        assert outlier["enforcing_consecutive_gateway_failure"] == 100, name
        assert outlier["consecutive_gateway_failure"] >= 1, name
        # A recovered replica returns within seconds, and never more than half a cluster is ejected.
        assert outlier["base_ejection_time"] == "2s", name
        assert outlier["max_ejection_percent"] == 50, name
        (thresholds,) = cluster["circuit_breakers"]["thresholds"]
        limits = LIMITS.get(name, UNARY_LIMITS)
        assert thresholds["max_connections"] == limits.max_connections, name
        assert thresholds["max_pending_requests"] == limits.max_pending_requests, name
        assert thresholds["max_requests"] == limits.max_requests, name
        assert thresholds["retry_budget"]["budget_percent"]["value"] == 20.0, name
        assert thresholds["retry_budget"]["min_retry_concurrency"] == 3, name
        # The active gRPC health check stays: it takes a dead replica out within about a second.
        assert cluster["health_checks"][0]["grpc_health_check"], name
    # The generation cluster admits more than the unary ones (long streams).
    assert LIMITS["inference"].max_requests > UNARY_LIMITS.max_requests


def test_reads_are_retried_on_another_replica_and_writes_never(tmp_path: Path) -> None:
    config = load_yaml(render(tmp_path / "home"))
    routes = _routes(config)
    reads = _get_methods()
    assert "/ferry.models.v1.ModelsService/ListModels" in reads
    assert "/ferry.transactions.v1.TransactionsService/GetTransaction" in reads
    assert "/ferry.models.v1.ModelsService/LoadModel" not in reads
    for path in reads:
        route = _route_for(routes, path)
        if "direct_response" in route:  # an internal method: refused at the edge, nothing to retry
            continue
        policy = route["route"]["retry_policy"]
        assert set(policy["retry_on"].split(",")) == {
            "connect-failure",
            "refused-stream",
            "reset",
            "unavailable",
        }
        assert policy["num_retries"] == 2, path
        assert policy["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
        assert policy["retry_back_off"] == {"base_interval": "0.025s", "max_interval": "0.25s"}
        assert route["route"]["timeout"] == "120s", path
    for path in (
        "/ferry.models.v1.ModelsService/LoadModel",
        "/ferry.models.v1.ModelsService/UnloadModel",
        "/ferry.grammars.v1.GrammarsService/CreateGrammar",
        "/ferry.grammars.v1.GrammarsService/DeleteGrammar",
        "/ferry.keys.v1.KeysService/RevokeKey",
        "/ferry.jobs.v1.JobsService/CreateJob",
        "/ferry.conversations.v1.ConversationsService/SendMessage",
    ):
        assert "retry_policy" not in _route_for(routes, path)["route"], path
    health = _route_for(routes, "/grpc.health.v1.Health/Check")["route"]
    assert health["cluster"] == "gateway" and health["retry_policy"]["num_retries"] == 2


def test_generation_is_retried_once_before_the_first_byte_under_the_requests_id(tmp_path: Path) -> None:
    """Envoy retries only while nothing reached the client; every try carries the request's
    x-request-id (the client's, kept, or the one the connection manager made before routing), so the
    inference service records one transaction for it (a failed try is replaced by the retry's)."""
    config = load_yaml(render(tmp_path / "home"))
    routes = _routes(config)
    for path in (
        "/ferry.inference.v1.InferenceService/Generate",
        "/ferry.inference.v1.InferenceService/GenerateStream",
        "/ferry.openai.v1.OpenAIService/CreateChatCompletion",
        "/ferry.openai.v1.OpenAIService/CreateChatCompletionStream",
        "/ferry.openai.v1.OpenAIService/CreateCompletion",
    ):
        route = _route_for(routes, path)["route"]
        assert route["cluster"] == "inference_generation", path  # launcher/envoy.py GENERATION_CLUSTER
        assert route["retry_policy"]["num_retries"] == 1, path
        assert "unavailable" in route["retry_policy"]["retry_on"], path
        # A replica that went away mid-request may have recorded it: no retry after a reset.
        assert "reset" not in route["retry_policy"]["retry_on"].split(","), path
    # Streams keep no overall deadline.
    assert (
        _route_for(routes, "/ferry.inference.v1.InferenceService/GenerateStream")["route"]["timeout"] == "0s"
    )
    edge = next(lis for lis in config["static_resources"]["listeners"] if lis["name"] == "edge")
    manager = edge["filter_chains"][0]["filters"][0]["typed_config"]
    assert manager["generate_request_id"] is True
    assert manager["preserve_external_request_id"] is True


def test_replicas_are_every_endpoint_of_their_cluster_and_the_config_validates(tmp_path: Path) -> None:
    from launcher.envoy import render_envoy_config

    overrides: dict[str, Any] = {
        "models": {"replicas": 2, "replica_port_step": 100},
        "inference": {"replicas": 3, "replica_port_step": 1000},
        "auth": {"service_token": "token"},
    }
    settings = Settings(home=tmp_path / "home", **overrides)
    config_path = render_envoy_config(settings)
    clusters = _clusters(load_yaml(config_path))

    def ports(name: str) -> list[int]:
        (group,) = clusters[name]["load_assignment"]["endpoints"]
        return [e["endpoint"]["address"]["socket_address"]["port_value"] for e in group["lb_endpoints"]]

    assert ports("models") == [50052, 50152]
    assert ports("inference") == [50051, 51051, 52051]
    assert ports("transactions") == [50053]
    code, output = validate(config_path)
    assert code == 0, output


def test_container_clusters_resolve_every_replica_by_name(tmp_path: Path) -> None:
    """Compose `--scale` and Kubernetes replicas: one DNS name per cluster, resolved (STRICT_DNS) to every
    container or ready pod; the Kubernetes Services are headless so that DNS names each pod."""
    clusters = _clusters(load_yaml(render(tmp_path / "home")))
    for name in SERVICE_CLUSTERS:
        cluster = clusters[name]
        assert cluster["type"] == "STRICT_DNS", name
        (group,) = cluster["load_assignment"]["endpoints"]
        (endpoint,) = group["lb_endpoints"]
        assert endpoint["endpoint"]["address"]["socket_address"]["address"] == CONTAINER_HOSTS[name]
    for name in SERVICE_CLUSTERS:
        services = [
            o for o in load_all((K8S / "base" / f"{name}.yaml").read_text()) if o and o["kind"] == "Service"
        ]
        assert any(
            s["metadata"]["name"] == name and s["spec"].get("clusterIP") == "None" for s in services
        ), name


def test_the_key_check_asks_another_gateway_replica_when_one_fails(tmp_path: Path) -> None:
    config = load_yaml(render(tmp_path / "home"))
    edge = next(lis for lis in config["static_resources"]["listeners"] if lis["name"] == "edge")
    filters = edge["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    (authz,) = [f for f in filters if f["name"] == "envoy.filters.http.ext_authz"]
    policy = authz["typed_config"]["grpc_service"]["retry_policy"]
    assert "connect-failure" in policy["retry_on"] and "unavailable" in policy["retry_on"]
    assert policy["num_retries"] == 2
    assert policy["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
