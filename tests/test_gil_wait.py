"""The event loop of a serving process waits at most LOOP_GIL_WAIT for a worker thread's GIL."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

from aiohttp import web

from infra.config import Settings
from service.workers import LOOP_GIL_WAIT, listen
from tests.test_cli import free_port


async def test_a_serving_process_takes_the_gil_back_within_half_a_millisecond(
    tmp_path: Path,
) -> None:
    # CPython's default is 5 ms: a request arriving while a worker thread parses a body waited
    # that long, several times, before the loop could answer it.
    default, thresholds = sys.getswitchinterval(), gc.get_threshold()
    settings = Settings(data_dir=tmp_path, host="127.0.0.1", port=free_port())
    runner = await listen(web.Application(), settings)
    try:
        assert sys.getswitchinterval() == LOOP_GIL_WAIT < default
    finally:
        await runner.cleanup()
        # What `listen` also does to a serving process's collector, undone for the test run.
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        sys.setswitchinterval(default)
