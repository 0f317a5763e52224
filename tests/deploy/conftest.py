"""The static deployment checks compare artefacts with the Settings *defaults*: no FERRY_* from outside."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.tools import K8S, OVERLAYS, kustomize


@pytest.fixture(autouse=True)
def default_settings_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("FERRY_") or key == "DATABASE_URL":
            monkeypatch.delenv(key)
    # No ./ferry.yaml of the developer's either.
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture(scope="session")
def rendered_overlays() -> dict[str, str]:
    """Each Kubernetes overlay rendered once per session."""
    return {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}
