"""The HTTP skeleton end to end: auth, SCIM errors, discovery, probes, access log."""

from __future__ import annotations

import io
import json
import uuid
from contextlib import redirect_stderr
from typing import Any

import structlog
from aiohttp.test_utils import TestClient

from infra import logging as logsetup
from infra.database import Database
from infra.tenants import IssuedToken, digest

SCIM = "application/scim+json"
Client = TestClient[Any, Any]


async def test_missing_or_wrong_token_is_401_with_scim_error(
    client: Client, tenant: IssuedToken
) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": f"Basic {tenant.token}"},
        {"Authorization": "Bearer "},
    ):
        r = await client.get("/scim/v2/ServiceProviderConfig", headers=headers)
        assert r.status == 401
        assert r.headers["Content-Type"].startswith(SCIM)
        body = await r.json(content_type=None)
        assert body == {
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
            "status": "401",
            "detail": "A valid bearer token is required",
        }


async def test_token_is_stored_only_as_a_hash(database: Database, tenant: IssuedToken) -> None:
    assert len(tenant.token) >= 43  # 32 random bytes, base64url
    rows = await database.pool.fetch("SELECT * FROM tokens")
    assert len(rows) == 1
    assert bytes(rows[0]["token_hash"]) == digest(tenant.token)
    assert tenant.token.encode() not in b"".join(
        str(v).encode() for row in rows for v in row.values()
    )


async def test_service_provider_config(client: Client, auth: dict[str, str]) -> None:
    r = await client.get("/scim/v2/ServiceProviderConfig?aadOptscim062020", headers=auth)
    assert r.status == 200
    assert r.headers["Content-Type"].startswith(SCIM)
    body = await r.json(content_type=None)
    assert body["schemas"] == ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"]
    assert body["bulk"]["supported"] is False
    assert body["changePassword"]["supported"] is False
    assert body["authenticationSchemes"][0]["type"] == "oauthbearertoken"
    assert body["meta"]["resourceType"] == "ServiceProviderConfig"


async def test_resource_types_and_schemas_are_lists(client: Client, auth: dict[str, str]) -> None:
    for path in ("/scim/v2/ResourceTypes", "/scim/v2/Schemas"):
        r = await client.get(path, headers=auth)
        assert r.status == 200
        body = await r.json(content_type=None)
        assert body["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:ListResponse"]
        assert body["totalResults"] == len(body["Resources"])
    r = await client.get("/scim/v2/Schemas/urn:nope", headers=auth)
    assert r.status == 404
    assert (await r.json(content_type=None))["status"] == "404"


async def test_unknown_path_is_a_scim_404(client: Client, auth: dict[str, str]) -> None:
    r = await client.get("/scim/v2/Nothing", headers=auth)
    assert r.status == 404
    assert r.headers["Content-Type"].startswith(SCIM)


async def test_probes_need_no_token(client: Client) -> None:
    r = await client.get("/healthz")
    assert r.status == 200 and (await r.json())["status"] == "ok"
    r = await client.get("/readyz")
    assert r.status == 200 and (await r.json())["status"] == "ready"


async def test_readyz_reports_pending_migrations(client: Client, database: Database) -> None:
    await database.pool.execute("DELETE FROM schema_migrations")
    r = await client.get("/readyz")
    assert r.status == 503
    assert (await r.json())["status"] == "migrations pending"


async def test_one_json_access_log_line_per_request_without_the_token(
    client: Client, tenant: IssuedToken, auth: dict[str, str]
) -> None:
    buf = io.StringIO()
    structlog.reset_defaults()
    with redirect_stderr(buf):
        logsetup.configure()
        request_id = "req-" + uuid.uuid4().hex
        r = await client.get(
            "/scim/v2/ServiceProviderConfig", headers={**auth, "X-Request-Id": request_id}
        )
        assert r.headers["X-Request-Id"] == request_id
        await client.get("/scim/v2/ServiceProviderConfig", headers={"Authorization": "Bearer x"})
    structlog.reset_defaults()
    logged = [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]
    # Other components (projection runners) log too; the access log is the "request" lines.
    lines = [line for line in logged if line["event"] == "request"]
    assert len(lines) == 2
    first, second = lines
    assert first["event"] == "request"
    assert {k: first[k] for k in ("method", "path", "status", "tenant", "request_id")} == {
        "method": "GET",
        "path": "/scim/v2/ServiceProviderConfig",
        "status": 200,
        "tenant": "acme",
        "request_id": request_id,
    }
    assert isinstance(first["duration_ms"], float)
    assert second["status"] == 401 and second["tenant"] is None
    assert tenant.token not in buf.getvalue()
