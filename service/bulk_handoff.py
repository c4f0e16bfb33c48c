"""The front hands a client's connection to the bulk process instead of relaying its bytes.

Relaying a 2 MiB body through the front (service/bulk.py `_relay`: an aiohttp client copying
64 KiB chunks over a Unix socket, then the reply back) cost the front's event loop ~4 ms per
body, during which every other tenant's requests on that loop waited. Handing the connection
over costs it one small message: when the front decides a request goes to the bulk process
(it has parsed the head; most of the body is still in the kernel), it stops reading the
connection and sends, over a Unix socket of the bulk process's private directory, the
connection's file descriptor (SCM_RIGHTS) and the bytes it already took from it: the request
head, re-serialised from the raw headers with `Connection: close`, and the body bytes aiohttp
had buffered. The bulk process serves that one request on the client's socket itself (its
aiohttp server's protocol, fed those bytes first), so its log line, metrics and provisioning
log entry see the client's own address, and its reply closes the connection: the client's
next request opens a new one, which reaches a front again. Once the bulk process has said it
took the connection, the front closes its copy of the descriptor without writing anything.

Only requests whose body has a known length, not compressed, on a plain TCP connection, are
handed off; a chunked or compressed body is relayed as before (its 413 counted as it grows).
If the bulk process is away, the front answers 503 with Retry-After and closes the connection
(the body it stopped reading is discarded by aiohttp's lingering close).

A request the client pipelined behind a handed-off one, already read by the front, is not
answered: the connection closes after the handed-off reply, and RFC 9112 §9.3.2 has the
client retry it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
from aiohttp import web

from infra.metrics import BULK_HANDOFFS
from service.state import Handler

log = structlog.get_logger("scimledger.bulk")

# The client's address as the front saw it, on a request it relays; believed only from the
# bulk process's own Unix socket, and never passed on with a connection handed over.
CLIENT_HEADER = "X-Scimledger-Client"

# The hand-off socket, beside the bulk process's HTTP socket in its private (0700) directory.
HANDOFF_NAME = "handoff.sock"
# How long the front waits for the bulk process to say it took a connection.
ACK_SECONDS = 5.0
_ACK = b"\x01"
_LENGTH = struct.Struct("!I")
# Past the body limit, what a request head may add (aiohttp's own limits are far lower).
_HEAD_ALLOWANCE = 256 * 1024
# Hop-by-hop, and Expect: the front's aiohttp has already answered a `100-continue`.
_DROPPED = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"expect", CLIENT_HEADER.lower().encode()}
)


def handoff_path(bulk_socket: str) -> str:
    return str(Path(bulk_socket).with_name(HANDOFF_NAME))


def can_hand_off(request: web.Request) -> bool:
    """Whether the request's connection can go to the bulk process as it is: a body of known
    length, not compressed (aiohttp has decoded what it buffered), on a plain TCP socket."""
    if request.content_length is None:
        return False
    if request.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        return False
    transport = request.transport
    if transport is None or transport.is_closing():
        return False
    if transport.get_extra_info("sslcontext") is not None:
        return False
    sock = transport.get_extra_info("socket")
    return sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6)


def head(request: web.Request) -> bytes:
    """The request line and headers as the client sent them, asking for the connection's
    close, without the hop-by-hop headers and without CLIENT_HEADER."""
    version = request.version
    line = f"{request.method} {request.raw_path} HTTP/{version.major}.{version.minor}"
    lines = [line.encode("utf-8", "surrogateescape")]
    lines += [
        name + b": " + value for name, value in request.raw_headers if name.lower() not in _DROPPED
    ]
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def hand_off(request: web.Request, path: str) -> bool:
    """Give the request's connection to the bulk process listening on `path`. True: it now
    serves the request, and the front has forgotten the connection. False: the bulk process
    did not take it (away, restarting); the front has read part of the body and must answer
    and close the connection itself."""
    transport = request.transport
    assert transport is not None
    # Everything aiohttp took from the socket, then no more reading: synchronous, so no byte
    # arrives between the two (read_nowait may resume reading; pausing comes after it).
    prefix = head(request) + request.content.read_nowait()
    transport.pause_reading()
    if not await send_connection(path, transport.get_extra_info("socket").fileno(), prefix):
        transport.resume_reading()  # for aiohttp to discard the rest of the body
        return False
    # Close our copy of the descriptor: the bulk process holds the connection, so nothing is
    # sent to the client (no FIN while another descriptor is open; nothing unread here).
    request.protocol.force_close()
    BULK_HANDOFFS.labels("request").inc()
    return True


async def send_connection(path: str, fd: int, prefix: bytes) -> bool:
    """Send the connection `fd` and the bytes already read from it (`prefix`, perhaps none)
    to the bulk process listening on `path`; whether it said it took the connection."""
    loop = asyncio.get_running_loop()
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.setblocking(False)
    ack = b""
    try:
        async with asyncio.timeout(ACK_SECONDS):
            await loop.sock_connect(control, path)
            # A fresh connection's buffer is empty: four bytes and a descriptor never block.
            socket.send_fds(control, [_LENGTH.pack(len(prefix))], [fd])
            if prefix:
                await loop.sock_sendall(control, prefix)
            ack = await loop.sock_recv(control, 1)
    except (OSError, TimeoutError) as e:
        log.warning("bulk process unreachable", error=type(e).__name__, handoff=True)
    finally:
        control.close()
    return ack == _ACK


# -- the bulk process's side -----------------------------------------------------------------


@web.middleware
async def trust_front(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The bulk process's first middleware: the client is who the front says it is. The
    front's scrape of this process's figures is answered here, before any other middleware."""
    from service.metrics import own_figures
    from service.state import HANDED_OFF, RELAYED_CLIENT, SETTINGS

    transport = request.transport
    if transport is not None and isinstance(transport.get_extra_info("peername"), tuple):
        # A client's own connection, handed over by a front: its address is the socket's,
        # and it is answered (and counted) here. One request per connection, whatever its
        # outcome, and the reply says so: the client's next request reaches a front again.
        request[HANDED_OFF] = True
        try:
            response = await handler(request)
        except web.HTTPException as e:
            e.force_close()
            raise
        response.force_close()
        return response
    if request.path == "/metrics" and request.app[SETTINGS].metrics:
        return await own_figures(request)
    client = request.headers.get(CLIENT_HEADER)
    if client:
        request[RELAYED_CLIENT] = client
    return await handler(request)


