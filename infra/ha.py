"""What a failover needs of PostgreSQL, checked: `scimledger doctor`, and a warning at start.

An acknowledged write survives the primary's death only if the standby had it before the
client heard of it: `synchronous_commit` on (or remote_apply) with a synchronous standby
(`synchronous_standby_names` naming it, `sync_state` sync or quorum in pg_stat_replication).
An asynchronous standby is promoted without the last commits the old primary acknowledged.
Prepared (two-phase) transactions left in doubt hold back every follower: the projections'
barrier (`pg_snapshot_xmin`) does not pass them until they are committed or rolled back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

_GOOD_COMMIT = frozenset({"on", "remote_apply"})


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail}


async def failover_checks(conn: Any) -> list[Check]:
    """The checks, read from the primary `conn` is on (a few catalog reads)."""
    checks: list[Check] = []
    in_recovery = bool(await conn.fetchval("SELECT pg_is_in_recovery()"))
    checks.append(
        Check(
            "primary",
            not in_recovery,
            "connected to a standby: writes will fail (use target_session_attrs=read-write)"
            if in_recovery
            else "connected to the writable primary",
        )
    )
    commit = str(await conn.fetchval("SHOW synchronous_commit"))
    names = str(await conn.fetchval("SHOW synchronous_standby_names"))
    try:
        standbys = list(
            await conn.fetch(
                "SELECT application_name, sync_state FROM pg_stat_replication"
                " WHERE state = 'streaming'"
            )
        )
    except asyncpg.PostgresError as e:  # no right to read it: say so rather than guess
        standbys = []
        checks.append(Check("standby", False, f"cannot read pg_stat_replication: {e}"))
    sync = [r for r in standbys if r["sync_state"] in ("sync", "quorum")]
    if commit not in _GOOD_COMMIT:
        checks.append(
            Check(
                "synchronous_commit",
                False,
                f"synchronous_commit = {commit}: an acknowledged write may be lost"
                " (set it to on)",
            )
        )
    else:
        checks.append(Check("synchronous_commit", True, f"synchronous_commit = {commit}"))
    if standbys and not sync:
        listed = ", ".join(str(r["application_name"]) for r in standbys)
        checks.append(
            Check(
                "standby",
                False,
                f"asynchronous standby ({listed}; synchronous_standby_names = '{names}'):"
                " a failover to it can lose acknowledged writes",
            )
        )
    elif sync:
        listed = ", ".join(str(r["application_name"]) for r in sync)
        checks.append(Check("standby", True, f"synchronous standby: {listed}"))
    elif names.strip():
        checks.append(
            Check(
                "standby",
                False,
                f"synchronous_standby_names = '{names}' but no standby streams:"
                " every commit waits for one",
            )
        )
    else:
        checks.append(Check("standby", True, "no standby (a single server: no failover)"))
    prepared = int(await conn.fetchval("SELECT count(*) FROM pg_prepared_xacts"))
    checks.append(
        Check(
            "prepared_transactions",
            prepared == 0,
            "none in doubt"
            if prepared == 0
            else f"{prepared} prepared transaction(s) in doubt: followers wait behind them"
            " (COMMIT PREPARED or ROLLBACK PREPARED them)",
        )
    )
    return checks
