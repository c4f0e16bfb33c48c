"""`serve` looks after the embedded PostgreSQL: restarted when it dies, unhealthy when it cannot be.

One supervisor per `serve`: in its only process, or in the parent of `--workers N` (which holds
the embedded server attached while the workers serve). Once a second it checks that the data
directory's postmaster runs; when it does not (killed by the OOM killer, crashed, stopped), it
starts it again (infra.embedded: the stale files a killed server leaves are mended first),
retrying with a doubling delay. Each restart is logged and counted; after `GIVE_UP` failed
attempts in a row the status turns unhealthy (GET /healthz answers 503, so an orchestrator
restarts the whole service) and the supervisor keeps trying. With DATABASE_URL nothing is
supervised: someone else runs that server.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog

from infra.embedded import EmbeddedPostgres

log = structlog.get_logger("scimledger.supervisor")

GIVE_UP = 3  # failed restarts in a row before /healthz says unhealthy
_CHECK_EVERY = 1.0
_FIRST_DELAY = 1.0
_MAX_DELAY = 30.0
# A server that stayed up this long after a restart died of something new: the delay resets.
_STABLE_AFTER = 60.0

_RESTARTS, _FAILED, _FAILING = range(3)


class SupervisorStatus:
    """What the supervisor tells the HTTP side: restarts, failed attempts, whether it is
    failing now. In shared memory, so the workers of a supervising parent read it too."""

    def __init__(self) -> None:
        # One writer (the supervisor); aligned 64-bit values need no lock to be read whole.
        self._values: Any = multiprocessing.get_context("spawn").RawArray("q", 3)

    @property
    def restarts(self) -> int:
        return int(self._values[_RESTARTS])

    @property
    def failed_restarts(self) -> int:
        return int(self._values[_FAILED])

    @property
    def healthy(self) -> bool:
        return int(self._values[_FAILING]) < GIVE_UP

    def restarted(self) -> None:
        self._values[_RESTARTS] += 1
        self._values[_FAILING] = 0

    def failed(self) -> None:
        self._values[_FAILED] += 1
        self._values[_FAILING] += 1

    def broken(self) -> None:
        """The supervisor itself stopped: nobody looks after the server any more."""
        self._values[_FAILING] = GIVE_UP


class Supervisor:
    def __init__(self, embedded: EmbeddedPostgres, status: SupervisorStatus) -> None:
        self.embedded = embedded
        self.status = status
        self.delay = _FIRST_DELAY
        self.last_restart: float | None = None

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(_CHECK_EVERY)
                if self.embedded.postmaster_pid() is None:
                    await self._recover()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug here must not leave the service silently unwatched
            self.status.broken()
            log.error("embedded PostgreSQL supervisor failed", error=repr(e))
            raise

    async def _recover(self) -> None:
        down_at = time.monotonic()
        if self.last_restart is None or down_at - self.last_restart > _STABLE_AFTER:
            self.delay = _FIRST_DELAY
        else:  # it died again soon after a restart: no quicker than the backoff allows
            await asyncio.sleep(self.delay)
            self.delay = min(self.delay * 2, _MAX_DELAY)
        log.warning("embedded PostgreSQL is not running; restarting it", pgdata=self._pgdata())
        attempt = 1
        while True:
            try:
                started = await asyncio.to_thread(self.embedded.restart)
            except Exception as e:  # the wheel raises assorted errors; the reason is in e
                self.status.failed()
                log.error(
                    "embedded PostgreSQL did not restart",
                    attempt=attempt,
                    retry_in=self.delay,
                    healthy=self.status.healthy,
                    error=str(e),
                )
                await asyncio.sleep(self.delay)
                self.delay = min(self.delay * 2, _MAX_DELAY)
                attempt += 1
                continue
            self.last_restart = time.monotonic()
            self.status.restarted()
            log.warning(
                "embedded PostgreSQL restarted",
                attempt=attempt,
                pid=self.embedded.postmaster_pid(),
                down_seconds=round(self.last_restart - down_at, 3),
                restarts=self.status.restarts,
                **({} if started else {"by": "another process on this data directory"}),
            )
            return

    def _pgdata(self) -> str:
        return str(self.embedded.pgdata)


@contextlib.asynccontextmanager
async def supervised(embedded: EmbeddedPostgres | None) -> AsyncIterator[SupervisorStatus | None]:
    """Supervise `embedded` (None: an external server, nothing to do) while the block runs;
    the supervisor stops before the block's caller detaches from the server."""
    if embedded is None:
        yield None
        return
    status = SupervisorStatus()
    task = asyncio.get_running_loop().create_task(Supervisor(embedded, status).run())
    try:
        yield status
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
