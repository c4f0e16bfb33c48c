"""Hostile input: no request yields a 500 or a partial write; the parsers answer a result or
a SCIM error, never anything else.

`make test` runs a short derandomized pass (SCIMLEDGER_FUZZ_EXAMPLES, default 200 requests);
`make fuzz` runs the same HTTP fuzz with 10,000+ and prints what it tried and found. One
request in 20 is one of the costliest shapes (tests/fuzz/cost.py); with SCIMLEDGER_FUZZ_MAX_CPU
set (`make fuzz`: 1 s), a request that takes more CPU than that is a failure.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import gc
import json
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from domain.errors import InvalidValue
from domain.user import User
from infra.config import Settings
from infra.database import Database
from infra.tenants import IssuedToken, issue_token
from service.app import create_app
from service.commands import GroupEdit
from service.errors import ScimError
from service.scim.filter import (
    GROUP_ATTRIBUTES,
    USER_ATTRIBUTES,
    AttributeMap,
    SqlParams,
    group_filter_sql,
    group_sort_sql,
    user_filter_sql,
    user_sort_sql,
)
from service.scim.group_patch import fold_operations
from service.scim.groups import _change_from_body
from service.scim.patch import apply_patch, parse_patch_request
from service.scim.representation import user_document, user_from_scim
from service.workers import settle_heap
from tests.fuzz import cost, cpu
from tests.fuzz import strategies as fz
from tests.fuzz.harness import SCIM_TYPES, Harness
from tests.test_projections import rebuild_all, settle

EXAMPLES = int(os.environ.get("SCIMLEDGER_FUZZ_EXAMPLES", "200"))
PARSER_EXAMPLES = int(os.environ.get("SCIMLEDGER_FUZZ_PARSER_EXAMPLES", "100"))
MAX_CPU = (
    float(os.environ["SCIMLEDGER_FUZZ_MAX_CPU"])
    if os.environ.get("SCIMLEDGER_FUZZ_MAX_CPU")
    else None
)

parser_settings = settings(
    max_examples=PARSER_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- the HTTP endpoints ----------------------------------------------------------------------


@pytest.fixture
async def client(settings: Settings, database: Database) -> AsyncIterator[TestClient[Any, Any]]:
    """The app, its requests' CPU measurable on their own (tests/fuzz/cpu.py): the runners in a
    thread of their own, the worker threads' CPU charged to the request that used them."""
    app = create_app(cpu.without_followers(settings), database)
    app.middlewares.insert(0, cpu.meter())
    app.cleanup_ctx.insert(0, cpu.metered_executor_ctx)
    async with cpu.runners_in_a_thread(settings):
        async with TestClient(TestServer(app, host="127.0.0.1")) as c:
            # The collector as `serve` leaves it once set up (service/workers.py settle_heap):
            # what exists now is frozen, so a full collection walks what the requests made,
            # not the whole test process (hypothesis, the other test modules), which a server
            # does not hold. Put back afterwards for the tests that follow.
            thresholds = gc.get_threshold()
            settle_heap()
            try:
                yield c
            finally:
                gc.unfreeze()
                gc.set_threshold(*thresholds)


def _seed_requests() -> list[fz.Request]:
    """A few valid users and groups first, so ids, PATCHes and members have targets."""
    out = []
    for n in range(6):
        body = {"schemas": [fz.USER], "userName": f"seed{n}@contoso.com", "active": True}
        out.append(fz.Request("POST", "/scim/v2/Users", body=fz._dumps(body, True)))
    for n in range(3):
        body = {"schemas": [fz.GROUP], "displayName": f"Seed {n}", "members": []}
        out.append(fz.Request("POST", "/scim/v2/Groups", body=fz._dumps(body, True)))
    return out


async def run_fuzz(
    harness: Harness,
    examples: int,
    strategy: st.SearchStrategy[fz.Request] | None = None,
) -> None:
    for request in _seed_requests():
        assert await harness.send(request) == 201, harness.report()
    loop = asyncio.get_running_loop()
    # One request in 20 is one of the costliest shapes (tests/fuzz/cost.py).
    mixed = st.integers(0, 19).flatmap(lambda k: cost.requests() if k == 0 else fz.requests())

    @settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(request=mixed if strategy is None else strategy)
    def one(request: fz.Request) -> None:
        harness.run(request, loop)

    # Hypothesis drives a worker thread; the requests go out on the app's own loop.
    await asyncio.to_thread(one)


