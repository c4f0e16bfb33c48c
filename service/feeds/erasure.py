"""Erasure (issue 17) of SETs still waiting for delivery: their personal values go.

A `full` SET (RFC 9967 §2.4: `data`, the resource or the PatchOp) or one whose `sub_id` names
the subject's `externalId` (§2.1), produced before its subject was erased and not yet
acknowledged, would still hand the person's values to the receiver. The erasure's transaction
(service/erasure.py) replaces each with its notice form: §2.4 lets a provider publish a
change as a notice, `attributes` naming what changed, with no values, and §2.1 makes
`externalId` optional in `sub_id`. Each keeps its `jti`, `txn`, `iat` and place in the stream
(a receiver may acknowledge either copy) and is signed again with the tenant's current key.

The streams' rows are locked `FOR KEY SHARE`: that waits for a producer's step (it holds its
stream `FOR UPDATE`), whose SETs are then rewritten here, while polls and pushes (which only
update the row's counters) go on. A step after the erasure sees the subject erased
(batch.Builder._erased) and makes notices itself, also of SETs built ahead before the erasure
(batch.Ahead.fits).
"""

from __future__ import annotations

import base64
import re
from typing import Any
from uuid import UUID

import orjson
import structlog

from infra.eventstore import Conn
from service.feeds import sets
from service.feeds.keys import current_key

log = structlog.get_logger("scimledger.feeds")
_FULL = ":full"
_FILTER = re.compile(r"\[.*$")  # `members[value eq "…"]` names the attribute `members`


def claims_of(token: str) -> dict[str, Any]:
    """The claims of a compact JWS we signed (its signature is not checked here)."""
    payload = token.split(".", 2)[1]
    data: dict[str, Any] = orjson.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return data


def notice(claims: dict[str, Any]) -> dict[str, Any]:
    """The claims with every `full` event as its notice (RFC 9967 §2.4) and no `externalId`."""
    events: dict[str, Any] = {}
    for uri, payload in claims.get("events", {}).items():
        if not uri.endswith(_FULL) or not isinstance(payload, dict):
            events[uri] = payload
            continue
        data = payload.get("data")
        if uri.startswith(sets.PATCH):  # §2.4.2: data is the PatchOp as applied
            operations = data.get("Operations", []) if isinstance(data, dict) else []
            names = [n for op in operations if isinstance(op, dict) for n in _names(op)]
            attributes = list(dict.fromkeys(names))
        else:  # §2.4.1, §2.4.3: data is the resource
            attributes = sets.create_attributes(data if isinstance(data, dict) else {})
        out = {k: v for k, v in payload.items() if k != "data"}
        out["attributes"] = attributes
        events[uri.removesuffix(_FULL) + ":notice"] = out
    subject = {k: v for k, v in claims.get("sub_id", {}).items() if k != "externalId"}
    return {**claims, "sub_id": subject, "events": events}


def _names(operation: dict[str, Any]) -> list[str]:
    """The attributes one PatchOp operation changes (RFC 7644 §3.5.2: its path, or without one
    the keys of its value)."""
    path = operation.get("path")
    if isinstance(path, str):
        return [_FILTER.sub("", path)]
    value = operation.get("value")
    return [str(k) for k in value] if isinstance(value, dict) else []


async def scrub(conn: Conn, tenant_id: UUID, subject_id: UUID) -> int:
    """Rewrite the tenant's pending SETs carrying the subject's values (in the caller's
    transaction); how many. Bounded: a stream holds at most producer.MAX_PENDING SETs."""
    streams = [
        r[0]
        for r in await conn.fetch(
            "SELECT id FROM feed_streams WHERE tenant_id = $1 ORDER BY id FOR KEY SHARE",
            tenant_id,
        )
    ]
    if not streams:
        return 0
    rows = await conn.fetch(
        "SELECT stream_id, seq, token FROM feed_sets"
        " WHERE subject = $1 AND stream_id = any($2::uuid[]) ORDER BY stream_id, seq",
        subject_id,
        streams,
    )
    if not rows:
        return 0
    key = await current_key(conn, tenant_id)
    tokens = [key.sign(notice(claims_of(r["token"]))) for r in rows]
    await conn.execute(
        "UPDATE feed_sets f SET token = x.t, kid = $4, subject = NULL"
        " FROM unnest($1::uuid[], $2::bigint[], $3::text[]) AS x (s, q, t)"
        " WHERE f.stream_id = x.s AND f.seq = x.q",
        [r["stream_id"] for r in rows],
        [r["seq"] for r in rows],
        tokens,
        key.kid,
    )
    log.info(
        "pending SETs of an erased subject made notices", subject=str(subject_id), sets=len(rows)
    )
    return len(rows)
