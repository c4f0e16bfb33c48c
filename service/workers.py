"""`scimledger serve --workers N`: N processes serving one port, one database.

The parent does what must happen once: it starts (or attaches to) the database, applies the
migrations, creates the first tenant and prints its token. Then it starts N workers (spawned,
not forked), each its own aiohttp server with its own pool and projection runners, all
listening on the same address with SO_REUSEPORT, so the kernel spreads connections over them.
The parent keeps the embedded PostgreSQL attached until the last worker is gone, and supervises
it (infra.supervisor): the workers read the supervisor's status for /healthz and /metrics.

SIGTERM (or SIGINT) to the parent is forwarded to every worker; each stops accepting, finishes
its in-flight requests (up to SCIMLEDGER_SHUTDOWN_TIMEOUT seconds), stops its runners and
closes its pool; the parent waits for all of them, then detaches from the database. A worker
that dies on its own is replaced. Workers die with the parent (PR_SET_PDEATHSIG on Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import replace
from multiprocessing.process import BaseProcess
from queue import Empty
from typing import Any

import structlog
from aiohttp import web

from infra import logging as logsetup
from infra.config import Settings
from infra.database import open_database
from infra.supervisor import SupervisorStatus, supervised
from infra.tenants import IssuedToken
from service.app import first_start
from service.bulk_accept import FrontSite

log = structlog.get_logger("scimledger.workers")


class ListenError(Exception):
    """A worker could not listen on the address."""


def default_workers() -> int:
    """One per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def print_banner(settings: Settings, issued: IssuedToken | None, workers: int = 1) -> None:
    url = f"http://{settings.host}:{settings.port}/scim/v2/"
    if issued is not None:
        print(
            "Created tenant 'default'. Paste these into Entra ID (the token is shown once):\n\n"
            f"  Tenant URL:   {url}\n  Secret Token: {issued.token}\n",
            flush=True,
        )
    else:
        each = f", {workers} workers" if workers > 1 else ""
        print(
            f"Serving SCIM at {url}  (new token: scimledger tenants create NAME{each})", flush=True
        )


