"""One real PostgreSQL per test session; a fresh database per test, cloned from a migrated template.

With DATABASE_URL set, that server is used instead of the embedded one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from infra.config import Settings
from infra.database import Database, create_pool
from infra.embedded import EmbeddedPostgres
from infra.eventstore import EventStore
from infra.migrations import migrate
from infra.tenants import IssuedToken, create_tenant
from service.app import create_app

# One master key (infra.keys) for every process of the suite: the app, CLI subprocesses and
# servers on other data directories all read the same events. (test_erasure tests the default.)
os.environ.setdefault("SCIMLEDGER_MASTER_KEY", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")

# Processes a test starts (`.venv/bin/scimledger`) import the code of this checkout, as the
# test itself does, not whichever checkout the virtualenv's editable install names (a git
# worktree sharing one virtualenv would otherwise test another tree's code in subprocesses).
_ROOT = str(Path(__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_ROOT, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != _ROOT]]
)

TEMPLATE = "scimledger_template"
# Feed signing keys are sealed with this (service/feeds/sealing.py), not with a file in ./var.
os.environ.setdefault("SCIMLEDGER_FEED_KEY", "c2NpbWxlZGdlci10ZXN0cy1mZWVkLXNlYWxpbmctayE")


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def server_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("DATABASE_URL")
    if external:
        yield external
        return
    embedded = EmbeddedPostgres(Path(tmp_path_factory.mktemp("pg")), delete_on_exit=True)
    dsn = embedded.start()
    try:
        yield dsn
    finally:
        embedded.stop()


@pytest.fixture(scope="session")
async def template_dsn(server_dsn: str) -> str:
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
        await admin.execute(f"CREATE DATABASE {TEMPLATE}")
    finally:
        await admin.close()
    dsn = with_database(server_dsn, TEMPLATE)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return dsn


@pytest.fixture
async def fresh_dsn(server_dsn: str, template_dsn: str) -> AsyncIterator[str]:
    """A database of its own for one test, migrated, empty."""
    name = "t_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    finally:
        await admin.close()
    yield with_database(server_dsn, name)
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@asynccontextmanager
async def database_on(
    dsn: str, *, min_size: int = 1, max_size: int = 20
) -> AsyncIterator[Database]:
    """A Database on `dsn` with a pool of its own (as `serve` makes one), closed on the way out."""
    pool = await create_pool(dsn, min_size=min_size, max_size=max_size)
    store = EventStore(pool)
    try:
        yield Database(dsn=dsn, pool=pool, store=store, embedded=None)
    finally:
        await store.close()
        await pool.close()


@pytest.fixture
async def database(fresh_dsn: str) -> AsyncIterator[Database]:
    async with database_on(fresh_dsn) as db:
        yield db


@pytest.fixture
def settings(tmp_path: Path, fresh_dsn: str) -> Settings:
    # Load tests drive one token harder than the production rate limit and per-token cap on
    # requests in flight allow; the limits' own tests (test_limits.py, test_streams.py) set them.
    return Settings(
        data_dir=tmp_path, database_url=fresh_dsn, rate_limit=0, max_concurrent_per_token=0
    )


@pytest.fixture
async def client(
    settings: Settings, database: Database
) -> AsyncIterator[TestClient[object, object]]:
    app = create_app(settings, database)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        yield c


@pytest.fixture
async def tenant(database: Database) -> IssuedToken:
    async with database.pool.acquire() as conn:
        return await create_tenant(conn, "acme")


@pytest.fixture
def auth(tenant: IssuedToken) -> dict[str, str]:
    return {"Authorization": f"Bearer {tenant.token}"}
