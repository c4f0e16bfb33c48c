"""Python's cyclic garbage collector held off while long batch work runs in this process.

A rebuild (projections/rebuild.py) and a feed's catch-up (service/feeds/batch.py) keep a
batch's many objects alive for a whole step, so the collector would promote them to its oldest
generation and run full collections over the whole heap again and again: a third of a
rebuild's CPU, ~50 µs per SET of a catch-up. Both hold the collector off while they run; holds
nest and overlap (a step and a build ahead, a rebuild beside a catch-up), and the collector
comes back when the last one ends, unless someone else had turned it off before the first.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

_holds = 0  # running in this process
_was_enabled = True


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """The cyclic collector off while any hold of this process runs."""
    global _holds, _was_enabled
    if _holds == 0:
        _was_enabled = gc.isenabled()
        gc.disable()
    _holds += 1
    try:
        yield
    finally:
        _holds -= 1
        if _holds == 0 and _was_enabled:
            gc.enable()
