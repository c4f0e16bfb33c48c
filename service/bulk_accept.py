"""The front hands a connection to the bulk process as it accepts it, before reading a byte,
when the connection opens with a large body.

A hand-off from within aiohttp (service/bulk_handoff.py `hand_off`) comes after the front
has accepted the connection, read and parsed its first segments (64-94 KiB of a 2 MiB body),
built a request and run it to the first middleware; then it sends those bytes on with the
descriptor. That cost the front's event loop 1.1 ms per large body, more than a plain GET
(0.9 ms on a new connection), while every other tenant's requests on that loop waited.

Most large bodies arrive first on their connection: a handed-off connection closes after its
reply, so a client's next one comes on a new connection. So the front's listening sockets
accept a connection only once its first bytes have arrived (TCP_DEFER_ACCEPT, as nginx's
`deferred`), and each new connection's protocol looks at them first, without reading them
(MSG_PEEK): a whole request head of POST, PUT or PATCH whose Content-Length is past the bulk
threshold (and within the body limit), neither chunked nor compressed, goes to the bulk
process with nothing read, and the bulk process reads the request from the socket itself.
So does a small body of a token marked heavy (service/limits_cost.py): its
requests with a body all go to the bulk process for a while, and a front that parsed each one
and ran it to the first middleware spent 1.5 ms on it (a PATCH of 46 KB, bench.cost), where
another tenant's GETs waited. Anything else (the head not all there yet, a small body, a
chunked one, a large body later on a kept-alive connection) is aiohttp's, as before, and goes
to the bulk process from within aiohttp where it should.

If the bulk process does not take the connection, aiohttp serves it, and its 503 comes at
once (service/bulk.py `_hand_off` does not try the bulk process a second time).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import cast

from aiohttp import web

from infra.metrics import BULK_HANDOFFS
from service.bulk_handoff import _Fed, send_connection
from service.limits_cost import HEAVY_TOKENS, HeavyTokens

# What the front looks at of a connection's first bytes for a request head (aiohttp's own
# limits allow longer heads: those are aiohttp's to parse, and go on from there).
PEEK_BYTES = 8192
# How long the kernel holds a connection whose client sent nothing yet (seconds): then it is
# accepted all the same, and aiohttp's idle timeout applies as to any connection.
DEFER_ACCEPT_SECONDS = 5
_BODY_METHODS = (b"POST", b"PUT", b"PATCH")
_VERSIONS = (b" HTTP/1.1", b" HTTP/1.0")
_LENGTH_DIGITS = 18  # past this, no body is within any limit (and int() stays cheap)


def large_body(head: bytes, threshold: int, most: int, heavy: HeavyTokens | None = None) -> bool:
    """Whether `head`, a connection's first bytes, holds a whole request head of POST, PUT or
    PATCH with one Content-Length in (threshold, most] (in (0, most] when its bearer token is
    marked in `heavy`), no Transfer-Encoding, and no Content-Encoding but identity. Anything
    unusual is False: aiohttp's to judge."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return False
    line, *fields = head[:end].split(b"\r\n")
    method, _, rest = line.partition(b" ")
    if method not in _BODY_METHODS or not rest.endswith(_VERSIONS):
        return False
    length = None
    authorization: bytes | None = None
    for item in fields:
        name, colon, value = item.partition(b":")
        if not colon or not name or name[-1:] in b" \t" or name[:1] in b" \t":
            return False  # malformed, or folded: aiohttp answers it
        name, value = name.lower(), value.strip(b" \t")
        if name == b"content-length":
            if length is not None or not value.isdigit() or len(value) > _LENGTH_DIGITS:
                return False
            length = int(value)
        elif name == b"transfer-encoding":
            return False
        elif name == b"content-encoding" and value.lower() != b"identity":
            return False
        elif name == b"authorization":
            authorization = value if authorization is None else b""  # two: neither counts
    if length is None or not 0 < length <= most:
        return False
    if length > threshold:
        return True
    # A heavy token's small body (service/limits_cost.py), as forward_large sends it on.
    return heavy is not None and heavy.holds_credentials(
        (authorization or b"").decode("utf-8", "surrogateescape")
    )


