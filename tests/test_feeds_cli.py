"""`scimledger feeds`, run as operators run it: a separate process."""

from __future__ import annotations

import json

from infra.database import Database
from infra.tenants import IssuedToken, authenticate
from tests.test_cli import run


async def test_feeds_commands_manage_a_stream(
    fresh_dsn: str, database: Database, tenant: IssuedToken
) -> None:
    db = ["--database-url", fresh_dsn]
    code, out, err = await run(
        "feeds", "create", "--tenant", "acme", "--name", "warehouse", "--poll", "--json", *db
    )
    assert code == 0, err
    created = json.loads(out)
    assert set(created) == {"id", "tenant", "name", "token"}
    principal = await authenticate(database.pool, created["token"])
    assert principal is not None and principal.role == "feed"

    code, out, err = await run("feeds", "list", "--tenant", "acme", "--json", *db)
    assert code == 0, err
    listed = json.loads(out)
    assert listed["id"] == created["id"] and listed["state"] == "active"
    assert listed["delivery"] == "poll" and "token" not in out

    for action, state in (("pause", "paused"), ("resume", "active")):
        code, _, err = await run("feeds", action, "warehouse", "--tenant", "acme", *db)
        assert code == 0, err
        code, out, _ = await run("feeds", "show", "warehouse", "--tenant", "acme", *db)
        assert json.loads(out)["state"] == state
    code, _, err = await run(
        "feeds", "reset", "warehouse", "--tenant", "acme", "--from", "START", *db
    )
    assert code == 0, err

    # Operator mistakes: one line, exit 2, nothing created.
    for args in (
        ["create", "--tenant", "acme", "--name", "x", "--poll", "--push", "https://e.x/"],
        ["create", "--tenant", "acme", "--name", "x", "--push", "http://127.0.0.1:1/"],
        ["create", "--tenant", "acme", "--name", "x", "--push", "https://10.0.0.1/"],
        ["create", "--tenant", "acme", "--name", "x", "--poll", "--events", "prov:nope"],
        ["create", "--tenant", "acme", "--name", "warehouse", "--poll"],
        ["show", "nope", "--tenant", "acme"],
        ["reset", "warehouse", "--tenant", "acme", "--from", "yesterday"],
    ):
        code, out, err = await run("feeds", *args, *db)
        assert code == 2, (args, out, err)
        assert err.startswith("scimledger: error:") and len(err.strip().splitlines()) == 1
    assert await database.pool.fetchval("SELECT count(*) FROM feed_streams") == 1

    code, _, err = await run("feeds", "delete", "warehouse", "--tenant", "acme", *db)
    assert code == 0, err
    assert await authenticate(database.pool, created["token"]) is None
