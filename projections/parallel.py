"""Rebuild several projections at once, each in a process of its own.

A rebuild is Python work (decoding events, folding them through the aggregates) interleaved
with PostgreSQL work (writing the shadow tables); one process keeps about one core busy. The
projections are independent of each other (their own tables, their own swap), so `rebuild --all`
runs them side by side, `jobs` at a time, and the machine's cores and PostgreSQL's share the
load. Each process runs the same `Rebuilder` as a single rebuild; a failure in one leaves the
others to finish and its own live view untouched.

The parent starts (or reaches) the database and migrates it once, and hands the workers its
URL, so an embedded server is not started by every worker. Workers are forked (they start at
once, the code imported) and report progress and their result on a queue; the parent reaps
them, so its own CPU accounting (`wait4`, `time`) includes theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from projections.rebuild import Rebuilder, RebuildReport
from projections.registry import PROJECTIONS

Tick = Callable[[str, int, int], None]  # (projection, events applied, events in the log)
_TICK_EVERY = 0.2  # seconds between progress messages from a worker


@dataclass
class Failed:
    """A projection whose rebuild failed (its live view is untouched)."""

    name: str
    error: str


def _worker(settings: Settings, name: str, dry_run: bool, out: Any) -> None:
    import uvloop

    last = 0.0

    def tick(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= _TICK_EVERY:
            last = now
            out.put(("progress", name, done, total))

    async def go() -> RebuildReport:
        async with open_database(settings, run_migrations=False) as db:
            return await Rebuilder(db, PROJECTIONS[name], progress=tick).run(dry_run=dry_run)

    try:
        report = uvloop.run(go())
    except KeyboardInterrupt:
        out.put(("failed", name, "interrupted"))
    except Exception as e:
        first_line = next(iter(str(e).splitlines()), "")  # PostgreSQL adds HINT/DETAIL lines
        out.put(("failed", name, f"{type(e).__name__}: {first_line}"))
    else:
        out.put(("done", name, report))


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
    # The longest first (the audit log folds every event), so the slowest starts earliest.
    pending = sorted(names, key=lambda n: PROJECTIONS[n].mode != "async")
    running: dict[str, Any] = {}
    results: dict[str, RebuildReport | Failed] = {}
    try:
        while pending or running:
            while pending and len(running) < max(jobs, 1):
                name = pending.pop(0)
                proc = ctx.Process(
                    target=_worker, args=(settings, name, dry_run, out), name=f"rebuild-{name}"
                )
                proc.start()
                running[name] = proc
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
                            running.pop(name).join()
                continue
            _take(message, results, running, tick)
    finally:
        for proc in running.values():
            proc.terminate()
        for proc in running.values():
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
    if proc is not None:
        proc.join()
