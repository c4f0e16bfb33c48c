"""A request's own CPU, as the fuzz harness measures it: the app's event-loop thread over the
request's window plus the worker-thread CPU charged to the request, with nothing else of the
process in it.

The whole process's clock (time.process_time) counted the projection runners' batches too, and
hypothesis generating the next request in its thread: `make fuzz` once reported
GET /audit/v1/export at 0.988 s of CPU, and 0.009 s on the next pass. So the fuzz app runs no
runners on its loop (they run in a thread of their own, with their own pool), its loop's
default executor meters what it runs per request (service/limits_cost.MeteredExecutor), and the
harness reads the loop thread's clock (time.thread_time, on that thread) around each request
and adds what the request's worker threads spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from aiohttp import web
from aiohttp.typedefs import Middleware

from infra.config import Settings
from infra.database import open_database
from service.limits_cost import MeteredExecutor, Spent, charged_to
from service.state import Handler

# The harness numbers its requests in this header; the app's meter keeps each one's worker CPU.
SEQUENCE_HEADER = "X-Fuzz-Sequence"
# Worker-thread CPU of the requests in flight or not yet read, by sequence number (bounded: the
# harness takes each one's figure as its reply arrives, and sends one request at a time).
WORKER_CPU: dict[str, Spent] = {}
_MOST_KEPT = 1000
# The names of the app's worker threads (metered_executor_ctx).
WORKERS = "fuzz-app-worker"


class RequestCpu:
    """Around one request sent from the app's loop thread: its CPU (`seconds`), the loop
    thread's over the window plus what the app's meter charged to `sequence`; and the part of
    the loop thread's and its worker threads' that the cyclic garbage collector took
    (`collector`): a full collection walks the whole heap of the test process (hypothesis, the
    harness), far larger than a server's, and is paid by whichever request's allocations happen
    to set it off."""

    def __init__(self, sequence: str) -> None:
        self.sequence = sequence
        self.seconds = 0.0
        self.collector = 0.0
        self._collecting: dict[int, float] = {}  # by thread: when its collection started

    def __enter__(self) -> RequestCpu:
        self._thread = threading.get_ident()
        gc.callbacks.append(self._collected)
        self.started = time.thread_time()
        return self

    def __exit__(self, *exc: object) -> None:
        workers = WORKER_CPU.pop(self.sequence, None)
        self.seconds = time.thread_time() - self.started
        self.seconds += workers.seconds if workers is not None else 0.0
        gc.callbacks.remove(self._collected)

    def _collected(self, phase: str, info: dict[str, int]) -> None:
        # A collection in the loop thread, or in a worker thread of the app's meter (one
        # request at a time: whatever runs there runs for this one); not the runners' thread.
        thread = threading.get_ident()
        if thread != self._thread and not threading.current_thread().name.startswith(WORKERS):
            return
        if phase == "start":
            self._collecting[thread] = time.thread_time()
        elif (started := self._collecting.pop(thread, None)) is not None:
            self.collector += time.thread_time() - started


def meter() -> Middleware:
    """The fuzz app's outermost middleware: a numbered request's worker threads' CPU."""

    @web.middleware
    async def metered(request: web.Request, handler: Handler) -> web.StreamResponse:
        sequence = request.headers.get(SEQUENCE_HEADER)
        if sequence is None:
            return await handler(request)
        if len(WORKER_CPU) >= _MOST_KEPT:
            WORKER_CPU.clear()
        spent = WORKER_CPU[sequence] = Spent()
        with charged_to(spent):
            return await handler(request)

    return metered


async def metered_executor_ctx(app: web.Application) -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(MeteredExecutor(thread_name_prefix=WORKERS))
    yield


def without_followers(settings: Settings) -> Settings:
    """The fuzz app's settings: its runners (and the feeds' background work) elsewhere."""
    return replace(settings, run_projections=False)


@contextlib.asynccontextmanager
async def runners_in_a_thread(settings: Settings) -> AsyncIterator[None]:
    """The asynchronous projections' runners on a loop of their own, in a thread of their own
    (its CPU is not the app's loop thread's), with a pool of their own."""
    from projections.registry import PROJECTIONS
    from projections.runner import start_all

    started = threading.Event()
    running: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
    failed: list[BaseException] = []

    async def run() -> None:
        async with open_database(settings, run_migrations=False) as database:
            stop, tasks, _ = start_all(
                database,
                list(PROJECTIONS.values()),
                standby_interval=settings.runner_standby_interval,
            )
            running.append((asyncio.get_running_loop(), stop))
            started.set()
            await stop.wait()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def main() -> None:
        try:
            asyncio.run(run())
        except BaseException as e:  # reported by the test, not lost in the thread
            failed.append(e)
        finally:
            started.set()

    thread = threading.Thread(target=main, name="fuzz-runners", daemon=True)
    thread.start()
    await asyncio.to_thread(started.wait, 60)
    try:
        if failed:
            raise failed[0]
        yield
    finally:
        for loop, stop in running:
            loop.call_soon_threadsafe(stop.set)
        await asyncio.to_thread(thread.join, 60)
    if failed:
        raise failed[0]
