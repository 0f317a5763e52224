"""Kubernetes: every rendered overlay validates against the Kubernetes schemas, and its ports, probes,
configuration names and scaling objects agree with `make run`'s Settings."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.nats import NATS_SERVER, client_permissions
from launcher.triton import triton_argv
from services.common.config import Settings
from tests.deploy.tools import (
    COMMANDS,
    DATABASE_OWNERS,
    K8S,
    LIVENESS_SERVICE,
    OVERLAYS,
    SERVICES,
    by_kind,
    env_of,
    load_all,
    unknown_env_names,
    validate_kubernetes,
)

WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def workloads(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for kind in WORKLOAD_KINDS:
        found |= by_kind(objects, kind)
    return found


def container(workload: dict[str, Any]) -> dict[str, Any]:
    first: dict[str, Any] = workload["spec"]["template"]["spec"]["containers"][0]
    return first


@pytest.fixture(scope="module")
def objects(rendered_overlays: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    return {name: load_all(text) for name, text in rendered_overlays.items()}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_the_kubernetes_schemas(
    overlay: str, rendered_overlays: dict[str, str], tmp_path: Path
) -> None:
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(rendered_overlays[overlay])
    result = validate_kubernetes(rendered)
    assert result.returncode == 0, result.output


def test_a_broken_manifest_fails_validation(rendered_overlays: dict[str, str], tmp_path: Path) -> None:
    documents = load_all(rendered_overlays["prod"])
    hpa = by_kind(documents, "HorizontalPodAutoscaler")["inference"]
    hpa["spec"]["minReplica"] = hpa["spec"].pop("minReplicas")  # a typo
    models = workloads(documents)["models"]
    container(models)["ports"][0]["containerPort"] = "grpc"  # a wrong type
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump_all(documents))
    result = validate_kubernetes(broken)
    assert result.returncode != 0
    assert "minReplica" in result.output
    assert "is not of type 'integer'" in result.output


def test_a_broken_overlay_fails_to_render(tmp_path: Path) -> None:
    import shutil

    from tests.deploy.tools import run, tool

    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    # The dev patch removes the GPU request; aimed at a container that is not there, it must fail.
    patch = tree / "overlays/dev/triton-cpu.yaml"
    patch.write_text(patch.read_text().replace("/containers/0/resources", "/containers/5/resources", 1))
    result = run([tool("kubectl"), "kustomize", str(tree / "overlays/dev")])
    assert result.returncode != 0
    assert "containers/5" in result.output


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_ports_and_probes_match_settings(
    overlay: str, objects: dict[str, list[dict[str, Any]]]
) -> None:
    s = Settings()
    documents = objects[overlay]
    services = by_kind(documents, "Service")
    for name in SERVICES:
        where = getattr(s, name)
        workload = workloads(documents)[name]
        main = container(workload)
        assert main["args"] == COMMANDS[name]
        ports = {p["name"]: p["containerPort"] for p in main["ports"]}
        assert ports == {"grpc": where.port, "metrics": where.metrics_port}
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(where.metrics_port)
        # gRPC health probes: readiness on the overall status, liveness on the process alone.
        assert main["readinessProbe"]["grpc"] == {"port": where.port}
        for probe in ("livenessProbe", "startupProbe"):
            assert main[probe]["grpc"] == {"port": where.port, "service": LIVENESS_SERVICE}
        service = services[name]
        # Headless, so Envoy's DNS discovery sees every replica.
        assert service["spec"]["clusterIP"] == "None"
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
    triton = container(workloads(documents)["triton"])
    assert {p["name"]: p["containerPort"] for p in triton["ports"]} == {
        "http": s.triton.http_port,
        "grpc": s.triton.grpc_port,
        "metrics": s.triton.metrics_port,
    }
    envoy = container(workloads(documents)["envoy"])
    assert {p["name"]: p["containerPort"] for p in envoy["ports"]} == {
        "http": s.envoy.port,
        "admin": s.envoy.admin_port,
    }
    assert [p["port"] for p in services["envoy"]["spec"]["ports"]] == [s.envoy.port]
    assert [p["port"] for p in services["envoy-admin"]["spec"]["ports"]] == [s.envoy.admin_port]


def test_the_liveness_health_name_is_served() -> None:
    from services.common import server

    served = getattr(server, "LIVENESS_SERVICE", None)
    if served is None:
        pytest.skip(
            f"services/common/server.py does not serve the {LIVENESS_SERVICE!r} health name yet "
            "(requested: SERVING from start to exit, untouched by set_serving); Kubernetes liveness needs it"
        )
    assert served == LIVENESS_SERVICE


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configuration_names_are_settings(overlay: str, objects: dict[str, list[dict[str, Any]]]) -> None:
    documents = objects[overlay]
    names: set[str] = set()
    for name in SERVICES:
        env = env_of(container(workloads(documents)[name]))
        names |= set(env)
        assert env["FERRY_SERVICE"] == name
        assert env[f"FERRY_{name.upper()}__HOST"] == "0.0.0.0"
        assert env["FERRY_CONFIG"] == "/etc/ferry/ferry.yaml"
        # Every process, Envoy too, knows the service token (a Secret the operator makes).
        assert env["FERRY_AUTH__SERVICE_TOKEN"]["secretKeyRef"] == {
            "name": "ferry-auth",
            "key": "service-token",
        }
    assert unknown_env_names(names) == set()
    envoy = env_of(container(workloads(documents)["envoy"]))
    assert envoy["FERRY_AUTH__SERVICE_TOKEN"]["secretKeyRef"] == {
        "name": "ferry-auth",
        "key": "service-token",
    }
    for owner in DATABASE_OWNERS:
        env = env_of(container(workloads(documents)[owner]))
        assert env["DATABASE_URL"]["secretKeyRef"]["key"] == "url"
        assert env["DATABASE_URL"]["secretKeyRef"]["name"].startswith("ferry-database")
        assert env.get("FERRY_DATABASE__MIGRATION_MODE") == ("drop_recreate" if overlay == "dev" else None)
    # Only the gateway, which inserts it, sees the bootstrap admin key; it is optional.
    for name in SERVICES:
        env = env_of(container(workloads(documents)[name]))
        if name == "gateway":
            ref = env["FERRY_BOOTSTRAP_ADMIN_KEY"]["secretKeyRef"]
            assert ref == {"name": "ferry-bootstrap", "key": "admin-key", "optional": True}
        else:
            assert "FERRY_BOOTSTRAP_ADMIN_KEY" not in env and "FERRY_BOOTSTRAP_ADMIN_KEY_FILE" not in env


def test_the_config_map_loads_as_settings(
    objects: dict[str, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (config_map,) = [o for o in objects["prod"] if o["kind"] == "ConfigMap" and "ferry.yaml" in o["data"]]
    assert config_map["metadata"]["name"].startswith("ferry-config-")  # hashed: edits roll the pods
    path = tmp_path / "ferry.yaml"
    path.write_text(config_map["data"]["ferry.yaml"])
    monkeypatch.setenv("FERRY_CONFIG", str(path))
    monkeypatch.setenv("FERRY_MODELS__HOST", "0.0.0.0")  # as the models pod sets it
    s = Settings()
    hosts = (
        s.inference.host,
        s.transactions.host,
        s.audit.host,
        s.grammars.host,
        s.gateway.host,
        s.triton.host,
    )
    assert hosts == (
        "inference",
        "transactions",
        "audit",
        "grammars",
        "gateway",
        "triton",
    )
    assert s.models.host == "0.0.0.0"
    # The jobs service by its Service name, and the queue on the NATS StatefulSet (not embedded).
    assert s.jobs.host == "jobs" and s.nats.servers == ["nats://nats:4222"] and not s.nats.embedded
    assert s.inference.port == 50051  # defaults fill in what the file does not name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_has_resources_a_pdb_and_the_services_an_hpa(
    overlay: str, objects: dict[str, list[dict[str, Any]]]
) -> None:
    documents = objects[overlay]
    pdbs = by_kind(documents, "PodDisruptionBudget")
    hpas = by_kind(documents, "HorizontalPodAutoscaler")
    for name, workload in workloads(documents).items():
        for spec in workload["spec"]["template"]["spec"]["containers"]:
            assert spec["resources"]["requests"], (name, spec["name"])
            assert spec["resources"]["limits"]["memory"], (name, spec["name"])
        if name == "postgres":
            continue
        selector = workload["spec"]["selector"]["matchLabels"]
        assert pdbs[name]["spec"]["selector"]["matchLabels"] == selector
    for name in (*SERVICES, "envoy"):
        target = hpas[name]["spec"]["scaleTargetRef"]
        assert workloads(documents)[target["name"]]["kind"] == target["kind"]
        assert hpas[name]["spec"]["minReplicas"] <= hpas[name]["spec"]["maxReplicas"]


def test_inference_keeps_its_spool_on_a_volume_per_replica(objects: dict[str, list[dict[str, Any]]]) -> None:
    for overlay in OVERLAYS:
        inference = workloads(objects[overlay])["inference"]
        assert inference["kind"] == "StatefulSet"
        claims = {c["metadata"]["name"] for c in inference["spec"]["volumeClaimTemplates"]}
        assert claims == {"spool"}
        mounts = {m["name"]: m["mountPath"] for m in container(inference)["volumeMounts"]}
        assert mounts["spool"] == str(Settings(home=Path("/var/lib/ferry")).spool_dir)


def test_triton_gets_a_gpu_in_prod_and_the_cpu_engine_in_dev(
    objects: dict[str, list[dict[str, Any]]],
) -> None:
    prod = container(workloads(objects["prod"])["triton"])
    dev = container(workloads(objects["dev"])["triton"])
    assert prod["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert prod["image"].endswith("-cu128")
    assert "nvidia.com/gpu" not in dev["resources"]["limits"]
    assert dev["image"].endswith(":cpu")
    # make run's flags, the repository on the volume the init container fills.
    launcher = {a.split("=")[0]: a for a in triton_argv(Settings()) if a.startswith("--")}
    for args in (prod["args"], dev["args"]):
        assert args[0] == "tritonserver"
        assert "--model-repository=/models" in args
        for flag in ("--model-control-mode", "--load-model", "--grpc-port", "--http-port", "--metrics-port"):
            assert launcher[flag] in args, flag
    for flag in ("--allow-gpu-metrics", "--pinned-memory-pool-byte-size"):
        assert launcher[flag] in dev["args"]
    spec = workloads(objects["prod"])["triton"]["spec"]["template"]["spec"]
    assert spec["initContainers"][0]["volumeMounts"] == [{"name": "model-repository", "mountPath": "/models"}]
    assert {"name": "model-repository", "emptyDir": {}} in spec["volumes"]


def test_prod_edge_is_a_load_balancer_and_postgres_is_external(
    objects: dict[str, list[dict[str, Any]]],
) -> None:
    prod = objects["prod"]
    assert by_kind(prod, "Service")["envoy"]["spec"]["type"] == "LoadBalancer"
    # Managed PostgreSQL: no database workload, no Secret shipped with the manifests.
    assert "postgres" not in workloads(prod)
    assert not by_kind(prod, "Secret")
    assert "postgres" in workloads(objects["dev"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nats_takes_logins_only_with_the_launchers_client_permissions(
    overlay: str, objects: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The NATS StatefulSet runs the config map's nats.conf: the FERRY account, passwords from the
    ferry-nats Secret, the client user limited as the embedded server's (launcher/nats.py)."""
    documents = objects[overlay]
    nats = container(workloads(documents)["nats"])
    assert nats["args"][:2] == ["--config", "/etc/nats/nats.conf"]
    env = env_of(nats)
    for name, key in (
        ("NATS_INTERNAL_PASSWORD", "internal-password"),
        ("NATS_CLIENT_PASSWORD", "client-password"),
    ):
        assert env[name]["secretKeyRef"] == {"name": "ferry-nats", "key": key}
    conf = by_kind(documents, "ConfigMap")["nats-config"]["data"]["nats.conf"]
    permissions = client_permissions(Settings())
    for subject in [*permissions["publish"]["allow"], *permissions["subscribe"]["allow"]]:  # type: ignore[index]
        assert f'"{subject}"' in conf
    assert "allow_responses: true" in conf and "{user: ferry, password: $NATS_INTERNAL_PASSWORD}" in conf
    # Compose runs the same config (deploy/compose/nats.conf, below its comment lines).
    compose_conf = (Path(__file__).parents[2] / "deploy/compose/nats.conf").read_text()
    assert [line for line in compose_conf.splitlines() if not line.startswith("#")] == conf.splitlines()
    # nats-server itself accepts it (-t: test the configuration and exit).
    path = tmp_path / "nats.conf"
    path.write_text(conf)
    checked = subprocess.run(
        [str(NATS_SERVER), "-t", "-c", str(path)],
        env={"NATS_INTERNAL_PASSWORD": "a", "NATS_CLIENT_PASSWORD": "b"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    # ferry's processes that speak NATS log in as the internal user.
    for name in ("jobs", "jobs-worker"):
        ref = env_of(container(workloads(documents)[name]))["FERRY_NATS__INTERNAL_PASSWORD"]
        assert ref["secretKeyRef"] == {"name": "ferry-nats", "key": "internal-password"}
