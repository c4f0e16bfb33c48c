"""Rebuild several projections at once, each in a process of its own.

A rebuild is Python work (decoding events, folding them through the aggregates) interleaved
with PostgreSQL work (writing the shadow tables); one process keeps about one core busy. The
projections are independent of each other (their own tables, their own swap), so `rebuild --all`
runs them side by side, `jobs` at a time, and the machine's cores and PostgreSQL's share the
load. Each process runs the same `Rebuilder` as a single rebuild; a failure in one leaves the
others to finish and its own live view untouched. With fewer processes than projections, those
that fold only some events share one, and one read of the log (`workers`, projections/shared.py).

The parent starts (or reaches) the database and migrates it once, and hands the workers its
URL, so an embedded server is not started by every worker. Workers are forked (they start at
once, the code imported) and report progress and their result on a queue; the parent reaps
them, so its own CPU accounting (`wait4`, `time`) includes theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing
import queue as queues
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import asyncpg

from infra.config import Settings
from infra.database import open_database, resolve_dsn
from infra.embedded import EmbeddedPostgres
from infra.migrations import migrate
from projections.rebuild import BATCH_SIZE, Rebuilder, RebuildReport, read_batch
from projections.registry import PROJECTIONS
from projections.shared import SharedLog

Tick = Callable[[str, int, int], None]  # (projection, events applied, events in the log)
_TICK_EVERY = 0.2  # seconds between progress messages from a worker


@dataclass
class Failed:
    """A projection whose rebuild failed (its live view is untouched)."""

    name: str
    error: str


def _worker(settings: Settings, names: tuple[str, ...], dry_run: bool, out: Any) -> None:
    """Rebuild `names` in this process; more than one share their bulk replay's read."""
    import uvloop

    last: dict[str, float] = {}

    def ticker(name: str) -> Callable[[int, int], None]:
        def tick(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last.get(name, 0.0) >= _TICK_EVERY:
                last[name] = now
                out.put(("progress", name, done, total))

        return tick

    async def go() -> list[RebuildReport | BaseException]:
        async with open_database(settings, run_migrations=False) as db:
            shared = None
            if len(names) > 1:
                shared = SharedLog(db, len(names), functools.partial(read_batch, limit=BATCH_SIZE))
            rebuilders = [
                Rebuilder(db, PROJECTIONS[n], progress=ticker(n), shared=shared) for n in names
            ]
            try:
                return await asyncio.gather(
                    *(r.run(dry_run=dry_run) for r in rebuilders), return_exceptions=True
                )
            finally:
                if shared is not None:
                    await shared.close()

    try:
        results = uvloop.run(go())
    except KeyboardInterrupt:
        results = [KeyboardInterrupt() for _ in names]
    except Exception as e:
        results = [e for _ in names]
    for name, result in zip(names, results, strict=True):
        if isinstance(result, KeyboardInterrupt):
            out.put(("failed", name, "interrupted"))
        elif isinstance(result, BaseException):
            first_line = next(iter(str(result).splitlines()), "")  # PostgreSQL adds HINT/DETAIL
            out.put(("failed", name, f"{type(result).__name__}: {first_line}"))
        else:
            out.put(("done", name, result))


def workers(names: Sequence[str], jobs: int) -> list[tuple[str, ...]]:
    """The projections each process rebuilds: one each if there are processes enough; else
    those that fold every event (the audit log) one each, and the rest together, sharing a
    read of the log (projections/shared.py). The longest first, so that it starts earliest."""
    alone = [n for n in names if PROJECTIONS[n].decodes and PROJECTIONS[n].handles is None]
    rest = tuple(n for n in names if n not in alone)
    if len(names) <= max(jobs, 1) or not rest:
        return [(n,) for n in sorted(names, key=lambda n: n not in alone)]
    return [*((n,) for n in alone), rest]


def run(
    settings: Settings,
    names: Sequence[str],
    *,
    dry_run: bool,
    jobs: int,
    tick: Tick | None = None,
) -> list[RebuildReport | Failed]:
    """Rebuild `names` with up to `jobs` processes; results in the order of `names`.

    Call it from the main thread with no other thread running (`tick` runs in it too): the
    workers are forked from this process, so that they start at once with the code already
    imported, and a fork must not copy a lock that another thread holds.
    """
    dsn, embedded = asyncio.run(_reach(settings))
    try:
        return _supervise(replace(settings, database_url=dsn), names, dry_run, jobs, tick)
    finally:
        if embedded is not None:
            embedded.stop()


async def _reach(settings: Settings) -> tuple[str, EmbeddedPostgres | None]:
    """Start (or attach to) the database and migrate it, once, for all the workers; an
    embedded server stays attached to this process until they are done."""
    dsn, embedded = await resolve_dsn(settings)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
    except BaseException:
        if embedded is not None:
            embedded.stop()
        raise
    return dsn, embedded


def _supervise(
    settings: Settings, names: Sequence[str], dry_run: bool, jobs: int, tick: Tick | None
) -> list[RebuildReport | Failed]:
    ctx = multiprocessing.get_context("fork")
    out: Any = ctx.Queue()
    pending = workers(names, jobs)
    running: dict[str, Any] = {}  # each projection -> the process rebuilding it
    results: dict[str, RebuildReport | Failed] = {}
    try:
        while pending or running:
            while pending and len(set(map(id, running.values()))) < max(jobs, 1):
                group = pending.pop(0)
                proc = ctx.Process(
                    target=_worker,
                    args=(settings, group, dry_run, out),
                    name=f"rebuild-{'-'.join(group)}",
                )
                proc.start()
                running.update(dict.fromkeys(group, proc))
            try:
                message = out.get(timeout=0.5)
            except queues.Empty:
                for name, proc in list(running.items()):
                    if not proc.is_alive() and name not in results:
                        # Died without a word (killed): give its last message a moment.
                        with contextlib.suppress(queues.Empty):
                            while True:
                                _take(out.get(timeout=0.5), results, running, tick)
                        if name not in results:
                            results[name] = Failed(name, f"worker exited with {proc.exitcode}")
                            running.pop(name)
                            if proc not in running.values():
                                proc.join()
                continue
            _take(message, results, running, tick)
    finally:
        for proc in set(running.values()):
            proc.terminate()
        for proc in set(running.values()):
            proc.join()
    return [results[n] for n in names]


def _take(
    message: tuple[Any, ...],
    results: dict[str, RebuildReport | Failed],
    running: dict[str, Any],
    tick: Tick | None,
) -> None:
    kind, name, *rest = message
    if kind == "progress":
        if tick is not None:
            tick(name, rest[0], rest[1])
        return
    results[name] = rest[0] if kind == "done" else Failed(name, rest[0])
    proc = running.pop(name, None)
    if proc is not None and proc not in running.values():
        proc.join()  # its last projection
