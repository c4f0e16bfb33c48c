"""`rebuild --all` with fewer processes than projections: the audit log (which folds every event)
in a process of its own, the others in one, sharing one read of the log (projections/shared.py).
Their views are the same as each rebuilt alone; one of them failing leaves the others to finish."""

from __future__ import annotations

import random
from typing import Any

from infra.database import Database
from projections.parallel import workers
from projections.registry import PROJECTIONS
from tests.test_cli import run
from tests.test_projections import Scim, leftover_shadows, settle, snapshot, table_oids, workload


def test_more_projections_than_processes_share_one() -> None:
    names = list(PROJECTIONS)
    assert workers(names, 2) == [("audit",), ("users", "groups", "activity")]
    assert workers(names, 4) == [("audit",), ("users",), ("groups",), ("activity",)]
    assert workers(["users", "groups"], 1) == [("users", "groups")]
    assert workers(["audit"], 1) == [("audit",)]


async def test_a_shared_read_rebuilds_the_same_views_and_one_failing_leaves_the_others(
    client: Any, auth: dict[str, str], database: Database, fresh_dsn: str
) -> None:
    await workload(Scim(client, auth), random.Random(17), n=10)
    await settle(database)
    before = await snapshot(database)

    def cli(*args: str) -> Any:
        return run("projections", *args, "--quiet", "--jobs", "2", "--database-url", fresh_dsn)

    code, out, err = await cli("rebuild", "--all")
    assert code == 0, (out, err)
    assert out.count("swapped in") == len(PROJECTIONS), out
    assert await snapshot(database) == before
    code, out, err = await cli("verify", "--all")
    assert code == 0 and "no drift" in out, (out, err)

    # The users' shadow cannot be made: users fails before its replay, the two sharing its
    # process do not wait for it and swap their views in.
    oids = await table_oids(database)
    await database.pool.execute("CREATE VIEW scim_users__rebuild AS SELECT 1 AS x")
    try:
        code, out, err = await cli("rebuild", "--all")
    finally:
        await database.pool.execute("DROP VIEW scim_users__rebuild")
    assert code == 1 and err.startswith("scimledger: error: users failed"), (out, err)
    swapped = [line.split(":")[0] for line in out.splitlines() if line.endswith("swapped in")]
    assert swapped == ["groups", "activity", "audit"], out
    after = await table_oids(database)
    assert after["scim_users"] == oids["scim_users"] and after["scim_groups"] != oids["scim_groups"]
    assert await snapshot(database) == before
    assert await leftover_shadows(database) == []
