"""Triton's access secret on both ends: the launcher's flags name it, every client ferry makes sends it.
(The stack test tests/resilience/test_engine_faults.py shows Triton refusing callers without it.)"""

from __future__ import annotations

import asyncio

import tritonclient.grpc as triton_grpc
from pydantic import SecretStr

from launcher.credentials import with_triton_secret
from launcher.triton import RESTRICTED_PROTOCOLS, triton_argv
from services.common.config import Settings
from services.common.triton_client import GRPC_ACCESS_HEADER, connect, with_access


def _secret(value: str = "s3cret") -> Settings:
    settings = Settings()
    settings.triton.access_secret = SecretStr(value)
    return settings


def test_the_launcher_makes_a_secret_per_start_and_keeps_a_configured_one() -> None:
    first = with_triton_secret(Settings()).triton.access_secret
    second = with_triton_secret(Settings()).triton.access_secret
    assert first is not None and second is not None
    assert first.get_secret_value() != second.get_secret_value()
    assert len(first.get_secret_value()) >= 32
    configured = _secret("mine")
    assert with_triton_secret(configured).triton.access_secret == SecretStr("mine")


def test_triton_restricts_everything_but_health() -> None:
    argv = triton_argv(_secret())
    rule = f"{','.join(RESTRICTED_PROTOCOLS)}:ferry-triton-secret=s3cret"
    assert f"--grpc-restricted-protocol={rule}" in argv
    assert f"--http-restricted-api={rule}" in argv
    assert {"inference", "model-repository", "model-config", "metadata"} <= set(RESTRICTED_PROTOCOLS)
    assert "health" not in RESTRICTED_PROTOCOLS
    # A Triton started without a secret (tests of the backend alone) is not restricted.
    assert not any("restricted" in arg for arg in triton_argv(Settings()))


def test_every_client_sends_the_secret_and_keeps_the_callers_headers() -> None:
    settings = _secret()

    async def metadata() -> dict[str, str]:
        client = connect(settings.triton)
        try:
            return dict(client._get_metadata({"x-trace": "1"}))
        finally:
            await client.close()

    sent = asyncio.run(metadata())
    assert sent == {"x-trace": "1", GRPC_ACCESS_HEADER: "s3cret"}
    sync = with_access(triton_grpc.InferenceServerClient("127.0.0.1:1"), settings.triton)
    caller = {"a": "b"}
    assert dict(sync._get_metadata(caller)) == {"a": "b", GRPC_ACCESS_HEADER: "s3cret"}
    assert caller == {"a": "b"}  # the caller's dict is left alone
    sync.close()
    # No secret configured: nothing is added.
    plain = with_access(triton_grpc.InferenceServerClient("127.0.0.1:1"), Settings().triton)
    assert dict(plain._get_metadata(None)) == {}
    plain.close()
