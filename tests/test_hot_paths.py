"""The shortcuts of the request hot paths give what the long ways give.

- `attr eq "value"` filters skip the parser: same SQL, same parameters, same errors.
- A user write is one statement (events and view row): all or nothing, and a stream clash is
  still a ConcurrencyError.
- A list page carries each user's groups from its own query, as GET /Users/{id} does.
- GET /Users/{id} reads the user and its groups in one statement.
"""

from __future__ import annotations

import gc
import uuid
import weakref
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from domain.user import User
from infra import database as database_module
from infra.config import Settings
from infra.database import Database
from infra.eventstore import ConcurrencyError
from service.app import create_app
from service.errors import ScimError
from service.scim.filter import (
    GROUP_ATTRIBUTES,
    USER_ATTRIBUTES,
    AttributeMap,
    FilterCompiler,
    SqlParams,
    _simple_eq,
    compile_filter,
)
from service.unit_of_work import UnitOfWork
from tests.conftest import database_on
from tests.test_entra_users import create, entra_user, headers

Client = TestClient[Any, Any]
TENANT = uuid.UUID("00000000-0000-0000-0000-00000000fa57")

FILTERS = [
    'userName eq "Alice@Contoso.com"',
    'USERNAME eq "bob"',
    'externalId eq "0a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef"',
    'displayName eq "Sales EMEA"',
    'title eq ""',
    'employeeNumber eq "1001"',
    'userName eq "with space and ünïcødé"',
    # not the fast path's shape: the parser's way
    'userName eq "a\\"b"',
    'userName  eq "x"',
    'userName EQ "x"',
    'userName eq "x" and active eq true',
    'name.givenName eq "x"',
    'urn:ietf:params:scim:schemas:core:2.0:User:userName eq "x"',
    # the fast path's shape on attributes that are not strings: the parser's way
    'active eq "true"',
    'id eq "not-a-uuid"',
    'emails eq "a@b"',
    'manager eq "x"',
]


def _parsed(attribute_map: AttributeMap, expression: str) -> tuple[str, list[Any]]:
    params = SqlParams(["tenant"])
    return FilterCompiler(attribute_map, params).compile(expression), params.values


@pytest.mark.parametrize("expression", FILTERS)
@pytest.mark.parametrize("attribute_map", [USER_ATTRIBUTES, GROUP_ATTRIBUTES])
def test_filters_compile_as_the_parser_compiles_them(
    attribute_map: AttributeMap, expression: str
) -> None:
    try:
        expected: tuple[str, list[Any]] | str = _parsed(attribute_map, expression)
    except Exception as e:  # the parser's refusal, as compile_filter words it
        expected = str(e)
    params = SqlParams(["tenant"])
    try:
        got: tuple[str, list[Any]] | str = (
            compile_filter(attribute_map, expression, params),
            params.values,
        )
    except ScimError as e:
        assert e.status == 400 and e.scim_type == "invalidFilter"
        got = e.detail.removeprefix("invalid filter: ")
    assert got == expected


def test_the_fast_path_takes_the_lookups_entra_sends() -> None:
    for expression in FILTERS[:7]:
        assert _simple_eq(USER_ATTRIBUTES, expression, SqlParams()) is not None, expression
    for expression in FILTERS[7:]:
        assert _simple_eq(USER_ATTRIBUTES, expression, SqlParams()) is None, expression
    assert _simple_eq(GROUP_ATTRIBUTES, 'displayName eq "Sales"', SqlParams()) is not None


def test_unknown_attributes_and_bad_values_keep_their_errors() -> None:
    with pytest.raises(ScimError) as unknown:
        compile_filter(USER_ATTRIBUTES, 'noSuchThing eq "x"', SqlParams())
    assert unknown.value.detail == "unknown attribute in filter: noSuchThing"
    with pytest.raises(ScimError) as surrogate:
        compile_filter(USER_ATTRIBUTES, 'userName eq "\udc80"', SqlParams())
    assert surrogate.value.scim_type == "invalidFilter"
    too_long = 'userName eq "' + "x" * 5000 + '"'
    with pytest.raises(ScimError) as long_one:
        compile_filter(USER_ATTRIBUTES, too_long, SqlParams())
    assert "longer than" in long_one.value.detail


async def _counts(database: Database) -> tuple[int, int]:
    events = await database.pool.fetchval("SELECT count(*) FROM stored_events")
    users = await database.pool.fetchval("SELECT count(*) FROM scim_users")
    return int(events), int(users)


