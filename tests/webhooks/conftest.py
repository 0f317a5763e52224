"""A real gateway (keys, signing secrets sealed in PostgreSQL) on a private embedded PostgreSQL, which
the webhook tables share, and a real HTTP receiver."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.conftest import Gateway, start_gateway
from tests.postgres import embedded_postgres
from tests.webhooks.receiver import Receiver, running_receiver


@pytest.fixture(scope="session")
def webhooks_postgres_url() -> Iterator[str]:
    with embedded_postgres("ferry-webhooks-pg-") as url:
        yield url


@pytest.fixture(scope="session")
def webhooks_gateway(
    webhooks_postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    home: Path = tmp_path_factory.mktemp("webhooks-gateway-home")
    running = start_gateway(home, webhooks_postgres_url)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as running:
        yield running
