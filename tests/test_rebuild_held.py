"""A rebuild's bulk replay of the audit log holds the resources' copies in memory between batches
(projections/audit_resources.Held) and writes them behind: when they leave the memory and at the
replay's end. The rebuilt log is the live one, row for row, however few it may hold."""

from __future__ import annotations

import gc
import random
from typing import Any

import pytest

from infra import collector
from infra.database import Database
from projections import audit, audit_resources
from projections.rebuild import Rebuilder
from projections.registry import PROJECTIONS
from tests.test_projections import Scim, settle, snapshot, workload


@pytest.mark.parametrize("held", [2, 1000])
async def test_the_audit_log_rebuilds_the_same_with_its_copies_held_between_batches(
    client: Any,
    auth: dict[str, str],
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
    held: int,
) -> None:
    await workload(Scim(client, auth), random.Random(1717), n=12)
    await settle(database)
    before = await snapshot(database)
    replays: list[Any] = []
    make = audit.Replay

    def replay() -> Any:
        replays.append(make())
        return replays[-1]

    monkeypatch.setattr(audit_resources, "HELD", held)
    monkeypatch.setattr(audit, "Replay", replay)
    enabled = gc.isenabled()
    # Small batches: a resource's events fall in many of them, and (with 2 held) most copies
    # are written when they leave the memory and read back from the shadow table later.
    report = await Rebuilder(database, PROJECTIONS["audit"], batch_size=7).run()
    assert report.swapped and not report.drift, report.diffs
    assert len(replays) == 1 and not replays[0].held.copies  # flushed before the comparison
    assert await snapshot(database) == before
    assert gc.isenabled() == enabled  # the collector is back as it was
    report = await Rebuilder(database, PROJECTIONS["audit"], batch_size=7).run(dry_run=True)
    assert not report.drift, report.diffs


def test_the_collector_pauses_while_any_rebuild_of_the_process_runs() -> None:
    assert gc.isenabled()
    with collector.paused():
        with collector.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with collector.paused():
            pass
        assert not gc.isenabled()  # someone else's choice stays
    finally:
        gc.enable()