async def test_a_user_write_is_all_or_nothing_in_one_statement(database: Database) -> None:
    first = User.provision(uuid.uuid4(), TENANT, {"userName": "taken@x"})
    async with UnitOfWork(database, TENANT, "r1") as uow:
        uow.add_user(first)
        await uow.flush()
    before = await _counts(database)
    assert before == (1, 1)
    # The view's unique index refuses the second userName: no event is left behind.
    clash = User.provision(uuid.uuid4(), TENANT, {"userName": "TAKEN@x"})
    with pytest.raises(asyncpg.UniqueViolationError):
        async with UnitOfWork(database, TENANT, "r2") as uow:
            uow.add_user(clash)
            await uow.flush()
    assert await _counts(database) == before
    # Two writers of one stream at one version: the loser gets ConcurrencyError, and its view
    # row is not written either.
    async with UnitOfWork(database, TENANT, "r3") as uow:
        loaded = await uow.user(first.id)
        assert loaded is not None
        loaded.update({**loaded.state, "displayName": "One"})
        async with UnitOfWork(database, TENANT, "r4") as other:
            rival = await other.user(first.id)
            assert rival is not None
            rival.update({**rival.state, "displayName": "Two"})
            await other.flush()
        with pytest.raises(ConcurrencyError):
            await uow.flush()
    name = await database.pool.fetchval(
        "SELECT display_name FROM scim_users WHERE id = $1", first.id
    )
    assert name == "Two"
    assert await _counts(database) == (2, 1)


async def test_a_user_write_is_freed_without_the_cyclic_collector(database: Database) -> None:
    """A user's write holds no reference cycle: its unit of work (the aggregate, the events as
    recorded, the request's record) is freed as it ends, not left for the collector's pauses."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        async with UnitOfWork(database, TENANT, "freed") as uow:
            uow.add_user(User.provision(uuid.uuid4(), TENANT, {"userName": "freed@x"}))
            await uow.flush()
        gone = weakref.ref(uow)
        del uow
        assert gone() is None
    finally:
        if collecting:
            gc.enable()


async def test_listed_users_carry_their_groups_as_a_get_by_id_does(
    client: Client, auth: dict[str, str]
) -> None:
    a = await create(client, auth, user_name="a@contoso.com")
    b = await create(client, auth, user_name="b@contoso.com")
    c = await create(client, auth, user_name="c@contoso.com")
    for name, members in (("beta", [a, b]), ("Alpha", [a]), ("gamma", [a])):
        body = {
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
            "displayName": name,
            "members": [{"value": m["id"]} for m in members],
        }
        r = await client.post("/scim/v2/Groups", json=body, headers=headers(auth))
        assert r.status == 201, await r.text()
    r = await client.get("/scim/v2/Users?sortBy=userName&count=3", headers=auth)
    listed = (await r.json(content_type=None))["Resources"]
    assert [u["userName"] for u in listed] == ["a@contoso.com", "b@contoso.com", "c@contoso.com"]
    assert [g["display"] for g in listed[0]["groups"]] == ["Alpha", "beta", "gamma"]
    assert [g["display"] for g in listed[1]["groups"]] == ["beta"]
    assert "groups" not in listed[2]
    for user in listed:
        r = await client.get(f"/scim/v2/Users/{user['id']}", headers=auth)
        assert user == await r.json(content_type=None)
    # A page that skips rows, a cursor page, a filter, and groups left out.
    r = await client.get("/scim/v2/Users?sortBy=userName&startIndex=2&count=1", headers=auth)
    page = await r.json(content_type=None)
    assert page["totalResults"] == 3 and page["Resources"] == [listed[1]]
    r = await client.get("/scim/v2/Users?cursor=&count=3", headers=auth)
    assert sorted(u["id"] for u in (await r.json(content_type=None))["Resources"]) == sorted(
        u["id"] for u in listed
    )
    r = await client.get('/scim/v2/Users?filter=userName eq "A@CONTOSO.COM"', headers=auth)
    assert (await r.json(content_type=None))["Resources"] == [listed[0]]
    r = await client.get(
        '/scim/v2/Users?filter=userName eq "a@contoso.com"&excludedAttributes=groups',
        headers=auth,
    )
    assert "groups" not in (await r.json(content_type=None))["Resources"][0]
    assert c["id"] == listed[2]["id"]
    assert entra_user()["userName"] not in {u["userName"] for u in listed}


async def test_a_user_and_its_groups_are_read_in_one_statement(
    settings: Settings, fresh_dsn: str, auth: dict[str, str]
) -> None:
    """On a busy server each round trip waits for the backend and then the front to be
    scheduled again: GET /Users/{id} makes one besides the token check, groups included."""
    statements: list[str] = []

    async def record(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda q: statements.append(q.query))

    database_module.on_connect(record)
    try:
        async with database_on(fresh_dsn) as db:
            app = create_app(settings, db)
            async with TestClient(TestServer(app, host="127.0.0.1")) as client:
                user = await create(client, auth, user_name="a@contoso.com")
                group = {"displayName": "Sales", "members": [{"value": user["id"]}]}
                r = await client.post("/scim/v2/Groups", json=group, headers=headers(auth))
                assert r.status == 201, await r.text()
                for query, groups in (("", ["Sales"]), ("?excludedAttributes=groups", None)):
                    statements.clear()
                    r = await client.get(f"/scim/v2/Users/{user['id']}{query}", headers=auth)
                    got = await r.json(content_type=None)
                    assert r.status == 200 and got["userName"] == "a@contoso.com"
                    shown = [g["display"] for g in got["groups"]] if "groups" in got else None
                    assert shown == groups
                    reads = [s for s in statements if "scim_users" in s or "scim_group" in s]
                    assert len(reads) == 1, reads
    finally:
        database_module._connection_hooks.remove(record)
