"""One short function per SCIM write: load, call the domain, commit.

A write that loses a race (another request appended to the same stream first, or PostgreSQL
broke a lock cycle) is retried from a fresh load, unless the client sent If-Match: then the
client's view is stale and it gets 412.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar
from uuid import UUID

import asyncpg

from domain.errors import InvalidValue, ResourceDeleted
from domain.group import Group
from domain.user import User
from infra import metrics
from infra.database import Database
from infra.eventstore import ConcurrencyError, OutOfOrder
from infra.schemas import INDEX_PREFIX, index_name
from service.errors import ScimError, invalid_value, not_found, precondition_failed, uniqueness
from service.scim.declared import check_immutable, coerce_declared, unique_attributes
from service.scim.group_patch import UNSET, GroupChange
from service.scim.patch import apply_extension_patch
from service.unit_of_work import UnitOfWork, is_unique_violation

MAX_ATTEMPTS = 8
T = TypeVar("T")


class _GroupsChanged(Exception):
    """A resource joined a group while it was leaving its groups: start again, queueing for
    that one too (service/unit_of_work.py, `queued_for`)."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks, and which request this is (it is stored with every event it causes)."""

    tenant_id: UUID
    request_id: str
    # The request as the audit log records it (service/outcomes.py); None outside HTTP.
    context: Any = None


def parse_id(raw: str, kind: str = "User") -> UUID:
    try:
        return UUID(raw)
    except ValueError:
        raise not_found(kind, raw) from None


def etag(version: int) -> str:
    return f'W/"{version}"'


def etag_matches(header: str, version: int) -> bool:
    """If-Match / If-None-Match: a list of (weak or strong) tags, or *."""
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == f'"{version}"':
            return True
    return False


async def _retrying(
    db: Database, caller: Caller, if_match: str | None, work: Callable[[UnitOfWork], Awaitable[T]]
) -> T:
    for attempt in range(MAX_ATTEMPTS):
        try:
            async with UnitOfWork(db, caller.tenant_id, caller.request_id, caller.context) as uow:
                result = await work(uow)
            return result
        except OutOfOrder:
            # Not a conflict: If-Match was checked and holds; a new transaction succeeds.
            if attempt + 1 < MAX_ATTEMPTS:
                metrics.RETRIES.inc()
        except _GroupsChanged:
            if attempt + 1 < MAX_ATTEMPTS:
                metrics.RETRIES.inc()
        except (ConcurrencyError, asyncpg.DeadlockDetectedError) as e:
            if isinstance(e, asyncpg.DeadlockDetectedError):
                metrics.CONFLICTS.labels("deadlock").inc()
            if if_match is not None:
                metrics.CONFLICT_ANSWERS.labels("412").inc()
                raise precondition_failed() from None
            if attempt + 1 < MAX_ATTEMPTS:
                metrics.RETRIES.inc()
    metrics.CONFLICT_ANSWERS.labels("409").inc()
    raise ScimError(409, "The resource is being changed by other requests; retry", "mutability")


# -- users --------------------------------------------------------------------------------


async def provision_user(
    db: Database,
    caller: Caller,
    desired: Mapping[str, Any],
    unique: Sequence[tuple[str, str, bool]] = (),
) -> User:
    """`unique`: declared extension attributes whose values are unique in the tenant."""
    user_id = uuid.uuid4()

    async def work(uow: UnitOfWork) -> User:
        user = _domain(lambda: User.provision(user_id, caller.tenant_id, desired))
        await _check_manager(uow, user)
        uow.add_user(user)
        await _flush(
            uow, user.user_name, taken=_taken("User", user.tenant_id, user.state_view, unique)
        )
        return user

    return await _retrying(db, caller, None, work)