@contextlib.asynccontextmanager
async def taking_handoffs(server: web.Server, path: str, max_body: int) -> AsyncIterator[None]:
    """The bulk process takes connections on `path` and serves each one's request with
    `server` (its AppRunner's aiohttp server) until the context exits."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(128)
    except OSError:
        listener.close()
        raise
    listener.setblocking(False)
    taking: set[asyncio.Task[None]] = set()

    async def accept() -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as e:  # out of descriptors, say: the fronts answer 503 meanwhile
                log.warning("hand-off not accepted", error=type(e).__name__)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(_take(conn, server, max_body + _HEAD_ALLOWANCE))
            taking.add(task)
            task.add_done_callback(taking.discard)

    accepting = asyncio.create_task(accept())
    try:
        yield
    finally:
        accepting.cancel()
        for task in list(taking):
            task.cancel()
        await asyncio.gather(accepting, *taking, return_exceptions=True)
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def _take(conn: socket.socket, server: web.Server, most: int) -> None:
    """One hand-off: the descriptor, the bytes already read, then serve and acknowledge."""
    loop = asyncio.get_running_loop()
    fds: list[int] = []
    try:
        async with asyncio.timeout(ACK_SECONDS):
            header = await _received(loop, conn, _LENGTH.size, fds)
            [length] = _LENGTH.unpack(header)
            if len(fds) != 1 or length > most:
                log.warning("hand-off refused", fds=len(fds), length=length)
                return
            prefix = await _received(loop, conn, length, fds)
            client = socket.socket(fileno=fds.pop())
            try:
                # Said first: a front that gave up waiting (and answered 503 itself) has closed
                # its end, and this fails, so the request is never answered twice.
                await loop.sock_sendall(conn, _ACK)
            except OSError:
                client.close()
                raise
            await loop.connect_accepted_socket(lambda: _Fed(server(), prefix), client)
    except (OSError, TimeoutError, ValueError) as e:
        log.warning("hand-off failed", error=type(e).__name__)
    finally:
        conn.close()
        for fd in fds:
            with contextlib.suppress(OSError):
                socket.socket(fileno=fd).close()


class _Fed(asyncio.Protocol):
    """aiohttp's protocol for one connection, given `prefix` as its first bytes: before any
    it reads from the socket, which it starts only after connection_made. (aiohttp's
    RequestHandler has __slots__, so it is wrapped rather than patched.)"""

    def __init__(self, inner: web.RequestHandler, prefix: bytes) -> None:
        self.inner = inner
        self.prefix = prefix

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)
        prefix, self.prefix = self.prefix, b""
        if prefix:  # none when the front handed the connection over before reading it
            self.inner.data_received(prefix)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> None:
        self.inner.eof_received()  # None: the transport closes itself on EOF

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


async def _received(
    loop: asyncio.AbstractEventLoop, conn: socket.socket, size: int, fds: list[int]
) -> bytes:
    """Exactly `size` bytes from `conn`, collecting any descriptors sent with them."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        try:
            data, more, _, _ = socket.recv_fds(conn, min(size - got, 1 << 20), 4)
        except BlockingIOError:
            await _readable(loop, conn)
            continue
        fds += more
        if not data:
            raise ConnectionResetError("the front went away")
        parts.append(data)
        got += len(data)
    return b"".join(parts)


async def _readable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    fd = conn.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
