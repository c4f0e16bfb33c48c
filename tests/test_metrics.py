"""GET /metrics: Prometheus text, counters by route template and status, nothing per-user."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from domain.user import User
from infra.config import Settings
from infra.database import Database
from infra.eventstore import ConcurrencyError
from infra.tenants import IssuedToken
from service.app import create_app
from service.unit_of_work import UnitOfWork
from tests.test_entra_users import create as create_user
from tests.test_entra_users import headers, patch

Client = TestClient[Any, Any]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: Client) -> tuple[str, Samples]:
    r = await client.get("/metrics")  # no token: the page is public by design
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    text = await r.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_counters_move_with_route_templates_and_no_ids(
    client: Client, auth: dict[str, str], tenant: IssuedToken
) -> None:
    _, before = await scrape(client)
    user = await create_user(client, auth, user_name="metrics.person@contoso.com")
    r = await client.get(f"/scim/v2/Users/{user['id']}", headers=auth)
    assert r.status == 200
    missing = uuid.uuid4()
    r = await client.get(f"/scim/v2/Users/{missing}", headers=auth)
    assert r.status == 404
    r = await client.get("/scim/v2/Nothing/here", headers=auth)
    assert r.status == 404
    r = await client.get("/scim/v2/Users", headers={"Authorization": "Bearer not-a-token"})
    assert r.status == 401
    r = await client.patch(
        f"/scim/v2/Users/{user['id']}",
        headers={**headers(auth), "If-Match": 'W/"999"'},
        json={
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "replace", "path": "title", "value": "x"}],
        },
    )
    assert r.status == 412

    text, after = await scrape(client)
    total = "scimledger_http_requests_total"
    assert moved(before, after, total, method="POST", route="/scim/v2/Users", status="201") == 1
    assert moved(before, after, total, method="GET", route="/scim/v2/Users/{id}", status="200") == 1
    assert moved(before, after, total, method="GET", route="/scim/v2/Users/{id}", status="404") == 1
    assert moved(before, after, total, method="GET", route="unmatched", status="404") == 1
    assert moved(before, after, total, method="GET", route="/scim/v2/Users", status="401") == 1
    assert (
        moved(before, after, total, method="PATCH", route="/scim/v2/Users/{id}", status="412") == 1
    )
    hist = "scimledger_http_request_duration_seconds_count"
    assert moved(before, after, hist, method="POST", route="/scim/v2/Users") == 1
    # The POST appended one transaction: the user's event and the request's record.
    assert moved(before, after, "scimledger_appends_total") >= 1
    assert moved(before, after, "scimledger_events_appended_total") >= 2
    assert moved(before, after, "scimledger_append_duration_seconds_count") >= 1
    assert value(after, "scimledger_db_pool_max_connections") == 20
    assert value(after, "scimledger_db_pool_connections") >= 1
    in_use = value(after, "scimledger_db_pool_connections_in_use")
    assert 0 <= in_use <= value(after, "scimledger_db_pool_connections")
    for projection in ("activity", "audit"):
        assert (
            "scimledger_projection_lag_events",
            frozenset({("projection", projection)}),
        ) in after
    # Nothing per-user, per-tenant or secret anywhere on the page.
    for secret in (user["id"], str(missing), "metrics.person", tenant.token, "acme", "not-a-token"):
        assert secret not in text


async def test_a_lost_race_counts_a_conflict_and_a_retry_and_loses_no_update(
    client: Client, auth: dict[str, str], database: Database, monkeypatch: Any
) -> None:
    """Another writer appends to the user's stream between this request's load and its append."""
    user = await create_user(client, auth)
    user_id = uuid.UUID(user["id"])
    flush = UnitOfWork.flush
    raced = False
    rivals = iter(("Set by the rival", "Rival again"))

    async def flush_after_a_rival(self: UnitOfWork) -> Any:
        nonlocal raced
        if not raced:
            raced = True
            rival = await database.store.load(database.pool, user_id)
            assert isinstance(rival, User)
            rival.update({**rival.state, "displayName": next(rivals)})
            await database.store.append_now(rival.tenant_id, rival.collect_events())
        return await flush(self)

    monkeypatch.setattr(UnitOfWork, "flush", flush_after_a_rival)
    _, before = await scrape(client)
    body = await patch(
        client, auth, user["id"], {"op": "replace", "path": "title", "value": "Boss"}
    )
    _, after = await scrape(client)
    assert raced
    assert body["title"] == "Boss" and body["displayName"] == "Set by the rival"
    assert moved(before, after, "scimledger_version_conflicts_total", kind="version") == 1
    assert moved(before, after, "scimledger_write_retries_total") == 1

    # With If-Match the client's view is stale after the race: 412, no retry.
    raced = False
    r = await client.patch(
        f"/scim/v2/Users/{user['id']}",
        headers={**headers(auth), "If-Match": body["meta"]["version"]},
        json={
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "replace", "path": "title", "value": "Intern"}],
        },
    )
    assert r.status == 412 and raced
    _, last = await scrape(client)
    assert moved(after, last, "scimledger_write_conflict_answers_total", status="412") == 1
    assert moved(after, last, "scimledger_write_retries_total") == 0


async def test_a_stale_append_counts_a_version_conflict(client: Client, database: Database) -> None:
    tenant_id = uuid.uuid4()
    user = User.provision(uuid.uuid4(), tenant_id, {"userName": "twice@x"})
    events = user.collect_events()
    _, before = await scrape(client)
    await database.store.append_now(tenant_id, events)
    try:
        await database.store.append_now(tenant_id, events)
        raise AssertionError("a second append at the same version must fail")
    except ConcurrencyError:
        pass
    _, after = await scrape(client)
    assert moved(before, after, "scimledger_version_conflicts_total", kind="version") == 1
    assert moved(before, after, "scimledger_appends_total") == 1


async def test_metrics_can_be_turned_off(settings: Settings, database: Database) -> None:
    from dataclasses import replace

    app = create_app(replace(settings, metrics=False, run_projections=False), database)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        r = await c.get("/metrics")
        assert r.status == 404
