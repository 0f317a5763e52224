"""Renders Envoy's configuration for containers: the same template and code as `make run`
(launcher/envoy.py), with the upstreams addressed by their container names.

The names are the Compose service names, which are also the Kubernetes Service names (deploy/k8s), so
one rendered file serves both. Run at image build time (deploy/docker/envoy.Dockerfile) and by the
static tests, which validate the result with `envoy --mode validate`.

The service token is a secret of the deployment, not of the image: the file carries a placeholder,
which deploy/docker/envoy-entrypoint.sh replaces with the token when the container starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

from services.common.config import Settings

# Where each upstream answers inside the container network (Compose service = Kubernetes Service name).
CONTAINER_HOSTS = {
    "inference": "inference",
    "models": "models",
    "transactions": "transactions",
    "audit": "audit",
    "grammars": "grammars",
    "conversations": "conversations",
    "jobs": "jobs",
    "gateway": "gateway",
    "triton": "triton",
}
# Replaced at container start by the service token (FERRY_AUTH__SERVICE_TOKEN[_FILE]).
SERVICE_TOKEN_PLACEHOLDER = "FERRY_SERVICE_TOKEN_PLACEHOLDER"
# Envoy listens on every interface of its own container: the edge, and the admin port's read-only
# observability pages, which Prometheus scrapes (the admin interface itself is a unix socket).
LISTEN_HOST = "0.0.0.0"


def container_settings(home: Path) -> Settings:
    """Settings as the Envoy container sees them: defaults (ports) with container host names."""
    overrides: dict[str, object] = {name: {"host": host} for name, host in CONTAINER_HOSTS.items()}
    # The web chat process runs in a container of its own beside the conversations service.
    overrides["conversations"] = {"host": "conversations", "web_host": "conversations-web"}
    overrides["envoy"] = {"host": LISTEN_HOST}
    overrides["auth"] = {"enabled": True, "service_token": SERVICE_TOKEN_PLACEHOLDER}
    return Settings(home=home, **overrides)  # type: ignore[arg-type]


def main(argv: list[str]) -> int:
    from launcher.envoy import render_envoy_config

    home = Path(argv[0]) if argv else Path("/ferry/home")
    print(render_envoy_config(container_settings(home), admin_host=LISTEN_HOST))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
