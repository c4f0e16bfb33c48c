"""SCIM filters compiled to SQL, run against the users view of a real PostgreSQL."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from asyncpg.pool import PoolConnectionProxy

from infra.database import Database, create_pool
from service.errors import ScimError
from service.scim.filter import (
    MAX_FILTER_DEPTH,
    MAX_FILTER_LENGTH,
    SqlParams,
    user_filter_sql,
    user_sort_sql,
)
from tests.conftest import TEMPLATE, with_database

TENANT = uuid.UUID("00000000-0000-0000-0000-00000000f117")
OTHER_TENANT = uuid.UUID("00000000-0000-0000-0000-00000000beef")
ENT = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"

ALICE = uuid.UUID("a11ce000-0000-4000-8000-000000000001")
BOB = uuid.UUID("b0b00000-0000-4000-8000-000000000002")
CAROL = uuid.UUID("ca401000-0000-4000-8000-000000000003")
DAVE = uuid.UUID("da4e0000-0000-4000-8000-000000000004")
NAMES = {ALICE: "alice", BOB: "bob", CAROL: "carol", DAVE: "dave"}
EVERYONE = {"alice", "bob", "carol", "dave"}

INSERT = """
INSERT INTO scim_users (tenant_id, id, user_name, external_id, active, display_name, manager_id,
                        resource, version, created, last_modified)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1, $9, $10)
