"""Where push delivery may send: the stream's one URL, never a private or loopback address
unless the operator allows it (SCIMLEDGER_FEED_ALLOW_PRIVATE=1; the tests do, for 127.0.0.1).

Checked when the stream is created and before every delivery (the name may resolve elsewhere
by then); redirects are not followed (service/feeds/push.py). The addresses a delivery's check
vetted are the ones it connects to (`PinnedResolver`): a name that answers a public address to
the check and a private one to the connection (DNS rebinding) reaches only the public one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

MAX_URL = 2048


class TargetRefused(Exception):
    pass


def allow_private() -> bool:
    return os.environ.get("SCIMLEDGER_FEED_ALLOW_PRIVATE", "0") == "1"


def check_endpoint(url: str) -> None:
    """The URL's shape: https (http only where private addresses are allowed), a host, no
    credentials. Raises TargetRefused (a ValueError for the operator)."""
    if len(url) > MAX_URL:
        raise TargetRefused(f"the URL is longer than {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        raise TargetRefused(f"not a URL: {e}") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise TargetRefused("the push URL must be https://host/...")
    if parts.scheme == "http" and not allow_private():
        raise TargetRefused("the push URL must be https (RFC 8935 §5: SETs carry personal data)")
    if parts.username or parts.password:
        raise TargetRefused("the push URL may not carry credentials")
    _check_literal(parts.hostname)


def _refused(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def _check_literal(host: str) -> None:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if host.lower() == "localhost" and not allow_private():
            raise TargetRefused("localhost is refused (SCIMLEDGER_FEED_ALLOW_PRIVATE=1)") from None
        return
    if _refused(address) and not allow_private():
        raise TargetRefused(f"{address} is a private or loopback address")


async def check_resolved(url: str) -> list[str]:
    """Every address the URL's host resolves to must be public (unless allowed); returns them
    (none where private addresses are allowed: then nothing needs pinning)."""
    check_endpoint(url)
    if allow_private():
        return []
    parts = urlsplit(url)
    host = parts.hostname or ""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
    except OSError as e:
        raise TargetRefused(f"cannot resolve {host}: {e}") from None
    for info in infos[:32]:
        address = ipaddress.ip_address(info[4][0])
        if _refused(address):
            raise TargetRefused(f"{host} resolves to {address}, a private or loopback address")
    return list(dict.fromkeys(str(info[4][0]) for info in infos[:32]))


class PinnedResolver(AbstractResolver):
    """The push session's resolver: a host resolves to the addresses its last check vetted
    (`pin`), never by a new lookup; an unpinned host is refused, unless private addresses are
    allowed (then there is nothing to vet and the system resolver answers)."""

    MAX_HOSTS = 1000

    def __init__(self) -> None:
        self._pins: dict[str, list[str]] = {}
        self._system = ThreadedResolver()

    def pin(self, url: str, addresses: list[str]) -> None:
        host = (urlsplit(url).hostname or "").lower()
        if not addresses or _is_literal(host):
            return
        if host not in self._pins and len(self._pins) >= self.MAX_HOSTS:
            self._pins.pop(next(iter(self._pins)))
        self._pins[host] = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        pinned = self._pins.get(host.lower())
        if pinned is None:
            if _is_literal(host) or allow_private():
                return await self._system.resolve(host, port, family)
            raise OSError(f"{host} was not vetted before this delivery")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in pinned
        ]

    async def close(self) -> None:
        await self._system.close()


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True