async def listen(
    app: web.Application, settings: Settings, *, reuse_port: bool = False
) -> web.AppRunner:
    """Set the app up and listen; ListenError if the address is taken."""
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=settings.shutdown_timeout,
        read_bufsize=READ_BUFSIZE,
    )
    await runner.setup()
    site = FrontSite(runner, settings.host, settings.port, reuse_port=reuse_port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise ListenError(f"cannot listen on {settings.host}:{settings.port}: {e.strerror}") from e
    settle_heap()
    sys.setswitchinterval(LOOP_GIL_WAIT)
    return runner


# What a front buffers of a request's body before it stops reading the connection (aiohttp
# pauses past twice this; its default is 64 KiB). A body the front hands to the bulk process
# (service/bulk_handoff.py) is read no further than the first segments, which it passes on:
# 157 -> 64-94 KiB per hand-off, and the front's CPU per hand-off 1.2-1.3 -> 1.1 ms (a 2 MiB
# body of each of bench.cost's shapes, 30 times). Entra's bodies are a few KiB; one the front
# serves itself (up to 64 KiB) is read on as its handler reads it.
READ_BUFSIZE = 16 * 1024


# Seconds the event loop may wait for the GIL while a worker thread holds it (CPython's
# default is 5 ms). A body past 64 KiB that stays here, or a PATCH of a user of many values,
# is worked on in a thread; every time the loop wakes up (a request arrives, PostgreSQL
# answers) it waited up to this long for that thread, a few times per request of everyone.
LOOP_GIL_WAIT = 0.0005


# Young objects a request makes before the collector looks (CPython's default is 700).
GC_YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """Once a serving process is set up: what start-up made (modules, the app, the schema
    tables) lives as long as the process, so it goes to the collector's permanent generation
    (`gc.freeze`) and full collections stop walking it; and the youngest generation is
    collected every 10,000 objects instead of 700, since a request makes and frees hundreds.
    `make bench` POST /Users: server CPU per POST -8%, p99 halved (the pauses of full
    collections over the whole heap were its tail)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


# -- the parent ----------------------------------------------------------------------------


async def serve_workers(settings: Settings, workers: int) -> None:
    from service.bulk import bulk_process

    stop = _stop_on_signals()
    own_metrics_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if own_metrics_dir:
        # Set before any worker starts: each then keeps its metrics in files there, and a
        # scrape of any worker sums them all (service/metrics.py).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="scimledger-metrics-")
    try:
        # One connection, for the setup only: the parent holds none while the workers serve
        # (the embedded server, if that is the database, stays attached until they are gone).
        async with open_database(replace(settings, pool_min=1, pool_max=1)) as database:
            issued = await first_start(database)  # the app's bootstrap, once for all workers
            await database.pool.close()
            worker_settings = replace(settings, database_url=database.dsn)
            async with (
                supervised(database.embedded) as supervisor,
                bulk_process(worker_settings, database.dsn, supervisor) as bulk,
                _Workers(
                    bulk.front_settings(worker_settings) if bulk else worker_settings,
                    workers,
                    supervisor,
                ) as pool,
            ):
                await pool.started(stop)
                print_banner(settings, issued, workers)
                if bulk is None:
                    await pool.supervise(stop)
                else:
                    await asyncio.gather(pool.supervise(stop), bulk.watch(stop))
    finally:
        if own_metrics_dir:
            shutil.rmtree(os.environ.pop("PROMETHEUS_MULTIPROC_DIR"), ignore_errors=True)


class _Workers:
    def __init__(self, settings: Settings, count: int, supervisor: SupervisorStatus | None) -> None:
        self.settings = settings
        self.count = count
        self.supervisor = supervisor
        self.context = multiprocessing.get_context("spawn")
        self.messages: Any = self.context.Queue()
        self.procs: dict[int, BaseProcess] = {}

    async def __aenter__(self) -> _Workers:
        for index in range(self.count):
            self._start(index)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop_all()

    def _start(self, index: int) -> None:
        proc = self.context.Process(
            target=_worker_main,
            args=(self.settings, index, self.messages, self.supervisor),
            name=f"scimledger-worker-{index}",
        )
        proc.start()
        self.procs[index] = proc

    async def started(self, stop: asyncio.Event) -> None:
        """Wait until every worker listens; ListenError if one cannot."""
        ready: set[int] = set()
        while len(ready) < self.count and not stop.is_set():
            message = self._message()
            if message is None:
                dead = [i for i, p in self.procs.items() if p.exitcode is not None]
                if dead:
                    last = self._message(wait=0.5)  # its last words, if it had any
                    raise ListenError(
                        last[1] if last and last[1] else f"worker {dead[0]} exited at start"
                    )
                await asyncio.sleep(0.05)
                continue
            index, error = message
            if error is not None:
                raise ListenError(error)
            ready.add(index)

    def _message(self, wait: float = 0.0) -> tuple[int, str | None] | None:
        try:
            message: tuple[int, str | None] = (
                self.messages.get(timeout=wait) if wait else self.messages.get_nowait()
            )
        except Empty:
            return None
        return message

    async def supervise(self, stop: asyncio.Event) -> None:
        """Until SIGTERM: replace a worker that died on its own."""
        while not stop.is_set():
            for index, proc in list(self.procs.items()):
                if proc.exitcode is not None:
                    log.warning("worker exited; starting another", worker=index, code=proc.exitcode)
                    _forget_metrics(proc)
                    self._start(index)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            while self._message() is not None:  # readiness of replaced workers
                pass

    async def _stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.exitcode is None and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + self.settings.shutdown_timeout + 10
        while any(p.exitcode is None for p in self.procs.values()):
            if asyncio.get_running_loop().time() > deadline:
                for proc in self.procs.values():
                    if proc.exitcode is None:
                        log.error("worker did not stop; killing it", pid=proc.pid)
                        proc.kill()
                deadline += 30
            await asyncio.sleep(0.05)
        for proc in self.procs.values():
            proc.join()
            _forget_metrics(proc)
        self.messages.close()
        self.messages.join_thread()


def _forget_metrics(proc: BaseProcess) -> None:
    """Drop a gone worker's live gauges (pool, runner leadership) from the shared metrics."""
    if proc.pid is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]


# -- a worker ------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the parent dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            if os.getppid() == 1:  # the parent is already gone
                os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(
    settings: Settings, index: int, messages: Any, supervisor: SupervisorStatus | None
) -> None:
    _die_with_parent()
    logsetup.configure()
    import uvloop

    try:
        uvloop.run(_worker(settings, index, messages, supervisor))
    except ListenError:
        sys.exit(1)


async def _worker(
    settings: Settings, index: int, messages: Any, supervisor: SupervisorStatus | None
) -> None:
    from service.app import create_app
    from service.state import SUPERVISOR

    stop = _stop_on_signals()
    # The app opens its own pool and runners (its cleanup contexts) as the runner sets it up.
    app = create_app(settings, role="worker")
    if supervisor is not None:
        app[SUPERVISOR] = supervisor
    try:
        runner = await listen(app, settings, reuse_port=True)
    except ListenError as e:
        messages.put((index, str(e)))
        raise
    messages.put((index, None))
    try:
        await stop.wait()
    finally:
        # Stops accepting, then waits for in-flight requests before the pool closes.
        await runner.cleanup()
