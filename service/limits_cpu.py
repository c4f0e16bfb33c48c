"""The bulk process's share of the CPU: behind everyone else's work, and further behind while
it serves requests.

Niceness alone does not put a process behind others on Linux: with autogroup (the default of
desktop and server kernels alike) each session is scheduled as one entity, and a nice value
only orders the processes within it. So the bulk process leaves `serve`'s session for one of
its own and lowers that group's weight (/proc/self/autogroup; where autogroup is off, its own
niceness is what counts); its PostgreSQL backends, which share PostgreSQL's session with the
backends of every other request, get the same niceness where PostgreSQL runs on this machine.

At BULK_NICENESS (weight 110 of a default session's 1024) the bulk process still held up
another tenant's requests while a hostile one sent large bodies back to back: `perf sched` on
a busy 2-core machine, the time woken steps of the other tenant's GETs (its client, the
front, their PostgreSQL backends) waited for a CPU the bulk process held, 3.1-3.8 ms per
hostile request; 0.9-2.2 ms at SERVING_NICENESS (weight 15), in the same runs. But its
projection runners and the feeds' background work should keep up with everyone's writes, so
it runs at SERVING_NICENESS only while it serves requests, and for SERVING_LINGER seconds
after the last: a burst of large bodies lowers it once, not once per request (the kernel
lets an unprivileged process change a group's weight at most every 100 ms anyway).

Weight and priority decide who runs first, not where. With the CPUs shared freely, the
other tenants' requests still waited behind the bulk process's work: a request's database
round trips (the backend woken to read the query, the front to read the answer) were what
grew, not its statements, and neither a lower priority (SCHED_IDLE for the bulk process and
its backends), shorter slices nor a CPU quota of 30% of one core took that away. Confining the
bulk process and its local backends to some of the CPUs took most of it away
(SCIMLEDGER_BULK_CPUS, by default the last quarter of those `serve` may use, at least one,
where there are two or more): whatever large bodies a client sends, the other CPUs never run
their work. What is left on 2 cores is the other requests' own: with one CPU left to them, a
client, the front and a backend wait behind each other there (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
from collections.abc import Collection
from functools import partial
from pathlib import Path

import asyncpg
import psutil
from aiohttp import web

from service.state import Handler

BULK_NICENESS = 10
SERVING_NICENESS = 19
SERVING_LINGER = 1.0
_AUTOGROUP = Path("/proc/self/autogroup")


# Linux's own bound on CPU numbers (CONFIG_NR_CPUS at most 8192).
_MAX_CPUS = 8192
_CPU_RANGE = re.compile(r"(\d{1,4})(?:-(\d{1,4}))?", re.ASCII)


def bulk_cpu_set(spec: str, allowed: Collection[int]) -> frozenset[int] | None:
    """The CPUs SCIMLEDGER_BULK_CPUS (`spec`) confines the bulk process to, or None (all of
    them, where the scheduler likes); `allowed`: those this process may use. ValueError for a
    list that is malformed or names a CPU outside `allowed`."""
    usable = sorted(allowed)
    wanted = spec.strip().lower()
    if wanted == "all":
        return None
    if wanted == "auto":
        return frozenset(usable[-max(1, len(usable) // 4) :]) if len(usable) >= 2 else None
    chosen: set[int] = set()
    for part in wanted.split(","):
        found = _CPU_RANGE.fullmatch(part.strip())
        low, high = (int(found[1]), int(found[2] or found[1])) if found else (1, 0)
        if low > high or high >= _MAX_CPUS:
            raise ValueError(
                f"SCIMLEDGER_BULK_CPUS={spec!r}: not a list of CPUs such as 3 or 2-3,6"
                " (or auto, or all)"
            )
        chosen.update(range(low, high + 1))
    outside = sorted(chosen.difference(usable))
    if outside:
        raise ValueError(
            f"SCIMLEDGER_BULK_CPUS={spec!r}: CPU {outside[0]} is not one serve may use"
            f" ({cpu_list(usable)})"
        )
    return frozenset(chosen)


def cpu_list(cpus: Collection[int]) -> str:
    """CPUs as Linux lists them (Cpus_allowed_list): 0-3,6."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and ranges[-1][1] == cpu - 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges)


def behind_everyone(cpus: frozenset[int] | None = None) -> None:
    """This process, and the PostgreSQL backends it opens, yield the CPU to everyone else's,
    and run on `cpus` only (None: on any)."""
    with contextlib.suppress(OSError):
        os.setsid()
    with contextlib.suppress(OSError):
        _AUTOGROUP.write_text(str(BULK_NICENESS))
    with contextlib.suppress(OSError):
        os.nice(BULK_NICENESS)
    if cpus is not None:
        # Every thread there is; those started later inherit it.
        with contextlib.suppress(OSError):
            for task in os.listdir("/proc/self/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task), cpus)
    from infra.database import on_connect

    on_connect(partial(_lower_backend, cpus))


async def _lower_backend(cpus: frozenset[int] | None, conn: asyncpg.Connection) -> None:
    # Over TCP to another machine the pid is that machine's: only a local server's.
    address = await conn.fetchval("SELECT inet_server_addr()")
    if address is not None and not address.is_loopback:
        return
    pid = conn.get_server_pid()
    with contextlib.suppress(psutil.Error, OSError):
        if psutil.Process(pid).name() != "postgres":
            return
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, pid, BULK_NICENESS)
        if cpus is not None:
            os.sched_setaffinity(pid, cpus)


class ServingPriority:
    """This process's autogroup at SERVING_NICENESS while requests are in flight (and for
    SERVING_LINGER seconds after), at BULK_NICENESS otherwise."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.lowered = False
        self.usable = True  # no autogroup here (or it refuses us): nothing to do
        self._restore: asyncio.TimerHandle | None = None

    def enter(self) -> None:
        self.in_flight += 1
        if self._restore is not None:
            self._restore.cancel()
            self._restore = None
        if not self.lowered:
            self.lowered = self._set(SERVING_NICENESS)

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self.lowered:
            self._later(SERVING_LINGER)

    def _later(self, seconds: float) -> None:
        self._restore = asyncio.get_running_loop().call_later(seconds, self._back)

    def _back(self) -> None:
        self._restore = None
        if self.in_flight or not self.lowered:
            return
        if self._set(BULK_NICENESS):
            self.lowered = False
        elif self.usable:  # too soon after another process's change (EAGAIN): try again
            self._later(0.2)

    def _set(self, niceness: int) -> bool:
        if not self.usable:
            return False
        try:
            _AUTOGROUP.write_text(str(niceness))
        except OSError as e:
            if e.errno != errno.EAGAIN:
                self.usable = False
            return False
        return True


SERVING_PRIORITY = web.AppKey("serving_priority", ServingPriority)


@web.middleware
async def serving(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The bulk process's middleware around each relayed request (see ServingPriority)."""
    priority = request.app[SERVING_PRIORITY]
    priority.enter()
    try:
        return await handler(request)
    finally:
        priority.leave()
