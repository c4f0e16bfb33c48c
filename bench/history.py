"""Entra-like tenant histories from the real aggregates (rows 5 and 6): an initial sync, then
Entra's incremental cycles (updates, re-sent state, joiners, leavers, memberships, renames,
nesting, deletions, refused requests). `recorded`: each request also carries its outcome, as
the service appends it, and the budget counts requests; else only events, and it counts those."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from asyncpg import Connection
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import StoredEvent

from bench.common import PROGRESS, connected
from domain.group import Group
from domain.request import ProvisioningRequest
from domain.user import User
from infra.config import Settings
from infra.database import create_pool, open_database
from infra.eventstore import EventStore
from infra.migrations import migrate
from infra.tenants import create_tenant
from infra.transcoder import make_mapper
from projections.registry import PROJECTIONS
from projections.runner import Runner
from projections.state import register

Event = DomainEventProtocol[uuid.UUID]

GIVEN = tuple("Adele Alex Ben Chen Diego Emily Fatima Grady Hana Isaiah Joni Kenji Lee Lidia"
              " Megan Miriam Nestor Olga Patti Raj".split())  # fmt: skip
FAMILY = tuple("Vance Wilber Walker Li Garcia Braun Khan Archie Sato Moore Sherman Tanaka Gu"
               " Holloway Bowen Adams Wilke Petrova Fernandez Patel".split())  # fmt: skip
DEPARTMENTS = tuple("Sales,Finance,Engineering,Legal,Marketing,Support,Operations,Human Resources"
                    ",IT,Research".split(","))  # fmt: skip
TITLES = tuple("Associate,Analyst,Engineer,Senior Engineer,Consultant,Specialist,Manager"
               ",Senior Manager,Director,Vice President".split(","))  # fmt: skip


@dataclass
class Request:
    change_id: str
    events: list[Event]


@dataclass
class Person:
    user: User
    serial: int
    given: str
    family: str
    domain: str

    @property
    def user_name(self) -> str:
        return f"{self.given}.{self.family}{self.serial}@{self.domain}"


@dataclass
class Team:
    group: Group
    serial: int
    members: set[str] = field(default_factory=set)
    renames: int = 0


class TenantHistory:
    """One tenant's SCIM write requests over time."""

    def __init__(self, tenant_id: uuid.UUID, budget: int, seed: int, *, recorded: bool) -> None:
        self.tenant_id = tenant_id
        self.budget = budget
        self.recorded = recorded
        self.rng = random.Random(seed)
        self.domain = f"tenant{seed}.onmicrosoft.com"
        self.people: list[Person] = []  # live users; removal swaps with the last one
        self.index: dict[str, int] = {}  # user id -> position in people
        self.gone: list[str] = []  # deleted users (Entra sometimes retries them: 404)
        self.teams: dict[str, Team] = {}  # live groups by id
        self.team_order: list[str] = []  # creation order of live groups (nesting goes down it)
        self.serial = 0
        self.emitted = 0  # events
        self.made = 0  # requests

    @property
    def counted(self) -> int:
        """What the budget counts: requests if recorded, else events."""
        return self.made if self.recorded else self.emitted

    def _uuid(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def _request(
        self, method: str, path: str, status: int, aggregates: tuple[User | Group, ...],
        target: str | None = None, error: dict[str, Any] | None = None,
    ) -> Request | None:  # fmt: skip
        events: list[Event] = [e for a in aggregates for e in a.collect_events()]
        self.emitted += len(events)
        if not self.recorded:
            return Request("", events) if events else None
        client = f"20.190.{self.rng.randrange(128, 192)}.{self.rng.randrange(1, 255)}"
        kind, ms = "Group" if "/Groups" in path else "User", self.rng.lognormvariate(2.3, 0.5)
        described = {"method": method, "path": path, "status": status, "initiatedBy": "default",
            "client": client, "targetType": kind, "targetId": target,
            "durationMs": round(ms, 3)}  # fmt: skip
        outcome = "failure" if error else ("success" if events else "skipped")
        record = ProvisioningRequest.record(self._uuid(), self.tenant_id, outcome, described, error)
        self.made += 1
        return Request(uuid.uuid4().hex, [*events, *record.collect_events()])

    # -- users

    def join(self) -> Request | None:
        """POST /Users of a joiner; most have a manager among the live users."""
        rng = self.rng
        self.serial += 1
        manager = None
        if self.people and rng.random() < 0.85:
            manager = str(rng.choice(self.people).user.id)
        given, family = rng.choice(GIVEN), rng.choice(FAMILY)
        name = f"{given}.{family}{self.serial}@{self.domain}"
        state = {"userName": name, "externalId": str(self._uuid()), "active": True,
            "displayName": f"{given} {family}",
            "name": {"formatted": f"{given} {family}", "familyName": family, "givenName": given},
            "emails": [{"primary": True, "type": "work", "value": name}],
            "title": rng.choice(TITLES), "preferredLanguage": "en-US",
            "enterprise": {"department": rng.choice(DEPARTMENTS), "employeeNumber":
                f"{self.serial:07d}", "costCenter": f"CC-{rng.randrange(200):03d}"},
            "manager": manager}  # fmt: skip
        user = User.provision(self._uuid(), self.tenant_id, state)
        person = Person(user, self.serial, given, family, self.domain)
        self.index[str(person.user.id)] = len(self.people)
        self.people.append(person)
        return self._request("POST", "/scim/v2/Users", 201, (person.user,))

    def update(self, *, no_op: bool = False) -> Request | None:
        """PATCH /Users from an attribute change in Entra (one or two attributes), or Entra
        re-sending what the service already has (skipped)."""
        rng = self.rng
        person = rng.choice(self.people)
        user = person.user
        desired = user.state
        enterprise = dict(desired.get("enterprise", {}))
        for _ in range(0 if no_op else 1 if rng.random() < 0.8 else 2):
            kind = rng.random()
            if kind < 0.30:
                enterprise["department"] = rng.choice(DEPARTMENTS)
            elif kind < 0.45:
                desired["title"] = rng.choice(TITLES)
            elif kind < 0.55:
                enterprise["costCenter"] = f"CC-{rng.randrange(200):03d}"
            elif kind < 0.67:
                desired["manager"] = str(rng.choice(self.people).user.id)
                if desired["manager"] == str(user.id):
                    desired.pop("manager")
            elif kind < 0.77:  # a new family name: display name, name, userName and e-mail
                person.family = rng.choice(FAMILY)
                full, name = f"{person.given} {person.family}", person.user_name
                names = {"formatted": full, "familyName": person.family, "givenName": person.given}
                desired |= {"displayName": full, "userName": name, "name": names,
                    "emails": [{"primary": True, "type": "work", "value": name}]}  # fmt: skip
            elif kind < 0.83:  # a second address, or back to one
                emails = desired.get("emails", [])
                if len(emails) > 1:
                    desired["emails"] = emails[:1]
                else:
                    other = {"type": "other", "value": f"{person.serial}@alias.{person.domain}"}
                    desired["emails"] = [*emails, other]
            elif kind < 0.88:
                phone = {"type": "work", "value": f"+1 555 {rng.randrange(10**7):07d}"}
                desired["phoneNumbers"] = [phone]
            else:  # disabled in Entra, or enabled again
                desired["active"] = not desired.get("active", True)
        desired["enterprise"] = enterprise
        user.update(desired)
        return self._request("PATCH", f"/scim/v2/Users/{user.id}", 200, (user,), str(user.id))

    def leave(self) -> Request | None:
        """DELETE /Users of a leaver: out of every group (membership events), then gone."""
        person = self.rng.choice(self.people)
        user_id = str(person.user.id)
        touched = self._out_of_groups(user_id)
        person.user.deprovision()
        at = self.index.pop(user_id)
        last = self.people.pop()
        if last is not person:
            self.people[at] = last
            self.index[str(last.user.id)] = at
        self.gone.append(user_id)
        path = f"/scim/v2/Users/{user_id}"
        return self._request("DELETE", path, 204, (person.user, *touched), user_id)

    # -- groups

    def _out_of_groups(self, member: str) -> list[Group]:
        """`member` (a user or a group) removed from every group that holds it."""
        holding = [team for team in self.teams.values() if member in team.members]
        for team in holding:
            team.members.discard(member)
            team.group.change_membership([], [member])
        return [team.group for team in holding]

    def create_group(self) -> Request | None:
        rng = self.rng
        self.serial += 1
        kind = rng.choice(("Team", "Project", "Site", "Role", "App access"))
        group_id, name = self._uuid(), f"{kind} {self.serial}"
        group = Group.create(group_id, self.tenant_id, name, external_id=str(self._uuid()))
        self.teams[str(group.id)] = Team(group, self.serial)
        self.team_order.append(str(group.id))
        return self._request("POST", "/scim/v2/Groups", 201, (group,))

    def _patch_group(self, team: Team) -> Request | None:
        gid = str(team.group.id)
        return self._request("PATCH", f"/scim/v2/Groups/{gid}", 204, (team.group,), gid)

    def add_members(
        self, team: Team | None = None, size: int | None = None, picks: set[str] | None = None
    ) -> Request | None:
        """PATCH /Groups add members, in a batch of Entra's size (up to 50 here)."""
        rng = self.rng
        team = team or self.teams[rng.choice(self.team_order)]
        size = size or rng.choice((1, 1, 2, 3, 5, 10, 20, 50))
        picks = picks or {str(rng.choice(self.people).user.id) for _ in range(size)}
        picks -= team.members
        if not picks:
            return None
        displays = {m: f"member {m[:8]}" for m in picks if rng.random() < 0.1}
        team.group.change_membership(sorted(picks), [], displays)
        team.members |= picks
        return self._patch_group(team)

    def remove_members(self) -> Request | None:
        rng = self.rng
        team = self.teams[rng.choice(self.team_order)]
        if not team.members:
            return self.add_members(team)
        users = sorted(m for m in team.members if m in self.index)
        gone = set(rng.sample(users, min(len(users), rng.choice((1, 1, 2, 5, 10)))))
        if not gone:
            return None
        team.group.change_membership([], sorted(gone))
        team.members -= gone
        return self._patch_group(team)

    def nest(self) -> Request | None:
        """A group added to a group created after it: nesting goes one way, never a cycle."""
        if len(self.team_order) < 2:
            return None
        a, b = sorted(self.rng.sample(range(len(self.team_order)), 2))
        child, parent = self.team_order[a], self.teams[self.team_order[b]]
        if child in parent.members:
            return None
        parent.group.change_membership([child], [])
        parent.members.add(child)
        return self._patch_group(parent)

    def rename_group(self) -> Request | None:
        team = self.teams[self.rng.choice(self.team_order)]
        team.renames += 1
        name = team.group.display_name.split(" (", 1)[0]
        team.group.update(f"{name} (v{team.renames + 1})", team.group.external_id)
        return self._patch_group(team)

    def delete_group(self) -> Request | None:
        """DELETE /Groups: out of the groups it is nested in, then gone."""
        if len(self.team_order) < 10:
            return None
        gid = self.rng.choice(self.team_order)
        team = self.teams.pop(gid)
        self.team_order.remove(gid)
        touched = self._out_of_groups(gid)
        team.group.delete()
        return self._request("DELETE", f"/scim/v2/Groups/{gid}", 204, (team.group, *touched), gid)

    # -- refused: the reply is an error, the request records only its outcome

    def _refused(
        self, method: str, target: str | None, status: int, scim_type: str | None, detail: str
    ) -> Request | None:
        path = "/scim/v2/Users" + (f"/{target}" if method != "POST" else "")
        error = {"status": str(status), "scimType": scim_type, "detail": detail}
        return self._request(method, path, status, (), target, error)

    def conflict(self) -> Request | None:
        """POST /Users with a userName that is taken: 409 uniqueness (EntryConflict)."""
        taken = self.rng.choice(self.people).user_name
        return self._refused("POST", None, 409, "uniqueness", f"userName {taken!r} is taken")

    def invalid(self) -> Request | None:
        """PATCH with a path the service refuses: 400 invalidPath (InvalidInput)."""
        uid = str(self.rng.choice(self.people).user.id)
        path = "urn:ietf:params:scim:schemas:extension:custom:2.0:User"
        return self._refused("PATCH", uid, 400, "invalidPath", f"unsupported path {path!r}")

    def missing(self) -> Request | None:
        """PATCH of a user deleted meanwhile: 404 (InvalidAnchor)."""
        uid = self.rng.choice(self.gone) if self.gone else str(self._uuid())
        return self._refused("PATCH", uid, 404, None, f"User {uid} not found")

    # -- the story

    def _play(self, steps: Iterable[Callable[[], Request | None]]) -> Iterator[Request]:
        for step in steps:
            if self.counted >= self.budget:
                return
            if request := step():
                yield request

    def requests(self) -> Iterator[Request]:
        """Initial sync, then churn, until the budget is spent (the last request may overrun)."""
        users = max(10, self.budget * 12 // 100)
        yield from self._play([self.join] * users + [self.create_group] * max(10, users // 30))
        if self.counted >= self.budget:
            return
        # Everyone in one all-staff group, and in two or three others, in batches.
        everyone, ids = self.teams[self.team_order[0]], [str(p.user.id) for p in self.people]
        batch = partial(self.add_members, everyone)
        steps = [partial(batch, picks=set(ids[k : k + 50])) for k in range(0, len(ids), 50)]
        steps += [partial(self.add_members, size=20)] * (len(ids) * 3 // 20)
        yield from self._play(steps)
        yield from self._play(self._churn())

    def _churn(self) -> Iterator[Callable[[], Request | None]]:
        churn: tuple[tuple[float, Callable[[], Request | None]], ...] = (
            (0.46, self.update),
            (0.07, partial(self.update, no_op=True)),  # Entra re-sends what we have
            (0.15, self.add_members),
            (0.08, self.remove_members),
            (0.10, self.join),
            (0.07, self.leave),
            (0.025, self.rename_group),
            (0.012, self.create_group),
            (0.005, self.nest),
            (0.008, self.delete_group),
            (0.015, self.conflict),
            (0.01, self.invalid),
            (0.005, self.missing),
        )
        weights, steps = [w for w, _ in churn], [s for _, s in churn]
        while True:
            (step,) = self.rng.choices(steps, weights)
            yield self.join if step == self.leave and len(self.people) < 50 else step


async def seed(
    dsn: str, total: int, tenants: int, *, recorded: bool, chunk: int = 0
) -> list[tuple[str, TenantHistory]]:
    """`total` split between `tenants` (`infra.tenants.create_tenant`), the histories appended:
    each tenant's requests in order on a connection of its own, tenants concurrently (up to 8).
    chunk=0: one transaction per request with its change id, as the service appends them (the
    audit projection makes one entry per transaction); else `chunk` events or more to a
    transaction, never splitting a request. Seeding commits need not wait for their WAL flush
    (synchronous_commit=off: the measurements run with the server's own settings)."""
    budgets = [total // tenants + (i < total % tenants) for i in range(tenants)]
    names = [f"bench-{i:03d}-{uuid.uuid4().hex[:6]}" for i in range(tenants)]
    async with connected(dsn) as conn:
        await migrate(conn)
        ids = [(await create_tenant(conn, name)).tenant_id for name in names]
    histories = [TenantHistory(ids[i], b, i + 1, recorded=recorded) for i, b in enumerate(budgets)]
    size = min(8, len(histories))
    settings = {"synchronous_commit": "off"}
    pool = await create_pool(dsn, min_size=size, max_size=size, server_settings=settings)
    store, mapper = EventStore(pool), make_mapper()
    unit = "requests" if recorded else "events"
    task = PROGRESS.add_task(f"seed {total:,} {unit}", total=total)

    async def writer(h: TenantHistory) -> None:
        async with pool.acquire() as conn:
            batch: list[StoredEvent] = []
            for request in h.requests():
                batch += [mapper.to_stored_event(e) for e in request.events]
                if len(batch) >= chunk:  # outside a transaction: one INSERT, one transaction
                    change = request.change_id or "bench-seed"
                    await store.append_stored(conn, h.tenant_id, batch, change)
                    batch = []
                    PROGRESS.update(task, completed=sum(h.counted for h in histories))
            await store.append_stored(conn, h.tenant_id, batch, "bench-seed")
        PROGRESS.update(task, completed=sum(h.counted for h in histories))

    try:
        async with asyncio.TaskGroup() as group:
            for h in histories:
                group.create_task(writer(h))
    finally:
        await store.close()
        await pool.close()
    return list(zip(names, histories, strict=True))


async def settle(conn: Connection) -> None:
    """What autovacuum would have done by now to the seeded log; and no checkpoint due mid-run."""
    await conn.execute("VACUUM ANALYZE stored_events")
    await conn.execute("CHECKPOINT")


async def catch_up(dsn: str, names: list[str]) -> None:
    """Bring projections to the head with their own runner's step, as `serve` would."""
    async with open_database(Settings(database_url=dsn, run_projections=False)) as db:
        conn = await db.connect()
        try:
            await register(conn, list(PROJECTIONS.values()))
            for name in names:
                runner = Runner(db, PROJECTIONS[name], batch_size=5000)
                task = PROGRESS.add_task(f"{name} runner catch-up", total=None)
                while await runner.step(conn):
                    PROGRESS.update(task, completed=runner.applied)
                PROGRESS.update(task, total=runner.applied)
        finally:
            await conn.close()
