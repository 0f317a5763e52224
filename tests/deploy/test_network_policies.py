"""Kubernetes NetworkPolicies and Triton's access secret, checked statically on the rendered overlays.

The policies are evaluated here the way Kubernetes does for ingress (a pod selected by any policy
takes only what some rule of those policies allows: a source matching a `from` peer, on a port the
rule lists), for source pods labelled like ferry's workloads, so the test states who reaches whom:
only Envoy (and ferry's own processes) reach the services, only the services reach Triton, PostgreSQL
and NATS, Prometheus reaches metrics. (kubernetes-validate checks the objects' schema:
test_kubernetes.py.)
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from launcher.triton import RESTRICTED_PROTOCOLS, restricted_flags
from services.common.config import Settings
from tests.deploy.tools import DOCKER, OVERLAYS, by_kind, env_of, load_all

WORKLOAD_KINDS = ("Deployment", "StatefulSet")
# The services whose code calls Triton (services/common/triton_client.connect).
TRITON_CALLERS = ("inference", "models", "grammars", "conversations")
DATABASE_USERS = ("transactions", "audit", "grammars", "conversations", "jobs", "jobs-worker", "gateway")
# A pod of the namespace that is none of ferry's (a debug shell, another team's job).
STRANGER = {"app.kubernetes.io/name": "debug-shell"}
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}


@pytest.fixture(scope="module")
def objects(rendered_overlays: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    return {name: load_all(text) for name, text in rendered_overlays.items()}


def pods(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each workload's pod template, by workload name."""
    found: dict[str, dict[str, Any]] = {}
    for kind in WORKLOAD_KINDS:
        for name, workload in by_kind(documents, kind).items():
            found[name] = workload["spec"]["template"]
    return found


def labels(template: dict[str, Any]) -> dict[str, str]:
    return dict(template["metadata"]["labels"])


def port_names(template: dict[str, Any]) -> set[str]:
    return {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}


