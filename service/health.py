"""Liveness and readiness probes."""

from __future__ import annotations

import orjson
from aiohttp import web

from infra.migrations import pending
from service.state import DATABASE, SUPERVISOR


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    supervisor = request.app.get(SUPERVISOR)
    if supervisor is not None and not supervisor.healthy:
        # Restarting the whole service is the remedy left: say so to the orchestrator.
        body = {"status": "unhealthy", "error": "the embedded PostgreSQL cannot be restarted"}
        return _json(body, status=503)
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    try:
        async with request.app[DATABASE].pool.acquire(timeout=5) as conn:
            missing = await pending(conn)
    except Exception as e:  # any failure to reach the database means "not ready"
        return _json({"status": "unavailable", "error": type(e).__name__}, status=503)
    if missing:
        return _json({"status": "migrations pending", "pending": missing}, status=503)
    return _json({"status": "ready"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
