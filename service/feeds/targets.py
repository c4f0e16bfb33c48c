"""Where push delivery may send: the stream's one URL, never a private or loopback address
unless the operator allows it (SCIMLEDGER_FEED_ALLOW_PRIVATE=1; the tests do, for 127.0.0.1).

Checked when the stream is created and before every delivery (the name may resolve elsewhere
by then); redirects are not followed (service/feeds/push.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from urllib.parse import urlsplit

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


async def check_resolved(url: str) -> None:
    """Every address the URL's host resolves to must be public (unless allowed)."""
    check_endpoint(url)
    if allow_private():
        return
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
