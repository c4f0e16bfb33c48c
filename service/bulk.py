"""Large request bodies are served by a process of their own: a bulkhead for the GIL.

A 2 MiB body costs ~0.1 s of CPU to parse, check and store, and the parse already runs in a
worker thread; but one process has one GIL, so every other request of every tenant waits
behind it a few milliseconds at a time (bench.cost: another tenant's p99 went from 3 ms to
74 ms while a hostile tenant sent such bodies back to back). So `serve` starts one more
process, the bulk process: the same app on the same database, listening on a Unix socket in
a private directory, with no projection runners and a small pool. The process that took the
connection (the front) hands every request whose body is larger than
SCIMLEDGER_BULK_BODY_BYTES to it as it arrives, with the client's connection
(service/bulk_handoff.py): the bulk process answers on the client's socket. A body of unknown
length (chunked) or compressed is relayed instead (`_relay`), and so is its reply.

The bulk process does everything else as if the request had come to it: authentication,
the per-token caps, the one log line per request (with `process: bulk`), the provisioning
log entry (with the client's address: its socket's, or the one the front forwards with a
relayed request). If it is down, the front
answers 503 with Retry-After and `serve` starts another.

It also runs the asynchronous projections' runners and the feeds' producer, push delivery and
signer processes (the front runs none of them; it serves the feeds' polls): folding the events
of a 2 MiB request takes tens of milliseconds of CPU in one piece, which on the front would
stall every tenant's requests. It, and its PostgreSQL backends, run behind everyone else for
the CPU (service/limits_cpu.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from multiprocessing.process import BaseProcess
from pathlib import Path
from queue import Empty
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware as _Middleware

from infra import logging as logsetup
from infra.config import Settings
from infra.supervisor import SupervisorStatus
from service.bulk_accept import Refused
from service.bulk_handoff import CLIENT_HEADER as CLIENT_HEADER
from service.bulk_handoff import can_hand_off, hand_off, handoff_path, taking_handoffs
from service.bulk_handoff import trust_front as trust_front
from service.errors import ScimError
from service.limits_cost import HeavyTokens
from service.limits_cpu import behind_everyone, bulk_cpu_set, cpu_list
from service.metrics import observe_request

log = structlog.get_logger("scimledger.bulk")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = _Middleware

BULK_CLIENT = web.AppKey("bulk_client", aiohttp.ClientSession)
# The bulk process's hand-off socket (service/bulk_handoff.py), set with BULK_CLIENT.
BULK_HANDOFF = web.AppKey("bulk_handoff", str)
# Headers of one hop (RFC 9110 §7.6.1), not relayed either way; the lengths are recomputed.
_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Transfer-Encoding",
        "TE",
        "Trailer",
        "Upgrade",
        "Content-Length",
        CLIENT_HEADER,
        # The front's own, once each.
        "Date",
        "Server",
    )
)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
RETRY_AFTER_SECONDS = 1
# Connections to the bulk process at once; the bulk process's own per-token caps answer 429
# well before a single token could queue this many.
MAX_FORWARDS = 64


def goes_to_bulk(request: web.Request, threshold: int) -> bool:
    """A body past `threshold` bytes, or of unknown length, and within the body limit (a body
    announced as larger gets its 413 where it arrived, without being read)."""
    if request.method not in _BODY_METHODS or not request.body_exists:
        return False
    length = request.content_length
    if length is None:
        return True  # chunked: its size is known only once read
    return threshold < length <= request.client_max_size


async def bulk_client_ctx(app: web.Application) -> AsyncIterator[None]:
    """A worker's connections to its parent's bulk process (cleanup_ctx of create_app)."""
    from service.state import SETTINGS

    socket = app[SETTINGS].bulk_socket
    assert socket is not None
    async with _client(app, socket):
        yield


@contextlib.asynccontextmanager
async def _client(app: web.Application, socket: str) -> AsyncIterator[None]:
    connector = aiohttp.UnixConnector(socket, limit=MAX_FORWARDS)
    # No total timeout: the bulk process bounds its own work (statement timeout, body size).
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        app[BULK_CLIENT] = session
        app[BULK_HANDOFF] = handoff_path(socket)
        yield


@contextlib.asynccontextmanager
async def serving_bulk(
    app: web.Application, dsn: str, supervisor: SupervisorStatus | None
) -> AsyncIterator[None]:
    """`serve`'s one process: its bulk process, kept running (replaced when it dies), and the
    connections to it; nothing when SCIMLEDGER_BULK_BODY_BYTES is 0."""
    from service.state import SETTINGS

    async with bulk_process(app[SETTINGS], dsn, supervisor) as bulk:
        if bulk is None:
            yield
            return
        stop = asyncio.Event()
        watching = asyncio.create_task(bulk.watch(stop))
        try:
            async with _client(app, bulk.path):
                yield
        finally:
            stop.set()
            await watching


def forward_large(threshold: int, heavy: HeavyTokens) -> Middleware:
    """The front's first middleware: large bodies go to the bulk process, and so do the
    bodies of a token whose requests cost the front much CPU (service/limits_cost.py)."""

    @web.middleware
    async def forward(request: web.Request, handler: Handler) -> web.StreamResponse:
        if BULK_CLIENT not in request.app or not (
            goes_to_bulk(request, threshold) or (goes_to_bulk(request, 0) and heavy.holds(request))
        ):
            return await handler(request)
        if can_hand_off(request):
            return await _hand_off(request)
        return await _relay(request)

    return forward


async def _hand_off(request: web.Request) -> web.StreamResponse:
    """The connection goes to the bulk process (service/bulk_handoff.py), which answers, logs
    and counts the request; or, when it is away, the front's 503 with Retry-After."""
    started = time.perf_counter()
    # A connection the bulk process did not take as it was accepted is not offered again.
    transport = request.transport
    refused = transport is not None and isinstance(transport.get_protocol(), Refused)
    if not refused and await hand_off(request, request.app[BULK_HANDOFF]):
        # Never sent: the front no longer has the connection (aiohttp's write of it fails
        # quietly as a client gone, and the connection is forgotten).
        return web.Response(status=204)
    response = _refused(
        request,
        503,
        "The server is restarting a process; retry later",
        started,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )
    response.force_close()  # the rest of the body is not read
    observe_request(request, 503, time.perf_counter() - started)
    return response