"""


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@dataclass
class Row:
    id: uuid.UUID
    user_name: str
    external_id: str | None
    active: bool
    display_name: str | None
    manager: uuid.UUID | None
    extra: dict[str, Any]
    created: datetime
    last_modified: datetime

    def resource(self) -> dict[str, Any]:
        resource: dict[str, Any] = {"userName": self.user_name, "active": self.active}
        if self.external_id is not None:
            resource["externalId"] = self.external_id
        if self.display_name is not None:
            resource["displayName"] = self.display_name
        if self.manager is not None:
            resource["manager"] = str(self.manager)
        resource.update(self.extra)
        return dict(sorted(resource.items()))

    async def insert(self, conn: PoolConnectionProxy[Any], tenant: uuid.UUID) -> None:
        await conn.execute(
            INSERT,
            tenant,
            self.id,
            self.user_name,
            self.external_id,
            self.active,
            self.display_name,
            self.manager,
            self.resource(),
            self.created,
            self.last_modified,
        )


ROWS = [
    Row(
        ALICE,
        "Alice@Contoso.com",
        "ext-A",
        True,
        "Alice Smith",
        None,
        {
            "name": {"familyName": "Smith", "formatted": "Alice Smith", "givenName": "Alice"},
            "emails": [
                {"primary": True, "type": "work", "value": "Alice@Contoso.com"},
                {"type": "home", "value": "alice@home.example"},
            ],
            "title": "Engineer",
            "enterprise": {"department": "R&D", "employeeNumber": "1001"},
        },
        at("2024-01-01T00:00:00"),
        at("2024-06-01T12:00:00"),
    ),
    Row(
        BOB,
        "bob@contoso.com",
        "EXT-B",
        False,
        "Bob Jones",
        ALICE,
        {
            "name": {"familyName": "Jones", "givenName": "Bob"},
            "emails": [{"type": "home", "value": "Bob@Contoso.com"}],
            "enterprise": {"employeeNumber": "1002"},
        },
        at("2024-02-01T00:00:00"),
        at("2024-02-02T00:00:00"),
    ),
    Row(
        CAROL,
        "carol_100%@contoso.com",
        None,
        True,
        None,
        ALICE,
        {
            "emails": [{"primary": False, "type": "work", "value": "carol@other.example"}],
            "phoneNumbers": [{"type": "mobile", "value": "+1 555 0100"}],
            "nickName": "Caz",
        },
        at("2024-03-01T00:00:00"),
        at("2024-03-01T00:00:00"),
    ),
    Row(
        DAVE,
        "dave\\x@contoso.com",
        "ext-d",
        True,
        "Dave",
        None,
        {"title": "engineer", "enterprise": {"department": "Sales"}},
        at("2024-04-01T00:00:00"),
        at("2024-07-01T00:00:00"),
    ),
]

# Same names in another tenant: never visible through TENANT's queries.
OTHER_ROWS = [
    Row(
        uuid.uuid4(),
        "alice@contoso.com",
        "ext-A",
        True,
        "Alice Smith",
        None,
        {"emails": [{"type": "work", "value": "alice@contoso.com"}], "title": "Engineer"},
        at("2024-01-01T00:00:00"),
        at("2024-01-01T00:00:00"),
    ),
]


@pytest.fixture(scope="module")
async def pool(server_dsn: str, template_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """One migrated database for the read-only filter cases of this module."""
    name = "t_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    finally:
        await admin.close()
    pool = await create_pool(with_database(server_dsn, name), min_size=1, max_size=4)
    try:
        async with pool.acquire() as conn:
            for row in ROWS:
                await row.insert(conn, TENANT)
            for row in OTHER_ROWS:
                await row.insert(conn, OTHER_TENANT)
        yield pool
    finally:
        await pool.close()
        admin = await asyncpg.connect(server_dsn)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


async def matching(pool: asyncpg.Pool, expression: str) -> set[str]:
    params = SqlParams([TENANT])
    sql = user_filter_sql(expression, params)
    rows = await pool.fetch(
        f"SELECT id FROM scim_users u WHERE u.tenant_id = $1 AND ({sql})", *params.values
    )
    return {NAMES[row["id"]] for row in rows}


def invalid_filter(expression: str) -> ScimError:
    with pytest.raises(ScimError) as caught:
        user_filter_sql(expression, SqlParams([TENANT]))
    assert caught.value.status == 400
    assert caught.value.scim_type == "invalidFilter"
    return caught.value


CASES: list[tuple[str, set[str]]] = [
    # Entra's lookups
    ('userName eq "alice@contoso.com"', {"alice"}),
    ('userName eq "7f3a0c1e-9a55-4b7e-8a3e-0d5c7c1c2f10"', set()),
    ('externalId eq "ext-A"', {"alice"}),
    ('emails[type eq "work"].value eq "alice@contoso.com"', {"alice"}),
    ('displayName eq "Alice Smith"', {"alice"}),
    (f'{ENT}:employeeNumber eq "1001"', {"alice"}),
    ('userName eq "alice@contoso.com" and externalId eq "ext-A"', {"alice"}),
    # userName: caseExact=false, every operator
    ('userName eq "ALICE@CONTOSO.COM"', {"alice"}),
    ('USERNAME EQ "Alice@Contoso.com"', {"alice"}),
    ('urn:ietf:params:scim:schemas:core:2.0:User:userName eq "BOB@contoso.com"', {"bob"}),
    ('userName eq "nobody"', set()),
    ('userName ne "alice@contoso.com"', {"bob", "carol", "dave"}),
    ('userName co "CONTOSO"', EVERYONE),
    ('userName sw "CAROL_"', {"carol"}),
    ('userName ew "@Contoso.COM"', EVERYONE),
    ('userName gt "c"', {"carol", "dave"}),
    ('userName ge "bob@contoso.com"', {"bob", "carol", "dave"}),
    ('userName lt "b"', {"alice"}),
    ('userName le "BOB@contoso.com"', {"alice", "bob"}),
    ("userName pr", EVERYONE),
    # LIKE metacharacters are literal
    ('userName sw "carol%"', set()),
    ('userName co "%"', {"carol"}),
    ('userName co "_"', {"carol"}),
    ('userName co "l_1"', {"carol"}),
    ('userName co "\\\\"', {"dave"}),
    ('userName co "\\\\x"', {"dave"}),
    ('userName eq "x\') OR 1=1 --"', set()),
    # externalId and id: caseExact=true
    ('externalId eq "EXT-A"', set()),
    ('ExternalID eq "ext-A"', {"alice"}),
    ('externalId eq "EXT-B"', {"bob"}),
    ('externalId ne "ext-A"', {"bob", "carol", "dave"}),
    ('externalId sw "ext-"', {"alice", "dave"}),
    ("externalId pr", {"alice", "bob", "dave"}),
    ("not (externalId pr)", {"carol"}),
    (f'id eq "{ALICE}"', {"alice"}),
    (f'ID eq "{str(ALICE).upper()}"', {"alice"}),
    ('id eq "not-a-uuid"', set()),
    ('id ne "not-a-uuid"', EVERYONE),
    (f'id ne "{ALICE}"', {"bob", "carol", "dave"}),
    ('id sw "A11CE"', {"alice"}),
    ("id pr", EVERYONE),
    # displayName, active
    ('displayName eq "alice smith"', {"alice"}),
    ("displayName pr", {"alice", "bob", "dave"}),
    ('displayName ne "Dave"', {"alice", "bob", "carol"}),
    ("active eq true", {"alice", "carol", "dave"}),
    ("active eq false", {"bob"}),
    ('active eq "False"', {"bob"}),
    ('active eq "True"', {"alice", "carol", "dave"}),
    ("active ne true", {"bob"}),
    ("active pr", EVERYONE),
    # name.* (caseExact=false), complex attribute presence
    ('name.givenName eq "ALICE"', {"alice"}),
    ('Name.GivenName co "O"', {"bob"}),
    ('name.familyName sw "j"', {"bob"}),
    ("name pr", {"alice", "bob"}),
    ("name.formatted pr", {"alice"}),
    ('name[givenName eq "bob"]', {"bob"}),
    # absent attributes: ne and not are true, comparisons false
    ('title eq "ENGINEER"', {"alice", "dave"}),
    ('title ne "engineer"', {"bob", "carol"}),
    ('not (title eq "engineer")', {"bob", "carol"}),
    ('title gt "a"', {"alice", "dave"}),
    ('not (title gt "a")', {"bob", "carol"}),
    ("title pr", {"alice", "dave"}),
    ("title eq null", {"bob", "carol"}),
    ("title ne null", {"alice", "dave"}),
    ('nickName eq "caz"', {"carol"}),
    # emails and other multi-valued attributes
    ('emails[type eq "work"].value eq "bob@contoso.com"', set()),
    ('emails[type eq "home"].value eq "bob@contoso.com"', {"bob"}),
    ('Emails[Type eq "WORK"].Value eq "ALICE@contoso.com"', {"alice"}),
    ('EMAILS[TYPE EQ "work"].VALUE EQ "alice@contoso.com"', {"alice"}),
    ('emails[type eq "work" and value eq "alice@contoso.com"]', {"alice"}),
    ('emails[value eq "carol@other.example"]', {"carol"}),
    ('emails.value eq "bob@contoso.com"', {"bob"}),
    ('emails eq "BOB@contoso.com"', {"bob"}),
    ('emails.value ne "bob@contoso.com"', {"alice", "carol", "dave"}),
    ('emails.type eq "home"', {"alice", "bob"}),
    ('emails.value co "@contoso"', {"alice", "bob"}),
    ('emails.value ew ".EXAMPLE"', {"alice", "carol"}),
    ('emails[type eq "work" and primary eq true]', {"alice"}),
    ('emails[type eq "work" and primary eq false]', {"carol"}),
    ('emails[primary eq "True"]', {"alice"}),
    ('emails[type eq "work" or type eq "mobile"]', {"alice", "carol"}),
    ('emails[not (type eq "work")]', {"alice", "bob"}),
    ('emails[type eq "work" and value ew "example"]', {"carol"}),
    ('emails[type eq "work"].value pr', {"alice", "carol"}),
    ('emails[value eq "alice@contoso.com" and display pr]', set()),
    ('emails[type eq "work" and value eq "alice@contoso.com" and primary eq true]', {"alice"}),
    ("emails pr", {"alice", "bob", "carol"}),
    ("not (emails pr)", {"dave"}),
    ("emails.value pr", {"alice", "bob", "carol"}),
    ('phoneNumbers[type eq "mobile"]', {"carol"}),
    ('phoneNumbers.value sw "+1"', {"carol"}),
    ("addresses pr", set()),
    # enterprise extension, with and without its URN, any case
    (f'{ENT.upper()}:EMPLOYEENUMBER eq "1002"', {"bob"}),
    ("employeeNumber eq 1001", {"alice"}),
    (f'{ENT}:department eq "r&d"', {"alice"}),
    (f"{ENT}:department pr", {"alice", "dave"}),
    ('department ne "Sales"', {"alice", "bob", "carol"}),
    (f'{ENT}:manager.value eq "{ALICE}"', {"bob", "carol"}),
    (f'{ENT}:manager eq "{ALICE}"', {"bob", "carol"}),
    (f'manager.value eq "{ALICE}"', {"bob", "carol"}),
    (f'{ENT}:manager[value eq "{ALICE}"]', {"bob", "carol"}),
    (f"{ENT}:manager pr", {"bob", "carol"}),
    (f"not ({ENT}:manager pr)", {"alice", "dave"}),
    (f'{ENT}:manager.value eq "bogus"', set()),
    (f'manager.value ne "{ALICE}"', {"alice", "dave"}),
    # meta dates (timestamptz; ISO 8601 with Z or an offset)
    ('meta.created gt "2024-02-01T00:00:00Z"', {"carol", "dave"}),
    ('meta.created ge "2024-02-01T00:00:00Z"', {"bob", "carol", "dave"}),
    ('meta.created eq "2024-02-01T00:00:00Z"', {"bob"}),
    ('meta.created ne "2024-01-01T00:00:00Z"', {"bob", "carol", "dave"}),
    ('meta.lastModified lt "2024-03-01T00:00:00+00:00"', {"bob"}),
    ('meta.lastModified le "2024-03-01T00:00:00.000Z"', {"bob", "carol"}),
    ('meta.lastModified gt "2024-06-01T14:00:00+02:00"', {"dave"}),
    ('META.CREATED lt "2024-01-02"', {"alice"}),
    ("meta.created pr", EVERYONE),
    ('meta.resourceType eq "User"', EVERYONE),
    ("meta pr", EVERYONE),
    # and / or / not / parentheses
    ('userName sw "a" or userName sw "b"', {"alice", "bob"}),
    ("active eq true and title pr", {"alice", "dave"}),
    ('active eq true and (title eq "engineer" or userName sw "carol")', {"alice", "carol", "dave"}),
    ('active eq true and title eq "engineer" or userName sw "bob"', {"alice", "bob", "dave"}),
    ('userName sw "bob" or active eq true and title eq "engineer"', {"alice", "bob", "dave"}),
    ('(userName sw "bob" or active eq true) and title eq "engineer"', {"alice", "dave"}),
    ("not (active eq true and title pr)", {"bob", "carol"}),
    ('not(userName sw "a")', {"bob", "carol", "dave"}),
    ('not (not (userName sw "a"))', {"alice"}),
    ('((userName eq "alice@contoso.com"))', {"alice"}),
    ('emails[type eq "work"] and not (emails[type eq "home"])', {"carol"}),
    # limits: exactly at them is fine
    ("(" * MAX_FILTER_DEPTH + "userName pr" + ")" * MAX_FILTER_DEPTH, EVERYONE),
    ("not (" * MAX_FILTER_DEPTH + "userName pr" + ")" * MAX_FILTER_DEPTH, EVERYONE),
    ('userName eq "' + "a" * (MAX_FILTER_LENGTH - 14) + '"', set()),
]


@pytest.mark.parametrize(("expression", "expected"), CASES, ids=[c[0][:80] for c in CASES])
async def test_filter_matches(pool: asyncpg.Pool, expression: str, expected: set[str]) -> None:
    assert await matching(pool, expression) == expected


INVALID = [
    "",
    "userName eq",
    "userName eq 'x'",
    'userName xx "a"',
    'userName eq "x" and',
    'userName eq "x" junk',
    "()",
    'userName eq "x"))',
    'foo eq "x"',
    'name.foo eq "x"',
    'groups eq "x"',
    f'{ENT}:userName eq "x"',
    'urn:example:custom:2.0:User:badges[type eq "x"]',
    'urn:ietf:params:scim:schemas:core:2.0:Group:displayName eq "x"',
    'emails[foo eq "x"]',
    'emails.foo eq "x"',
    'emails[type.value eq "x"]',
    f'{ENT}:manager.displayName eq "x"',
    'name eq "x"',
    'meta eq "x"',
    'addresses eq "x"',
    'userName[value eq "x"]',
    "active gt true",
    "active lt false",
    'active co "t"',
    'active eq "yes"',
    "active eq 1",
    "emails[primary gt true]",
    'meta.created gt "yesterday"',
    'meta.created eq "2024-13-01T00:00:00Z"',
    'meta.created co "2024"',
    'meta.created gt "0001-01-01T00:00:00+05:00"',
    'meta.created lt "9999-12-31T23:00:00-05:00"',
    "meta.created eq 5",
    "userName eq true",
    "title gt null",
    'userName eq "a\\u0000b"',
    'userName eq "\\ud800"',
    "userName eq 1e999",
    'userName eq "unterminated',
    'emails[type eq "work"][value eq "x"]',
]


@pytest.mark.parametrize("expression", INVALID)
def test_invalid_filter_is_400(expression: str) -> None:
    invalid_filter(expression)


def test_too_long_filter() -> None:
    expression = 'userName eq "' + "a" * (MAX_FILTER_LENGTH - 13) + '"'
    assert len(expression) == MAX_FILTER_LENGTH + 1
    error = invalid_filter(expression)
    assert str(MAX_FILTER_LENGTH) in error.detail


@pytest.mark.parametrize(
    "expression",
    [
        "(" * (MAX_FILTER_DEPTH + 1) + "userName pr" + ")" * (MAX_FILTER_DEPTH + 1),
        "not (" * (MAX_FILTER_DEPTH + 1) + "userName pr" + ")" * (MAX_FILTER_DEPTH + 1),
        "(" * 2000 + "userName pr" + ")" * 2000,
        'emails[type eq "(((((((((((((((((((((((((((((((((((((((("]',
    ],
    ids=["parens", "not", "many-parens", "parens-in-string"],
)
def test_too_deep_filter(expression: str) -> None:
    if "emails" in expression:  # parentheses inside a string literal do not nest
        user_filter_sql(expression, SqlParams())
        return
    error = invalid_filter(expression)
    assert str(MAX_FILTER_DEPTH) in error.detail


def test_params_continue_after_existing_ones() -> None:
    params = SqlParams([TENANT])
    sql = user_filter_sql('userName eq "x" and externalId eq "y"', params)
    assert sql == "(lower(u.user_name) = lower($2) AND u.external_id = $3)"
    assert params.values == [TENANT, "x", "y"]
    assert params.add(5) == "$4"


def test_failed_filter_adds_no_params() -> None:
    params = SqlParams([TENANT])
    with pytest.raises(ScimError):
        user_filter_sql('userName eq "x" and nosuch eq "y"', params)
    assert params.values == [TENANT]


def test_index_friendly_forms() -> None:
    params = SqlParams([TENANT])
    assert user_filter_sql('userName eq "X"', params) == "lower(u.user_name) = lower($2)"
    assert user_filter_sql('externalId eq "X"', params) == "u.external_id = $3"
    assert user_filter_sql(f'id eq "{ALICE}"', params) == "u.id = $4::uuid"
    assert user_filter_sql('id eq "x"', params) == "FALSE"
    work = user_filter_sql('emails[type eq "Work"].value eq "A@B.example"', params)
    assert work == "scim_email_keys(u.resource) @> ARRAY[lower($5)]::text[]"
    any_email = user_filter_sql('emails.value eq "A@B.example"', params)
    assert any_email == "scim_email_keys(u.resource) @> ARRAY[lower($6)]::text[]"
    assert params.values[1:] == ["X", "X", ALICE, "Work:A@B.example", "*:A@B.example"]


def test_values_never_reach_the_sql() -> None:
    params = SqlParams()
    sql = user_filter_sql('title eq "\'; DROP TABLE scim_users; --" or title co "%_\\\\"', params)
    assert "DROP" not in sql and "%" not in sql
    assert params.values == ["'; DROP TABLE scim_users; --", "%\\%\\_\\\\%"]


SORTS = [
    ("userName", "lower(u.user_name)"),
    ("USERNAME", "lower(u.user_name)"),
    ("externalId", "u.external_id"),
    ("id", "u.id"),
    ("active", "u.active"),
    ("displayName", "lower(u.display_name)"),
    ("name.familyName", "lower(u.resource->'name'->>'familyName')"),
    ("meta.created", "u.created"),
    ("meta.lastModified", "u.last_modified"),
    (f"{ENT}:employeeNumber", "lower(u.resource->'enterprise'->>'employeeNumber')"),
    (f"{ENT}:manager.value", "u.manager_id"),
    ("urn:ietf:params:scim:schemas:core:2.0:User:title", "lower(u.resource->>'title')"),
]


@pytest.mark.parametrize(("sort_by", "sql"), SORTS)
def test_sort_sql(sort_by: str, sql: str) -> None:
    assert user_sort_sql(sort_by) == sql


@pytest.mark.parametrize(
    "sort_by",
    ["", "emails", "emails.value", "name", "meta", "nosuch", "userName desc", "x;drop", "a[b]"],
)
def test_invalid_sort_is_400(sort_by: str) -> None:
    with pytest.raises(ScimError) as caught:
        user_sort_sql(sort_by)
    assert caught.value.status == 400
    assert caught.value.scim_type == "invalidValue"


async def test_sort_orders_rows(pool: asyncpg.Pool) -> None:
    for sort_by, expected in [
        ("userName", ["alice", "bob", "carol", "dave"]),
        ("meta.lastModified", ["bob", "carol", "alice", "dave"]),
    ]:
        rows = await pool.fetch(
            "SELECT id FROM scim_users u WHERE u.tenant_id = $1"
            f" ORDER BY {user_sort_sql(sort_by)}, u.id",
            TENANT,
        )
        assert [NAMES[row["id"]] for row in rows] == expected


# --- the plans ---------------------------------------------------------------------------


def _index_scans(plan: dict[str, Any]) -> set[str]:
    found = set()
    if "Index Name" in plan:
        found.add(plan["Index Name"])
    for child in plan.get("Plans", []):
        found |= _index_scans(child)
    return found


async def _plan(
    conn: PoolConnectionProxy[Any], expression: str, *, generic: bool = False
) -> set[str]:
    params = SqlParams([TENANT])
    sql = user_filter_sql(expression, params)
    query = f"SELECT id FROM scim_users u WHERE u.tenant_id = $1 AND ({sql})"
    assert len(await conn.fetch(query, *params.values)) == 1
    if generic:  # the plan a prepared statement gets once PostgreSQL stops re-planning it
        name = "lookup_" + uuid.uuid4().hex
        await conn.execute(f"PREPARE {name} AS {query}")
        # EXECUTE takes no bind parameters; the test's own values are quoted here.
        literals = ", ".join("'" + str(v).replace("'", "''") + "'" for v in params.values)
        raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE {name}({literals})")
    else:
        raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {query}", *params.values)
    plan = json.loads(raw) if isinstance(raw, str) else raw
    return _index_scans(plan[0]["Plan"])


async def test_lookups_use_the_indexes(database: Database) -> None:
    async with database.pool.acquire() as conn:
        await conn.execute(
            """
            INSERT INTO scim_users (tenant_id, id, user_name, external_id, active, display_name,
                                    resource, version, created, last_modified)
            SELECT CASE WHEN i % 10 = 0 THEN $2::uuid ELSE $1::uuid END, gen_random_uuid(),
                   'User' || i || '@Contoso.com', 'ext-' || i, true, 'User ' || i,
                   jsonb_build_object(
                       'userName', 'User' || i || '@Contoso.com',
                       'emails', jsonb_build_array(
                           jsonb_build_object('primary', true, 'type', 'work',
                                              'value', 'User' || i || '@Contoso.com'),
                           jsonb_build_object('type', 'home',
                                              'value', 'u' || i || '@home.example'))),
                   1, now(), now()
            FROM generate_series(1, 20000) AS i
            """,
            TENANT,
            OTHER_TENANT,
        )
        await conn.execute("ANALYZE scim_users")
        expectations = [
            ('userName eq "user1234@contoso.com"', "scim_users_user_name_uq"),
            ('externalId eq "ext-1234"', "scim_users_external_id_idx"),
            ('emails[type eq "work"].value eq "USER1234@contoso.com"', "scim_users_email_keys_idx"),
            ('emails.value eq "u1234@home.example"', "scim_users_email_keys_idx"),
        ]
        for expression, index in expectations:
            assert index in await _plan(conn, expression), expression
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        for expression, index in expectations:
            assert index in await _plan(conn, expression, generic=True), expression
