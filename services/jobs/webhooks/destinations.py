"""The SSRF guard: where a job's webhook may be delivered.

A destination must be `https://` (or `http://` with `webhooks.allow_http`), name a host, carry no
credentials, and every address its host resolves to must be public: private, loopback, link-local,
shared (CGNAT), reserved, multicast and unspecified addresses are refused unless a network of
`webhooks.allowed_networks` holds them. The check runs when a job is created (a clear 400 naming
`webhook.url`) and again before every delivery try, which then connects to the address it checked
(Host header and TLS server name stay the URL's host), so a DNS answer that changes in between
(DNS rebinding) cannot steer a delivery inside.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from services.common.config import WebhookSettings
from services.common.errors import Reason, invalid_argument

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_URL_LENGTH = 2048


class DestinationRefused(Exception):
    """A webhook URL that may not be called; the message says why."""


@dataclass(frozen=True)
class Destination:
    """A checked webhook URL and the address to connect to."""

    url: str
    host: str
    address: IpAddress

    @property
    def pinned_url(self) -> str:
        """The URL with its host replaced by the checked address (the connection goes there)."""
        parts = urlsplit(self.url)
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))

    @property
    def host_header(self) -> str:
        return urlsplit(self.url).netloc


def refused_address(address: IpAddress, settings: WebhookSettings) -> str | None:
    """Why `address` may not be a destination; None when it may."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for network in settings.allowed_networks:
        if address in ipaddress.ip_network(network, strict=False):
            return None
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_private or not address.is_global:
        return "a private or reserved address"
    return None


def parse_url(url: str, settings: WebhookSettings) -> tuple[str, int]:
    """(host, port) of an acceptable URL; DestinationRefused otherwise."""
    if len(url) > MAX_URL_LENGTH:
        raise DestinationRefused(f"is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise DestinationRefused(f"is not a URL ({exc})") from None
    schemes = ("https", "http") if settings.allow_http else ("https",)
    if parts.scheme not in schemes:
        allowed = " or ".join(f"{s}://" for s in schemes)
        raise DestinationRefused(f"must start with {allowed}")
    if not parts.hostname:
        raise DestinationRefused("names no host")
    if parts.username is not None or parts.password is not None:
        raise DestinationRefused("must not carry credentials (user:password@)")
    if parts.fragment:
        raise DestinationRefused("must not carry a fragment (#...)")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


async def resolve(url: str, settings: WebhookSettings) -> Destination:
    """The URL checked and resolved now; DestinationRefused when it may not be called."""
    host, port = parse_url(url, settings)
    try:
        literal: IpAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise DestinationRefused(f"host {host!r} does not resolve ({exc.strerror or exc})") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))
        if not addresses:
            raise DestinationRefused(f"host {host!r} does not resolve")
    # Every address must pass: a host with one public and one private record is refused.
    for address in addresses:
        why = refused_address(address, settings)
        if why is not None:
            raise DestinationRefused(
                f"resolves to {address}, {why} (allow it with webhooks.allowed_networks)"
            )
    return Destination(url=url, host=host, address=addresses[0])


async def check_webhook_url(url: str, settings: WebhookSettings, field: str = "job.webhook.url") -> None:
    """At job create: WEBHOOK_URL_REFUSED (400) naming `field` unless the URL may be called."""
    try:
        await resolve(url, settings)
    except DestinationRefused as exc:
        raise invalid_argument(field, str(exc), Reason.WEBHOOK_URL_REFUSED) from None