async def _relay(request: web.Request) -> web.StreamResponse:
    session = request.app[BULK_CLIENT]
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
    headers.append((CLIENT_HEADER, request.remote or ""))
    if request.content_length is not None:  # relayed as it comes, not chunked
        headers.append(("Content-Length", str(request.content_length)))
    limit = request.client_max_size
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        async for chunk in request.content.iter_chunked(64 * 1024):
            sent += len(chunk)
            if sent > limit:
                raise _TooLarge
            yield chunk

    started = time.perf_counter()
    status = 500
    try:
        async with session.request(
            request.method,
            f"http://bulk{request.rel_url}",
            headers=headers,
            data=body(),
            allow_redirects=False,
        ) as reply:
            content = await reply.read()
            relayed = [(k, v) for k, v in reply.headers.items() if k.lower() not in _HOP]
            response = web.Response(status=reply.status, body=content)
            for key, value in relayed:
                response.headers.add(key, value)
            status = reply.status
            return response
    except _TooLarge:
        status = 413
        return _refused(request, 413, f"The request body is larger than {limit} bytes", started)
    except (aiohttp.ClientError, OSError) as e:
        if sent > limit:  # the upload broke off because it grew past the limit
            status = 413
            return _refused(request, 413, f"The request body is larger than {limit} bytes", started)
        log.warning("bulk process unreachable", error=type(e).__name__)
        status = 503
        return _refused(
            request,
            503,
            "The server is restarting a process; retry later",
            started,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    finally:
        # Counted here, where the client is answered (the time it waited, relay included): the
        # bulk process counts nothing (service/metrics.observe_request), so the figures are the
        # same whether the front is `serve`'s one process or one of its workers.
        observe_request(request, status, time.perf_counter() - started)


class _TooLarge(Exception):
    """A body of unknown length grew past the limit while it was relayed."""


def _refused(
    request: web.Request,
    status: int,
    detail: str,
    started: float,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A relayed request the bulk process never answered: its one log line, from the front."""
    log.info(
        "request",
        method=request.method,
        path=request.path,
        status=status,
        duration_ms=round((time.perf_counter() - started) * 1000, 2),
        relayed=True,
    )
    return ScimError(status, detail, headers=headers).response()


# -- the process ---------------------------------------------------------------------------


class BulkProcess:
    """The bulk process of one `serve`: started, replaced when it dies, stopped with it."""

    def __init__(self, settings: Settings, supervisor: SupervisorStatus | None) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="scimledger-bulk-"))  # 0700
        self.path = str(self.directory / "bulk.sock")
        self.settings = replace(
            settings,
            pool_min=1,
            pool_max=max(2, min(settings.pool_max, 5)),
            bulk_body_bytes=0,
            bulk_socket=None,
            bulk_peer=True,
        )
        self.supervisor = supervisor
        self.context = multiprocessing.get_context("spawn")
        self.messages: Any = self.context.Queue()
        self.proc: BaseProcess | None = None
        self.restarts = 0

    def front_settings(self, settings: Settings) -> Settings:
        """The settings of a process that hands its large bodies to this one."""
        return replace(settings, bulk_socket=self.path)

    async def __aenter__(self) -> BulkProcess:
        self._start()
        await self._ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _start(self) -> None:
        for path in (self.path, handoff_path(self.path)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.proc = self.context.Process(
            target=_bulk_main,
            args=(self.settings, self.path, self.messages, self.supervisor),
            name="scimledger-bulk",
        )
        self.proc.start()

    async def _ready(self) -> None:
        """Until the process listens; RuntimeError if it exits first."""
        from service.workers import ListenError

        assert self.proc is not None
        while True:
            try:
                error: str | None = self.messages.get_nowait()
            except Empty:
                error = ""
            if error is None:
                return
            if error:
                raise ListenError(error)
            if self.proc.exitcode is not None:
                raise ListenError("the bulk process exited at start")
            await asyncio.sleep(0.05)

    async def watch(self, stop: asyncio.Event) -> None:
        """Until `stop`: start another bulk process when this one dies."""
        while not stop.is_set():
            proc = self.proc
            if proc is not None and proc.exitcode is not None:
                self.restarts += 1
                log.warning("bulk process exited; starting another", code=proc.exitcode)
                _forget_metrics(proc)
                self._start()
                with contextlib.suppress(Exception):
                    await self._ready()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    async def stop(self) -> None:
        proc = self.proc
        if proc is not None:
            if proc.exitcode is None and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
            await asyncio.to_thread(proc.join, self.settings.shutdown_timeout + 10)
            if proc.exitcode is None:
                log.error("bulk process did not stop; killing it", pid=proc.pid)
                proc.kill()
            proc.join()
            _forget_metrics(proc)
        self.messages.close()
        self.messages.join_thread()
        for path in (self.path, handoff_path(self.path)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        with contextlib.suppress(OSError):
            self.directory.rmdir()


def _forget_metrics(proc: BaseProcess) -> None:
    from service.workers import _forget_metrics as forget

    forget(proc)


def _bulk_main(
    settings: Settings, path: str, messages: Any, supervisor: SupervisorStatus | None
) -> None:
    from service.workers import _die_with_parent

    _die_with_parent()
    logsetup.configure()
    structlog.contextvars.bind_contextvars(process="bulk")
    # `serve` checked the setting before it started anything (service/cli/server.py).
    cpus = bulk_cpu_set(settings.bulk_cpus, os.sched_getaffinity(0))
    behind_everyone(cpus)
    if cpus is not None:
        log.info("bulk process confined", cpus=cpu_list(cpus))
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_bulk(settings, path, messages, supervisor))


async def _bulk(
    settings: Settings, path: str, messages: Any, supervisor: SupervisorStatus | None
) -> None:
    from infra.database import open_database
    from service.app import create_app
    from service.state import SUPERVISOR
    from service.workers import settle_heap

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with open_database(settings, run_migrations=False, serving=True) as database:
        app = create_app(settings, database)
        if supervisor is not None:
            app[SUPERVISOR] = supervisor
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=settings.shutdown_timeout
        )
        await runner.setup()
        try:
            await web.UnixSite(runner, path).start()
        except OSError as e:
            await runner.cleanup()
            messages.put(f"the bulk process cannot listen on {path}: {e.strerror}")
            return
        assert runner.server is not None
        try:
            async with taking_handoffs(runner.server, handoff_path(path), settings.max_body_bytes):
                settle_heap()
                messages.put(None)
                await stop.wait()
        except OSError as e:
            messages.put(f"the bulk process cannot listen on {handoff_path(path)}: {e.strerror}")
        finally:
            await runner.cleanup()


@contextlib.asynccontextmanager
async def bulk_process(
    settings: Settings, dsn: str, supervisor: SupervisorStatus | None
) -> AsyncIterator[BulkProcess | None]:
    """The bulk process of a `serve` on the database `dsn`; None when SCIMLEDGER_BULK_BODY_BYTES
    is 0 (every request is served where it arrives)."""
    if settings.bulk_body_bytes <= 0:
        yield None
        return
    async with BulkProcess(replace(settings, database_url=dsn), supervisor) as bulk:
        yield bulk