async def update_user(
    db: Database,
    caller: Caller,
    user_id: UUID,
    change: Callable[[User], None],
    if_match: str | None = None,
    in_thread: Callable[[User], bool] | None = None,
    unique: Sequence[tuple[str, str, bool]] = (),
) -> User:
    """Apply `change` (a domain command on the loaded user) and commit what it triggered.

    When `in_thread(user)` says the change is costly (a large body, a user of many values),
    it runs in a worker thread, so the event loop keeps serving other requests meanwhile."""

    attempts = 0

    async def work(uow: UnitOfWork) -> User:
        # The first try takes no lock: load, change, and ONE statement (the append, guarded
        # by the stream's version, with the view's upsert), as Entra's PATCHes of distinct
        # users need. One that lost a race retries queued on the user's row lock (as group
        # writers do): under a burst of PATCHes to one user each retry loads the state the
        # previous one committed, instead of all racing on one version and running out of
        # retries.
        nonlocal attempts
        attempts += 1
        user = await _load_user(uow, user_id, if_match, lock=attempts > 1)
        if in_thread is not None and in_thread(user):
            await asyncio.to_thread(_domain, partial(change, user))
        else:
            _domain(partial(change, user))
        await _check_manager(uow, user)
        await _flush(
            uow, user.user_name, taken=_taken("User", user.tenant_id, user.state_view, unique)
        )
        return user

    return await _retrying(db, caller, if_match, work)


async def deprovision_user(
    db: Database, caller: Caller, user_id: UUID, if_match: str | None = None
) -> None:
    """Hard delete; the user leaves every group it was in, as membership events on them."""

    async def work(uow: UnitOfWork) -> None:
        await uow.queue_for_groups_of(user_id)
        user = await _load_user(uow, user_id, if_match, lock=True)
        _domain(user.deprovision)
        await _leave_groups(uow, user_id)
        await uow.flush()

    await _retrying(db, caller, if_match, work)


async def _load_user(
    uow: UnitOfWork, user_id: UUID, if_match: str | None, *, lock: bool = False
) -> User:
    user = await (uow.user_for_update(user_id) if lock else uow.user(user_id))
    if user is None or user.deprovisioned:
        raise not_found("User", str(user_id))
    if if_match is not None and not etag_matches(if_match, user.version):
        raise precondition_failed()
    return user


async def _check_manager(uow: UnitOfWork, user: User) -> None:
    """A manager must be a user of the same tenant (Entra sets it only once both exist)."""
    manager = user.state.get("manager")
    if manager is None:
        return
    if not any(
        type(e).__name__ in ("ManagerChanged", "UserProvisioned") for e in user.pending_events
    ):
        return
    if not await uow.user_exists(UUID(manager)):
        raise invalid_value(f"manager {manager} is not a user of this tenant")


# -- groups -------------------------------------------------------------------------------


async def create_group(db: Database, caller: Caller, change: GroupChange) -> Group:
    group_id = uuid.uuid4()

    async def work(uow: UnitOfWork) -> Group:
        display_name = None if change.display_name is UNSET else change.display_name
        external_id = None if change.external_id is UNSET else change.external_id
        extensions = None if change.extensions is UNSET else change.extensions
        group = _domain(
            lambda: Group.create(group_id, caller.tenant_id, display_name, external_id, extensions)  # type: ignore[arg-type]
        )
        uow.add_group(group)
        await _change_members(uow, group, change)
        unique = unique_attributes(change.declared)
        await _flush(
            uow,
            group.display_name,
            "displayName",
            _taken("Group", group.tenant_id, group.extensions, unique),
        )
        return group

    return await _retrying(db, caller, None, work)


