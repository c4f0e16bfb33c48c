"""One read of the log for several rebuilds in one process.

`rebuild --all` runs each projection in a process of its own (projections/parallel.py); when
there are more projections than processes, those that fold only some events (users, groups,
activity) share one, and their bulk replays share one read of the log: each batch is read
once, on a pooled connection, and handed to every rebuild, instead of PostgreSQL sending (and
Python decoding the rows of) the whole log once per projection. Each rebuild still decodes
the events it folds, loads their keys, and catches up, compares and swaps on its own.

The read starts when every member has arrived (or given up first: `skip`), and stays at most
two batches ahead of the slowest. A member that stops (its checkpoint reached, or a failure)
leaves; if the read fails, the members go on with reads of their own from where they are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from infra.eventstore import START, RecordedEvent

Batch = list[RecordedEvent]
Reader = Callable[[Any, Any], Awaitable[Batch]]  # (connection, after) -> the next batch


class SharedLog:
    def __init__(self, db: Any, members: int, read: Reader) -> None:
        self.db = db
        self.read = read
        self._waiting = members
        self._queues: list[asyncio.Queue[Batch | None]] = []
        self._reader: asyncio.Task[None] | None = None

    def skip(self) -> None:
        """A member that will not replay (it failed before): the others do not wait for it."""
        self._arrive()

    async def replay(self, fold: Callable[[Batch], Awaitable[bool]]) -> None:
        """Hand the log's batches to `fold`, in order, until the log ends or it returns False."""
        queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=2)
        self._queues.append(queue)
        self._arrive()
        try:
            while (batch := await queue.get()) is not None:
                if not await fold(batch):
                    return
        finally:
            self._queues.remove(queue)
            while not queue.empty():  # a put the reader waits on goes through
                queue.get_nowait()

    async def close(self) -> None:
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    def _arrive(self) -> None:
        self._waiting -= 1
        if self._waiting <= 0 and self._reader is None and self._queues:
            self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        after = START
        try:
            async with self.db.pool.acquire() as conn:
                while self._queues:
                    batch = await self.read(conn, after)
                    for queue in list(self._queues):
                        await queue.put(batch or None)
                    if not batch:
                        return
                    after = batch[-1].position
        except BaseException:
            # The members go on with reads of their own, from where they are.
            for queue in list(self._queues):
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)
            raise
