"""The observability bundle: promtool accepts the scrape config and the alert rules, the dashboards'
queries are valid PromQL, every ferry_* metric they name is one the code exports, every service is on
a dashboard and scraped, and every alert has its runbook section."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from services.common.config import REPO_ROOT, Settings
from tests.deploy.tools import COMPOSE, OBSERVABILITY, SERVICES, load_yaml, promtool, run

ALERTS = OBSERVABILITY / "alerts.yml"
SCRAPE = OBSERVABILITY / "prometheus.yml"
DASHBOARDS = OBSERVABILITY / "grafana" / "dashboards"
DASHBOARD = DASHBOARDS / "ferry-inference.json"
RUNBOOK = REPO_ROOT / "docs" / "runbook.md"
# Every process with a metrics port: the launcher's services (SERVICES) and the newer ones.
METRICS_PROCESSES = tuple(dict.fromkeys((*SERVICES, "grammars", "jobs")))


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def dashboard_queries(board: dict[str, Any] | None = None) -> list[str]:
    return [t["expr"] for p in (board or dashboard())["panels"] for t in p.get("targets", [])]


def all_dashboard_queries() -> list[str]:
    return [q for board in dashboards().values() for q in dashboard_queries(board)]


def test_alert_rules_pass_promtool() -> None:
    result = run([promtool(), "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.output
    assert "SUCCESS" in result.output


def test_scrape_config_passes_promtool() -> None:
    result = run([promtool(), "check", "config", str(SCRAPE)])
    assert result.returncode == 0, result.output


def test_broken_rules_fail_promtool(tmp_path: Path) -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    rules["groups"][0]["rules"][0]["expr"] = "sum(rate(ferry_grpc_server_handled_total[5m]"  # unclosed
    rules["groups"][1]["rules"][0]["for"] = "five minutes"
    broken = tmp_path / "alerts.yml"
    broken.write_text(yaml.safe_dump(rules))
    result = run([promtool(), "check", "rules", str(broken)])
    assert result.returncode != 0
    assert "FAILED" in result.output


def test_alerts_cover_the_golden_signals() -> None:
    exprs = " ".join(
        rule["expr"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    )
    for signal in (
        "ferry_grpc_server_handled_total",  # error rate
        "ferry_inference_time_to_first_token_seconds_bucket",  # TTFT p99
        "ferry_inference_requests_queued",  # queue depth
        "ferry_recording_spool_depth",  # spool backlog
    ):
        assert signal in exprs, signal


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    board = dashboard()
    assert board["uid"] == "ferry-inference"
    assert len(dashboard_queries()) >= 10
    queries = all_dashboard_queries()
    # promtool parses PromQL in rule files: each query becomes a recording rule. Grafana's variables
    # are replaced by what Grafana would substitute.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {
                        "record": f"dashboard:query_{i}",
                        "expr": q.replace("$__rate_interval", "1m")
                        .replace("$model", ".*")
                        .replace("$service", ".*"),
                    }
                    for i, q in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run([promtool(), "check", "rules", str(path)])
    assert result.returncode == 0, result.output
    titles = {p["title"] for p in board["panels"]}
    for needed in ("Time to first token", "Tokens per second", "Recording lag", "Server errors by service"):
        assert needed in titles


def ferry_metrics_named(text: str) -> set[str]:
    names = set(re.findall(r"\bferry_[a-z0-9_]+", text))
    # Prometheus adds these suffixes to what the code declares.
    return {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in names}


def exported_metric_names() -> set[str]:
    # The services and the gateway export through prometheus_client, the llamacpp backend through
    # Triton's metrics port.
    code = " ".join(
        p.read_text() for d in ("services", "gateway", "backends") for p in (REPO_ROOT / d).rglob("*.py")
    )
    # Triton's MetricFamily takes a counter's full name (`..._total`); prometheus_client adds it.
    return {re.sub(r"_total$", "", n) for n in re.findall(r'"(ferry_[a-z0-9_]+)"', code)}


def test_every_ferry_metric_named_is_exported_by_the_code() -> None:
    named = ferry_metrics_named(ALERTS.read_text()) | ferry_metrics_named(
        " ".join(path.read_text() for path in DASHBOARDS.glob("*.json"))
    )
    exported = exported_metric_names()
    assert {"ferry_grpc_server_handled", "ferry_inference_time_to_first_token_seconds"} <= named
    assert named - exported == set(), (
        "named by alerts or dashboard, exported by no code in services/, gateway/ or backends/"
    )


def test_scrape_targets_are_the_settings_metrics_ports() -> None:
    s = Settings()
    config = yaml.safe_load(SCRAPE.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    ferry = {c["names"][0]: c["port"] for c in jobs["ferry"]["dns_sd_configs"]}
    assert ferry == {name: getattr(s, name).metrics_port for name in METRICS_PROCESSES}
    assert jobs["envoy"]["dns_sd_configs"][0]["port"] == s.envoy.admin_port
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert jobs["triton"]["dns_sd_configs"][0]["port"] == s.triton.metrics_port
    assert config["rule_files"] == ["alerts.yml"]


def test_compose_observability_profile_mounts_the_bundle() -> None:
    compose: dict[str, Any] = load_yaml(COMPOSE)
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"]
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO_ROOT / source).exists(), source
    # Envoy is scraped under this name in both Compose and Kubernetes.
    assert "envoy-admin" in services["envoy"]["networks"]["default"]["aliases"]
    provider = load_yaml(OBSERVABILITY / "grafana/provisioning/dashboards/ferry.yaml")
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboards_cover_every_service() -> None:
    boards = dashboards()
    assert {board["uid"] for board in boards.values()} >= {"ferry-inference", "ferry-services"}
    services = boards["ferry-services.json"]
    text = " ".join(
        [services["description"], *(p["title"] for p in services["panels"]), *dashboard_queries(services)]
    )
    for name in METRICS_PROCESSES:
        assert name in text.lower(), f"the services dashboard does not mention {name}"
    titles = {p["title"] for board in boards.values() for p in board["panels"]}
    for needed in (
        "Traffic: RPCs per second by service",
        "Errors: server-side error ratio by service",
        "Latency: p99 RPC time by service",
        "Saturation: RPCs in flight by service",
        "Time to first token",
        "Inter-token latency",
        "In flight and queued",
        "Spool lag by process",
        "Embeddings requests by outcome",
        "Grammars: RPCs by method and code",
    ):
        assert needed in titles, needed
    # Latency panels offer their trace exemplars.
    latency = [
        t
        for b in boards.values()
        for p in b["panels"]
        for t in p.get("targets", [])
        if "_seconds_bucket" in t["expr"]
    ]
    assert any(t.get("exemplar") for t in latency)


def test_every_alert_has_a_runbook_section() -> None:
    runbook = RUNBOOK.read_text()
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            assert f"`{rule['alert']}`" in runbook, f"docs/runbook.md has no line for {rule['alert']}"