async def audit_token(database: Database) -> str:
    async with database.pool.acquire() as conn:
        return (await issue_token(conn, "acme", "audit", "fuzz")).token


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def test_a_request_s_cpu_is_its_own_and_not_the_process_s() -> None:
    """The harness's figure (tests/fuzz/cpu.py) counts the request's work on the loop and in
    the worker threads it used, and not a busy thread of the same process beside it (where the
    whole process's clock counted the runners' batches)."""
    app = web.Application(middlewares=[cpu.meter()])
    app.cleanup_ctx.append(cpu.metered_executor_ctx)
    spent: list[float] = []  # each piece's own thread CPU, as the thread that ran it saw it

    def timed(work: Callable[[], object]) -> None:
        started = time.thread_time()
        work()
        spent.append(time.thread_time() - started)

    async def handler(request: web.Request) -> web.Response:
        timed(lambda: _burn(0.05))  # on the loop
        await asyncio.to_thread(timed, lambda: _burn(0.15))  # in a worker thread
        # A full collection in a worker thread: its cost is the test process's heap (0.01 s
        # alone, 0.2 s late in the whole suite), so it is timed, not assumed.
        await asyncio.to_thread(timed, gc.collect)
        return web.Response(text="done")

    app.router.add_get("/", handler)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        beside = threading.Thread(target=_burn, args=(0.6,))
        process = time.process_time()
        beside.start()
        with cpu.RequestCpu("1") as measured:
            async with client.get("/", headers={cpu.SEQUENCE_HEADER: "1"}) as r:
                assert r.status == 200 and await r.text() == "done"
        await asyncio.to_thread(beside.join)
        process = time.process_time() - process
    own = sum(spent)
    # The request's own pieces, with the loop's handling of it; never the 0.6 s beside it.
    assert own - 0.01 < measured.seconds < own + 0.15, (measured.seconds, spent)
    assert 0 < measured.collector < measured.seconds  # the worker thread's collection counted
    assert process > measured.seconds + 0.5  # what the old figure would have counted


async def test_fuzzed_requests_never_500_and_rejected_ones_write_nothing(
    client: TestClient[Any, Any], database: Database, tenant: IssuedToken
) -> None:
    base = f"http://{client.host}:{client.port}"
    reader = await audit_token(database)
    async with Harness(base, tenant.token, database, reader, max_cpu=MAX_CPU) as harness:
        await run_fuzz(harness, EXAMPLES)
    print("\n" + harness.report())
    assert harness.tried >= EXAMPLES
    assert not harness.failures, harness.report()
    # Whatever the accepted requests wrote, the views are what the events say.
    await settle(database, within=120)
    for report in await rebuild_all(database, dry_run=True):
        assert not report.drift, (report.name, report.diffs)


