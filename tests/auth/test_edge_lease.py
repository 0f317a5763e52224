"""Edge leases: after one key check, Envoy admits more requests of the same key, method and client
address itself (envoy/edge_lease.lua, gateway/edge_lease.py), without a round trip to the gateway,
and nothing a caller can see changes: scopes, other keys, rate limits and revocation (tested in
test_revocation.py, which probes through the same connection, so through a lease) hold as before."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.stack import RunningStack

pytestmark = pytest.mark.stack

# Leased requests: those for which Envoy's key check filter was turned off.
LEASED_STAT = "http.edge.ext_authz.disabled"


def checks(stack: RunningStack) -> float:
    """Key checks the gateway answered (ferry_grpc_server_handled_total for Check, all codes)."""
    text = httpx.get(stack.metrics_urls["gateway"], timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("ferry_grpc_server_handled_total{") and 'method="Check"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def leased(stack: RunningStack) -> int:
    """Requests Envoy admitted on a lease so far."""
    return stack.envoy_stat(LEASED_STAT)


def test_requests_after_the_first_are_admitted_without_a_key_check(stack: RunningStack) -> None:
    key = stack.create_key(["inference"])
    before_checks, before_leased = checks(stack), leased(stack)
    with stack.http(key) as http:  # one connection: one Envoy worker
        for _ in range(8):
            assert http.get("/v1/models").status_code == 200
    asked = checks(stack) - before_checks
    # The first request is checked and its check grants a lease for what follows; a lease ends with
    # the gateway's trust in its copy of the key (auth.cache_seconds), so a slow run may need another.
    assert 1 <= asked <= 3, f"{asked} key checks for 8 requests"
    assert leased(stack) - before_leased == 8 - asked


def test_a_lease_admits_only_its_own_key_and_method(stack: RunningStack) -> None:
    key = stack.create_key(["inference"])
    other = stack.create_key(["inference"])
    with stack.http(key) as http:
        assert http.get("/v1/models").status_code == 200
        assert http.get("/v1/models").status_code == 200  # leased from here on
        # Another method of the same key is checked again: no scope for the key API.
        refused = http.get("/api/v1/keys")
        assert refused.status_code == 403, refused.text
        # A near-copy of the key is not the key.
        assert http.get("/v1/models", headers={"authorization": f"Bearer {key}x"}).status_code == 401
        # Another key on the same connection gets its own check.
        before = checks(stack)
        assert http.get("/v1/models", headers={"authorization": f"Bearer {other}"}).status_code == 200
        assert checks(stack) - before == 1


def test_leased_requests_are_counted_against_the_rate_limit(stack: RunningStack) -> None:
    limit = 64
    key = stack.create_key(["inference"], requests_per_minute=limit)
    before_leased = leased(stack)
    statuses = []
    with stack.http(key) as http:
        for _ in range(limit + 16):
            answer = http.get("/v1/models")
            statuses.append(answer.status_code)
            if answer.status_code == 429:
                assert answer.headers.get("retry-after")
    assert leased(stack) > before_leased, "no request was leased"
    ok = statuses.count(200)
    # Never more than the limit; a lease takes at most an eighth of what is left, so an unused
    # remainder (a lease that expired) costs only a little.
    assert ok <= limit
    assert ok >= limit - limit // 4, statuses
    assert set(statuses) == {200, 429}
    assert statuses.index(429) == ok  # refused only once the limit was spent


def test_steady_traffic_renews_its_lease_before_it_ends(stack: RunningStack) -> None:
    key = stack.create_key(["inference"])  # no request limit: its leases cost nothing, so renew early
    seconds = stack.settings.auth.cache_seconds * 2
    before_checks, before_leased = checks(stack), leased(stack)
    sent = 0
    with stack.http(key) as http:
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            assert http.get("/v1/models").status_code == 200
            sent += 1
    asked = checks(stack) - before_checks
    # A renewal every half lease (a lease lasts what is left of the gateway's cache time, which is
    # read again past half of it): a few checks a second, not one per request.
    assert asked <= seconds / (stack.settings.auth.cache_seconds / 4) + 2, f"{asked} checks, {sent} requests"
    assert leased(stack) - before_leased == sent - asked
    assert sent >= 40, f"only {sent} requests in {seconds} s: too slow to show a renewal"
    assert sent - asked > 10 * asked, (sent, asked)