async def change_group(
    db: Database, caller: Caller, group_id: UUID, change: GroupChange, if_match: str | None = None
) -> Group:
    async def work(uow: UnitOfWork) -> Group:
        group = await _load_group(uow, group_id, if_match)
        display_name = group.display_name if change.display_name is UNSET else change.display_name
        external_id = group.external_id if change.external_id is UNSET else change.external_id
        extensions = None if change.extensions is UNSET else change.extensions
        if change.extension_ops:
            extensions = coerce_declared(
                apply_extension_patch(group.extensions, change.extension_ops, change.max_values),
                change.declared,
            )
        if extensions is not None:
            check_immutable(group.extensions, extensions, change.declared)
        _domain(lambda: group.update(display_name, external_id, extensions))
        await _change_members(uow, group, change)
        unique = unique_attributes(change.declared)
        await _flush(
            uow,
            group.display_name,
            "displayName",
            _taken("Group", group.tenant_id, group.extensions, unique),
        )
        return group

    return await _retrying(db, caller, if_match, work)


async def delete_group(
    db: Database, caller: Caller, group_id: UUID, if_match: str | None = None
) -> None:
    """The group goes, and leaves every group it was nested in, as membership events on them."""

    async def work(uow: UnitOfWork) -> None:
        await uow.queue_for_groups_of(group_id)
        group = await _load_group(uow, group_id, if_match)
        _domain(group.delete)
        await _leave_groups(uow, group_id)
        await uow.flush()

    await _retrying(db, caller, if_match, work)


async def _load_group(uow: UnitOfWork, group_id: UUID, if_match: str | None) -> Group:
    group = await uow.group(group_id)
    if group is None or group.deleted:
        raise not_found("Group", str(group_id))
    if if_match is not None and not etag_matches(if_match, group.version):
        raise precondition_failed()
    return group


def _canonical_ids(ids: set[str], *, strict: bool) -> set[UUID]:
    out: set[UUID] = set()
    bad: list[str] = []
    for raw in ids:
        try:
            out.add(UUID(raw))
        except ValueError:
            bad.append(raw)
    if bad and strict:
        raise invalid_value(f"members not found in this tenant: {', '.join(sorted(bad)[:20])}")
    return out


async def _change_members(uow: UnitOfWork, group: Group, change: GroupChange) -> None:
    """Turn the requested change into the real delta, checked against the membership rows."""
    if not change.touches_members:
        return
    adds = _canonical_ids(change.adds, strict=True)
    removes = _canonical_ids(change.removes, strict=False)
    conn, tenant = await uow.begin(), uow.tenant_id
    if change.clear_members:
        rows = await conn.fetch(
            "SELECT member_id FROM scim_group_members WHERE tenant_id = $1 AND group_id = $2",
            tenant,
            group.id,
        )
        current = {r["member_id"] for r in rows}
        added, removed = adds - current, current - adds
    else:
        rows = await conn.fetch(
            "SELECT member_id FROM scim_group_members"
            " WHERE tenant_id = $1 AND group_id = $2 AND member_id = any($3::uuid[])",
            tenant,
            group.id,
            list(adds | removes),
        )
        existing = {r["member_id"] for r in rows}
        added, removed = adds - existing, removes & existing
    if added:
        await _check_new_members(uow, group, added)
    displays = {}
    for raw, display in change.displays.items():
        try:
            displays[str(UUID(raw))] = display
        except ValueError:
            continue
    _domain(
        lambda: group.change_membership(
            [str(a) for a in added], [str(r) for r in removed], displays
        )
    )