def _peek(sock: socket.socket) -> bytes:
    """The bytes waiting on `sock` (an event loop's socket-like object), left there."""
    raw = socket.socket(sock.family, sock.type, 0, sock.fileno())
    try:
        return raw.recv(PEEK_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return b""
    finally:
        raw.detach()


class Refused(_Fed):
    """aiohttp's protocol on a connection the bulk process did not take as it was accepted:
    its request gets the front's 503 without a second try (service/bulk.py `_hand_off`)."""


@dataclass
class Early:
    """Where and what the front hands over as it accepts (one per listening site)."""

    server: web.Server
    path: str  # the bulk process's hand-off socket
    threshold: int  # SCIMLEDGER_BULK_BODY_BYTES
    most: int  # SCIMLEDGER_MAX_BODY_BYTES
    heavy: HeavyTokens | None = None  # the tokens whose bodies all go (service/limits_cost.py)
    handing: set[asyncio.Task[None]] = field(default_factory=set)


class _Sniffer(asyncio.Protocol):
    """A new connection's first protocol: hands it over, or gives it to aiohttp at once."""

    def __init__(self, early: Early) -> None:
        self.early = early

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not registered as asyncio.Transport: no isinstance here)
        transport = cast(asyncio.Transport, transport)
        early = self.early
        sock = transport.get_extra_info("socket")
        if (
            sock is None
            or sock.family not in (socket.AF_INET, socket.AF_INET6)
            or not large_body(_peek(sock), early.threshold, early.most, early.heavy)
        ):
            transport.set_protocol(protocol := early.server())
            protocol.connection_made(transport)
            return
        # The connection on a descriptor of our own; the transport closes its own now, before
        # it reads a byte (uvloop's start reading as soon as this call returns, pausing or
        # not), and the client sees nothing of it (no FIN while another descriptor is open).
        fd = os.dup(sock.fileno())
        transport.abort()
        task = asyncio.get_running_loop().create_task(self._hand_off(fd))
        early.handing.add(task)
        task.add_done_callback(early.handing.discard)

    async def _hand_off(self, fd: int) -> None:
        early = self.early
        try:
            if await send_connection(early.path, fd, b""):
                BULK_HANDOFFS.labels("accept").inc()
                return
            # Not taken: aiohttp serves the request (a 503 at once, service/bulk.py).
            sock, fd = socket.socket(fileno=fd), -1
            loop = asyncio.get_running_loop()
            await loop.connect_accepted_socket(lambda: Refused(early.server(), b""), sock)
        finally:
            if fd >= 0:
                os.close(fd)


class FrontSite(web.TCPSite):
    """aiohttp's TCP site, whose connections are accepted once their first bytes are in and
    pass the sniffer first, when the app has a bulk process (`early`); otherwise TCPSite's."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, reuse_port: bool) -> None:
        super().__init__(runner, host, port, reuse_port=reuse_port or None)
        self.early: Early | None = None

    async def start(self) -> None:
        # TCPSite.start, with the sniffer as the protocol factory.
        await web.BaseSite.start(self)
        from service.bulk import BULK_HANDOFF
        from service.state import SETTINGS

        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None and isinstance(self._runner, web.AppRunner)
        app = self._runner.app
        factory: Callable[[], asyncio.BaseProtocol] = server
        if BULK_HANDOFF in app:
            settings = app[SETTINGS]
            early = Early(server, app[BULK_HANDOFF], settings.bulk_body_bytes,
                          settings.max_body_bytes, app.get(HEAVY_TOKENS))  # fmt: skip
            self.early = early
            factory = partial(_Sniffer, early)
        listening = await loop.create_server(
            factory,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        self._server = listening
        if self.early is not None:
            for sock in listening.sockets:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_SECONDS)
        self._bound_port = listening.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await super().stop()
        if self.early is not None:
            for task in list(self.early.handing):
                task.cancel()
            await asyncio.gather(*self.early.handing, return_exceptions=True)
