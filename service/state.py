"""Typed keys for what the application and each request own."""

from __future__ import annotations

from aiohttp import web

from infra.config import Settings
from infra.database import Database
from infra.tenants import Principal

SETTINGS = web.AppKey("settings", Settings)
DATABASE = web.AppKey("database", Database)

REQUEST_ID = web.RequestKey("request_id", str)
PRINCIPAL = web.RequestKey("principal", Principal)


def principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]