async def _check_new_members(uow: UnitOfWork, group: Group, added: set[UUID]) -> None:
    """New members must be users or groups of this tenant, and no group may contain itself.

    The rows are locked for share, so a member cannot be deleted while it joins.
    """
    conn, tenant, ids = await uow.begin(), uow.tenant_id, sorted(added)
    users = await conn.fetch(
        "SELECT id FROM scim_users WHERE tenant_id = $1 AND id = any($2::uuid[]) FOR SHARE",
        tenant,
        ids,
    )
    groups = await conn.fetch(
        "SELECT id FROM scim_groups WHERE tenant_id = $1 AND id = any($2::uuid[]) FOR SHARE",
        tenant,
        ids,
    )
    found = {r["id"] for r in users} | {r["id"] for r in groups}
    missing = sorted(str(m) for m in added - found)
    if missing:
        raise invalid_value(f"members not found in this tenant: {', '.join(missing[:20])}")
    nested = [r["id"] for r in groups]
    if nested:
        # Two requests nesting groups into each other at once could each see no cycle; one
        # lock per tenant orders them (nesting is rare, plain membership never takes it).
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1::text))", str(tenant))
        cycle = await conn.fetchval(
            """
            WITH RECURSIVE below(id) AS (
                SELECT unnest($2::uuid[])
                UNION
                SELECT m.member_id FROM scim_group_members m JOIN below b ON m.group_id = b.id
                WHERE m.tenant_id = $1 AND m.member_type = 'Group'
            )
            SELECT EXISTS (SELECT 1 FROM below WHERE id = $3)
            """,
            tenant,
            nested,
            group.id,
        )
        if cycle:
            raise invalid_value("adding these members would make a group contain itself")


async def _leave_groups(uow: UnitOfWork, member_id: UUID) -> None:
    # Read again under the member's lock: it may have joined a group since it queued.
    for group_id in await uow.groups_of(member_id):
        if not uow.queued_for(group_id):
            raise _GroupsChanged
        parent = await uow.group(group_id)
        if parent is not None and not parent.deleted:
            parent.change_membership([], [str(member_id)])


# -- shared -------------------------------------------------------------------------------


# The views' indexes over client text, by the attribute that feeds them.
_INDEXED_ATTRIBUTES = {
    "scim_users_user_name_uq": "userName",
    "scim_users_external_id_idx": "externalId",
    "scim_users_email_keys_idx": "emails",
    "scim_groups_display_name_uq": "displayName",
    "scim_groups_external_id_idx": "externalId",
}


def _taken(
    resource_type: str,
    tenant_id: UUID,
    state: Mapping[str, Any],
    unique: Sequence[tuple[str, str, bool]],
) -> dict[str, str]:
    """Index name -> what a clash on it says, for the declared unique attributes the
    resource holds (their unique indexes: infra/schemas.py)."""
    out: dict[str, str] = {}
    for urn, attribute, case_exact in unique:
        value = (state.get(urn) or {}).get(attribute)
        if value is not None:
            index = index_name(resource_type, tenant_id, urn, attribute, case_exact)
            out[index] = f"{urn}:{attribute} {str(value)[:100]!r}"
    return out


async def _flush(
    uow: UnitOfWork, name: str, attribute: str = "userName", taken: Mapping[str, str] | None = None
) -> None:
    """`taken`: what to say of a clash on a declared unique attribute (see _taken)."""
    try:
        await uow.flush()
    except asyncpg.UniqueViolationError as e:
        if is_unique_violation(e, "scim_users_user_name_uq") or is_unique_violation(
            e, "scim_groups_display_name_uq"
        ):
            raise uniqueness(f"{attribute} {name!r} is already taken") from None
        constraint = str(getattr(e, "constraint_name", None) or "")
        if INDEX_PREFIX in constraint:
            what = (taken or {}).get(constraint, "a declared unique attribute's value")
            raise uniqueness(f"{what} is already taken") from None
        raise
    except asyncpg.ProgramLimitExceededError as e:
        # A long value that does not compress outgrows an index entry (about 2.7 kB); the
        # transaction is rolled back whole.
        index = re.search(r'for index "([^"]+)"', str(e))
        what = _INDEXED_ATTRIBUTES.get(index.group(1), "a value") if index else "a value"
        raise invalid_value(f"{what} is too long to be stored") from None


def _domain(command: Callable[[], T]) -> T:
    try:
        return command()
    except InvalidValue as e:
        raise invalid_value(e.detail) from None
    except ResourceDeleted as e:
        raise not_found("Resource", str(e.resource_id)) from None