def selects(selector: dict[str, Any], pod: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels, matchExpressions In/NotIn/Exists) against a pod's labels."""
    if any(pod.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and pod.get(key) not in values:
            return False
        if operator == "NotIn" and pod.get(key) in values:
            return False
        if operator == "Exists" and key not in pod:
            return False
    return True


def allowed(
    policies: list[dict[str, Any]],
    target: dict[str, str],
    source: dict[str, str],
    port: str,
    same_namespace: bool = True,
) -> bool:
    """Whether ingress from `source` to `target` on the named `port` is allowed."""
    applying = [p for p in policies if selects(p["spec"]["podSelector"], target)]
    if not applying:
        return True  # no policy selects the pod: everything is allowed
    for policy in applying:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and port not in {str(p["port"]) for p in ports}:
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    continue
                namespaces = peer.get("namespaceSelector")
                if namespaces is None and not same_namespace:
                    continue
                if namespaces not in (None, {}):
                    continue  # no namespace labels are modelled here
                if selects(peer.get("podSelector", {}), source):
                    return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_default_deny(overlay: str, objects: dict[str, list[dict[str, Any]]]) -> None:
    policies = list(by_kind(objects[overlay], "NetworkPolicy").values())
    deny = by_kind(objects[overlay], "NetworkPolicy")["default-deny-ingress"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
    templates = pods(objects[overlay])
    for name, template in templates.items():
        assert allowed(policies, labels(template), STRANGER, "grpc") is False, name
    # Every port a policy names exists on a pod it selects (a misspelt name would silently deny).
    for policy in policies:
        selected = [t for t in templates.values() if selects(policy["spec"]["podSelector"], labels(t))]
        assert selected, policy["metadata"]["name"]
        names = set().union(*(port_names(t) for t in selected))
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                assert str(port["port"]) in names, (policy["metadata"]["name"], port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_who_reaches_whom(overlay: str, objects: dict[str, list[dict[str, Any]]]) -> None:
    documents = objects[overlay]
    policies = list(by_kind(documents, "NetworkPolicy").values())
    workloads = pods(documents)
    label = {name: labels(t) for name, t in workloads.items()}
    services = [n for n, lab in label.items() if lab.get("app.kubernetes.io/component") == "service"]
    assert {"inference", "models", "gateway", "conversations-web"} <= set(services)

    def can(source: dict[str, str], target: str, port: str) -> bool:
        return allowed(policies, label[target], source, port)

    # The edge answers anyone; its admin port only Prometheus.
    assert can(STRANGER, "envoy", "http")
    assert not can(STRANGER, "envoy", "admin") and can(PROMETHEUS, "envoy", "admin")
    for service in services:
        port = "http" if service == "conversations-web" else "grpc"
        assert can(label["envoy"], service, port), service
        assert can(label["inference"], service, port), service  # ferry's own processes call each other
        for outsider in (STRANGER, label["triton"], label["nats"], PROMETHEUS):
            assert not can(outsider, service, port), (service, outsider)
        if "metrics" in port_names(workloads[service]):
            assert can(PROMETHEUS, service, "metrics") and not can(STRANGER, service, "metrics"), service
    # Only the services that call Triton reach it, on gRPC and HTTP; Prometheus its metrics.
    for port in ("grpc", "http"):
        for name, lab in label.items():
            assert can(lab, "triton", port) == (name in TRITON_CALLERS), (name, port)
        assert not can(STRANGER, "triton", port) and not can(PROMETHEUS, "triton", port)
    assert can(PROMETHEUS, "triton", "metrics")
    # NATS: the jobs service and its workers, and pods labelled as NATS clients.
    for name, lab in label.items():
        assert can(lab, "nats", "client") == (name in ("jobs", "jobs-worker")), name
    assert can({**STRANGER, "ferry.dev/nats-client": "true"}, "nats", "client")
    assert not can(STRANGER, "nats", "client")
    # The workers have no server but metrics.
    assert not can(label["envoy"], "jobs-worker", "metrics") and can(PROMETHEUS, "jobs-worker", "metrics")
    if overlay == "dev":
        for name, lab in label.items():
            assert can(lab, "postgres", "postgres") == (name in DATABASE_USERS), name
        assert not can(STRANGER, "postgres", "postgres")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_and_its_callers_share_the_access_secret(
    overlay: str, objects: dict[str, list[dict[str, Any]]]
) -> None:
    secret = {"name": "ferry-auth", "key": "triton-secret"}
    for name, template in pods(objects[overlay]).items():
        env = env_of(template["spec"]["containers"][0])
        ref = env.get("FERRY_TRITON__ACCESS_SECRET")
        if name == "triton" or name in TRITON_CALLERS:
            assert ref == {"secretKeyRef": secret}, name
        else:
            assert ref is None, name


ENTRYPOINT = DOCKER / "triton-entrypoint.sh"


def _entrypoint(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Runs the Triton image's entrypoint with a stand-in `tritonserver` that prints its arguments."""
    fake = tmp_path / "bin" / "tritonserver"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    return subprocess.run(
        ["sh", str(ENTRYPOINT), "tritonserver", "--model-repository=/models"],
        env={"PATH": f"{fake.parent}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def test_the_triton_image_adds_the_launchers_restricted_flags(tmp_path: Path) -> None:
    secret_file = tmp_path / "triton_secret"
    secret_file.write_text("s3cret-value")
    by_file = _entrypoint(tmp_path, {"FERRY_TRITON__ACCESS_SECRET_FILE": str(secret_file)})
    by_value = _entrypoint(tmp_path, {"FERRY_TRITON__ACCESS_SECRET": "s3cret-value"})
    settings = Settings()
    settings.triton.access_secret = SecretStr("s3cret-value")
    expected = ["--model-repository=/models", *restricted_flags(settings)]
    for result in (by_file, by_value):
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == expected
    assert ",".join(RESTRICTED_PROTOCOLS) in ENTRYPOINT.read_text()
    assert "health" not in RESTRICTED_PROTOCOLS  # probes stay open
    # Fail closed: no secret, no Triton.
    refused = _entrypoint(tmp_path, {})
    assert refused.returncode == 1 and "refusing" in refused.stderr
    unreadable = _entrypoint(tmp_path, {"FERRY_TRITON__ACCESS_SECRET_FILE": str(tmp_path / "absent")})
    assert unreadable.returncode == 1 and "cannot be read" in unreadable.stderr
    assert os.access(ENTRYPOINT, os.X_OK)
