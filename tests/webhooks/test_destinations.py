"""The SSRF guard (services/jobs/webhooks/destinations.py): which webhook URLs may be called."""

from __future__ import annotations

import ipaddress

import grpc
import pytest

from services.common.config import WebhookSettings
from services.common.errors import RpcError
from services.jobs.webhooks.destinations import (
    DestinationRefused,
    check_webhook_url,
    refused_address,
    resolve,
)

STRICT = WebhookSettings()
LOOPBACK_ALLOWED = WebhookSettings(allowed_networks=["127.0.0.0/8", "::1/128"], allow_http=True)


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata services
        ("fe80::1", "link-local"),
        ("fd00::1", "private"),
        ("100.64.0.1", "private or reserved"),  # shared address space (CGNAT)
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("198.51.100.7", "private or reserved"),  # documentation range
    ],
)
def test_inside_addresses_are_refused(address: str, why: str) -> None:
    found = refused_address(ipaddress.ip_address(address), STRICT)
    assert found is not None and why in found


def test_public_addresses_pass_and_allowed_networks_open_exceptions() -> None:
    assert refused_address(ipaddress.ip_address("8.8.8.8"), STRICT) is None
    assert refused_address(ipaddress.ip_address("2606:4700::1111"), STRICT) is None
    assert refused_address(ipaddress.ip_address("127.0.0.1"), LOOPBACK_ALLOWED) is None
    assert refused_address(ipaddress.ip_address("10.0.0.1"), LOOPBACK_ALLOWED) is not None


async def test_urls_are_checked_before_any_address() -> None:
    for url, why in [
        ("http://8.8.8.8/hook", "https://"),  # plain http only with allow_http
        ("ftp://8.8.8.8/hook", "https://"),
        ("https://user:pw@8.8.8.8/hook", "credentials"),
        ("https:///hook", "no host"),
        ("https://8.8.8.8:99999/", "not a URL"),
    ]:
        with pytest.raises(DestinationRefused, match=why):
            await resolve(url, STRICT)
    checked = await resolve("https://8.8.8.8:8443/hook?x=1", STRICT)
    assert checked.pinned_url == "https://8.8.8.8:8443/hook?x=1"


async def test_names_are_resolved_and_every_address_must_pass() -> None:
    with pytest.raises(DestinationRefused, match="loopback"):
        await resolve("https://localhost/hook", STRICT)
    allowed = await resolve("http://localhost:8123/hook", LOOPBACK_ALLOWED)
    assert allowed.address.is_loopback
    assert allowed.host_header == "localhost:8123"
    assert allowed.pinned_url.endswith(":8123/hook") and "localhost" not in allowed.pinned_url
    with pytest.raises(DestinationRefused, match="does not resolve"):
        await resolve("https://no-such-host.invalid/hook", STRICT)


async def test_a_refused_url_is_a_400_naming_the_field() -> None:
    with pytest.raises(RpcError) as caught:
        await check_webhook_url("http://127.0.0.1:9/hook", WebhookSettings(allow_http=True))
    err = caught.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.reason == "WEBHOOK_URL_REFUSED"
    assert err.metadata["field"] == "job.webhook.url"
    assert "loopback" in err.message and "allowed_networks" in err.message