async def test_fuzzed_audit_queries_never_500(
    client: TestClient[Any, Any], database: Database, tenant: IssuedToken
) -> None:
    """The audit API's parameters alone (the mixed run above reaches them less often): NUL,
    surrogates, dates outside UTC's calendar, forged page tokens."""
    base = f"http://{client.host}:{client.port}"
    reader = await audit_token(database)
    async with Harness(base, tenant.token, database, reader, max_cpu=MAX_CPU) as harness:
        await run_fuzz(harness, max(50, EXAMPLES // 4), fz.audit_requests())
    print("\n" + harness.report())
    assert not harness.failures, harness.report()


async def test_the_costliest_requests_are_answered_and_refused_whole(
    client: TestClient[Any, Any], database: Database, tenant: IssuedToken
) -> None:
    """Each shape of tests/fuzz/cost.py once, at its worst size (up to the 2 MiB body limit):
    no 5xx, a SCIM error that wrote nothing when refused; the report names the slowest."""
    base = f"http://{client.host}:{client.port}"
    async with Harness(base, tenant.token, database, max_cpu=MAX_CPU) as harness:
        for request in _seed_requests():
            assert await harness.send(request) == 201, harness.report()
        statuses = [await harness.send(request) for request in cost.worst()]
    print("\n" + harness.report())
    assert not harness.failures, harness.report()
    # Some are taken (the limits themselves), most refused: neither kind went unexercised.
    assert 201 in statuses and 200 in statuses and 400 in statuses, statuses


async def test_inputs_the_fuzz_found_are_refused_whole(
    client: TestClient[Any, Any], database: Database, tenant: IssuedToken
) -> None:
    """Each of these was a 500 or a stalled audit log before it was fixed (found by the fuzz,
    or by probing what its first runs did not reach)."""
    noise = fz._noise(4000, 1)  # does not compress: too long for an index entry
    user = {"schemas": [fz.USER], "userName": "a@contoso.com"}

    def cursor(created: str) -> str:
        raw = json.dumps([created, str(uuid.uuid4())]).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def get(kind: str, name: str, value: str) -> fz.Request:
        return fz.Request("GET", f"/scim/v2/{kind}", query=[(name, value)])

    def post(kind: str, body: dict[str, Any]) -> fz.Request:
        return fz.Request("POST", f"/scim/v2/{kind}", body=fz._dumps(body, True))

    def audit(path: str, name: str, value: str) -> fz.Request:
        return fz.Request(
            "GET", path, query=[(name, value)], headers={"Authorization": fz.AUDIT_BEARER}
        )

    def page(value: list[Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    cases: list[tuple[fz.Request, int]] = [
        (post("Users", {**user, "userName": noise}), 400),
        (post("Users", {**user, "externalId": noise}), 400),
        (post("Users", {**user, "emails": [{"type": "work", "value": noise}]}), 400),
        (post("Groups", {"displayName": noise}), 400),
        (post("Users", {**user, "title": "a\x00b"}), 400),
        (fz.Request("POST", "/scim/v2/Groups", body=b'{"displayName": "\\u0000"}'), 400),
        # NUL and an unpaired surrogate in the path: the audit record must still be written.
        (fz.Request("DELETE", "/scim/v2/Users/a\x00b"), 404),
        (fz.Request("PATCH", "/scim/v2/Groups/\ud800", body=b"{}"), 404),
        # Paging past what a bigint holds is an empty page; a forged cursor is invalidCursor.
        (get("Users", "startIndex", str(10**39)), 200),
        (get("Groups", "startIndex", str(2**64)), 200),
        (get("Users", "cursor", cursor("0001-01-01T00:00:00+14:00")), 400),
        (get("Groups", "cursor", cursor("9999-12-31T23:59:59-14:00")), 400),
        (get("Users", "cursor", "WyIwMDAxLTAxLTAxVDAwOjAwOjAwIiwgW11d"), 400),  # [created, []]
        # The audit API: values PostgreSQL cannot hold (tests/test_boundaries.py has more).
        (audit("/audit/v1/entries", "identity", "a\x00b"), 400),
        (audit("/audit/v1/export", "to", "9999-12-31T23:59:59-05:00"), 400),
        (audit("/audit/v1/entries", "from", "0001-01-01T00:00:00+05:00"), 400),
        (audit("/audit/v1/entries", "next", page(["2026-01-01T00:00:00+00:00", 2**64])), 400),
        # Paths as clients write them reach the same handlers.
        (post("users/", user), 201),
        (
            fz.Request(
                "GET", "/scim/v2//Users/", query=[("filter", 'userName eq "a@contoso.com"')]
            ),
            200,
        ),
        (fz.Request("DELETE", "/scim/v2/USERS/@@U0@@/"), 204),
    ]
    reader = await audit_token(database)
    base = f"http://{client.host}:{client.port}"
    async with Harness(base, tenant.token, database, reader) as harness:
        for request, status in cases:
            assert await harness.send(request) == status, harness.report()
    assert not harness.failures, harness.report()
    await settle(database, within=60)  # the audit projection took every record


# -- the parsers, directly ------------------------------------------------------------------


def _placeholders(sql: str) -> set[int]:
    return {int(n) for n in re.findall(r"\$(\d+)", sql)}


@parser_settings
@given(expression=fz.filters)
def test_filter_compiler_gives_parameterised_sql_or_invalid_filter(expression: str) -> None:
    compilers: list[Callable[[str, SqlParams], str]] = [user_filter_sql, group_filter_sql]
    for compile_ in compilers:
        params = SqlParams(["tenant"])
        try:
            sql = compile_(expression, params)
        except ScimError as e:
            assert (e.status, e.scim_type) == (400, "invalidFilter")
            assert params.values == ["tenant"], "a refused filter added parameters"
            continue
        assert isinstance(sql, str) and sql
        # Every value is a parameter of its own, numbered after the ones already there.
        assert _placeholders(sql) == set(range(2, len(params.values) + 1))
        for value in params.values[1:]:
            assert not (isinstance(value, str) and "\x00" in value)


def _sort_expressions(attribute_map: AttributeMap, compile_: Callable[[str], str]) -> set[str]:
    names = [(None, attribute_map.attributes)]
    names += [(urn, table) for urn, table in attribute_map.extensions.items()]
    out: set[str] = set()
    for urn, table in names:
        for name, attribute in table.items():
            paths = [name, *(f"{name}.{sub}" for sub in attribute.sub_attributes)]
            for path in paths:
                try:
                    out.add(compile_(f"{urn}:{path}" if urn else path))
                except ScimError:
                    pass
    return out


SORT_EXPRESSIONS = {
    user_sort_sql: _sort_expressions(USER_ATTRIBUTES, user_sort_sql),
    group_sort_sql: _sort_expressions(GROUP_ATTRIBUTES, group_sort_sql),
}


@parser_settings
@given(sort_by=st.one_of(st.sampled_from(fz.FILTER_ATTRIBUTES), fz.text))
def test_sort_by_gives_a_constant_expression_or_invalid_value(sort_by: str) -> None:
    for compile_ in (user_sort_sql, group_sort_sql):
        try:
            sql = compile_(sort_by)
        except ScimError as e:
            assert (e.status, e.scim_type) == (400, "invalidValue")
            continue
        # Only the module's own fragments reach ORDER BY: never a byte of the client's.
        assert sql in SORT_EXPRESSIONS[compile_]


SAMPLE_USERS = [
    {"userName": "a@contoso.com"},
    {
        "userName": "b@contoso.com",
        "active": True,
        "displayName": "B",
        "name": {"givenName": "B", "familyName": "Bee"},
        "emails": [
            {"value": "b@contoso.com", "type": "work", "primary": True},
            {"value": "b@home.example", "type": "home"},
        ],
        "addresses": [{"type": "work", "locality": "Oslo", "primary": True}],
        "enterprise": {"department": "R&D", "employeeNumber": "7"},
        "manager": "2f1d8c4e-0b7a-4c39-9d55-1c2f7b0e9a11",
    },
]
documents = st.sampled_from([user_document(User.normalise(u)) for u in SAMPLE_USERS])


def _is_scim_400(error: ScimError) -> bool:
    return error.status == 400 and error.scim_type in SCIM_TYPES


@parser_settings
@given(body=fz.patch_bodies(), document=documents)
def test_user_patch_gives_a_document_or_a_scim_error_and_never_half_applies(
    body: Any, document: dict[str, Any]
) -> None:
    try:
        operations = parse_patch_request(body)
    except ScimError as e:
        assert _is_scim_400(e), e.body()
        return
    original = copy.deepcopy(document)
    try:
        desired = user_from_scim(apply_patch(document, operations))
    except ScimError as e:
        assert _is_scim_400(e), e.body()
        return
    finally:
        assert document == original, "PATCH changed its input document"
    try:
        User.normalise(desired)  # the domain's own rules: InvalidValue becomes 400 invalidValue
    except InvalidValue:
        pass


@parser_settings
@given(body=fz.patch_bodies())
def test_group_patch_folds_to_a_change_or_a_scim_error(body: Any) -> None:
    try:
        change = fold_operations(parse_patch_request(body))
    except ScimError as e:
        assert _is_scim_400(e), e.body()
        return
    assert isinstance(change, GroupEdit)
    assert not (change.adds & change.removes)


@parser_settings
@given(body=st.one_of(fz.user_bodies(), fz.group_bodies()))
def test_resource_bodies_read_to_a_state_or_a_scim_error(body: Any) -> None:
    if not isinstance(body, dict):
        return  # the handlers refuse non-objects before reading them (json_object)
    try:
        User.normalise(user_from_scim(body))
    except ScimError as e:
        assert _is_scim_400(e), e.body()
    except InvalidValue:
        pass
    try:
        _change_from_body(body)
    except ScimError as e:
        assert _is_scim_400(e), e.body()
