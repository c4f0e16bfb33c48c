"""One short method per command (service/commands.py): load, call the domain, commit.

A write that loses a race (another request appended to the same stream first, or PostgreSQL
broke a lock cycle) is retried from a fresh load, unless the client sent If-Match: then the
client's view is stale and it gets 412. Refusals are service errors (service/exceptions.py);
the HTTP layer's middleware turns them into SCIM errors. Nothing here knows HTTP or SCIM's
wire format: what a PATCH does to a SCIM document is the `Documents` the app supplies.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from uuid import UUID

import asyncpg

from domain.errors import InvalidValue, ResourceDeleted
from domain.group import Group
from domain.schema import USER_MULTI_VALUED_ATTRIBUTES as MULTI_VALUED
from domain.user import User
from infra import metrics
from infra.database import Database
from infra.eventstore import ConcurrencyError, OutOfOrder
from infra.schemas import INDEX_PREFIX, index_name
from service.commands import (
    UNSET,
    ChangeGroup,
    CreateGroup,
    CreateUser,
    DeleteGroup,
    DeleteUser,
    GroupEdit,
    PatchUser,
    ReplaceUser,
    Unique,
)
from service.exceptions import Conflict, Invalid, NotFound, PreconditionFailed, Taken
from service.taken import Declared, holder_of
from service.unit_of_work import UnitOfWork, is_unique_violation

if TYPE_CHECKING:  # service.outcomes imports the app's state, which names Handlers
    from service.outcomes import RequestContext

MAX_ATTEMPTS = 8
# A user holding more values than this is changed in a worker thread (each write copies,
# diffs and stores all of them), as is one changed by a large body (the command's `large`).
THREAD_USER_VALUES = 100
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
    audit: RequestContext | None = None


class Documents(Protocol):
    """What the SCIM layer supplies: PATCH operations applied to SCIM documents."""

    def patched_user(self, state: Mapping[str, Any], command: PatchUser) -> dict[str, Any]:
        """The user's desired state once the command's operations apply to `state`."""
        ...

    def patched_extensions(self, extensions: Mapping[str, Any], edit: GroupEdit) -> dict[str, Any]:
        """A group's extensions once the edit's extension operations apply to them."""
        ...

    def check_immutable(
        self, before: Mapping[str, Any], after: Mapping[str, Any], declared: Mapping[str, Any]
    ) -> None:
        """Refuse a write that changes a declared `mutability: immutable` attribute once set
        (`before`/`after`: a user state, or a group's extensions)."""
        ...

    def unique(self, declared: Mapping[str, Any]) -> tuple[Unique, ...]:
        """The declared attributes whose values are unique in the tenant."""
        ...


def etag_matches(header: str, version: int) -> bool:
    """If-Match / If-None-Match: a list of (weak or strong) tags, or *."""
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == f'"{version}"':
            return True
    return False


class Handlers:
    def __init__(self, db: Database, documents: Documents) -> None:
        self.db = db
        self.documents = documents

    async def _retrying(
        self, caller: Caller, if_match: str | None, work: Callable[[UnitOfWork], Awaitable[T]]
    ) -> T:
        for attempt in range(MAX_ATTEMPTS):
            try:
                async with UnitOfWork(
                    self.db, caller.tenant_id, caller.request_id, caller.audit
                ) as uow:
                    result = await work(uow)
                return result
            except Taken as e:
                if e.held is not None:  # its connection given back: no second one held
                    e.holder = await holder_of(self.db.pool, caller.tenant_id, e.held)
                raise
            except (OutOfOrder, _GroupsChanged):
                # Not a conflict: If-Match was checked and holds; a new transaction succeeds.
                if attempt + 1 < MAX_ATTEMPTS:
                    metrics.RETRIES.inc()
            except (ConcurrencyError, asyncpg.DeadlockDetectedError) as e:
                if isinstance(e, asyncpg.DeadlockDetectedError):
                    metrics.CONFLICTS.labels("deadlock").inc()
                if if_match is not None:
                    metrics.CONFLICT_ANSWERS.labels("412").inc()
                    raise PreconditionFailed() from None
                if attempt + 1 < MAX_ATTEMPTS:
                    metrics.RETRIES.inc()
        metrics.CONFLICT_ANSWERS.labels("409").inc()
        raise Conflict()

    # -- users ----------------------------------------------------------------------------

    async def create_user(self, caller: Caller, command: CreateUser) -> User:
        user_id = uuid.uuid4()

        async def work(uow: UnitOfWork) -> User:
            user = _domain(partial(User.provision, user_id, caller.tenant_id, command.desired))
            await _check_manager(uow, user)
            uow.add_user(user)
            taken = _taken("User", user, user.state_view, command.unique)
            await _flush(uow, user.user_name, taken)
            return user

        return await self._retrying(caller, None, work)

    async def replace_user(self, caller: Caller, command: ReplaceUser) -> User:
        def change(user: User) -> None:
            self.documents.check_immutable(user.state, command.desired, command.declared)
            user.update(command.desired)

        return await self._update_user(caller, command, change)

    async def patch_user(self, caller: Caller, command: PatchUser) -> User:
        def change(user: User) -> None:
            user.update(self.documents.patched_user(user.state, command))

        return await self._update_user(caller, command, change)

    async def _update_user(
        self, caller: Caller, command: ReplaceUser | PatchUser, change: Callable[[User], None]
    ) -> User:
        attempts = 0

        async def work(uow: UnitOfWork) -> User:
            # The first try takes no lock: load, change, and ONE statement (the append,
            # guarded by the stream's version, with the view's upsert), as Entra's PATCHes of
            # distinct users need. One that lost a race retries queued on the user's row lock
            # (as group writers do): under a burst of PATCHes to one user each retry loads the
            # state the previous one committed, instead of all racing on one version and
            # running out of retries.
            nonlocal attempts
            attempts += 1
            user = await _load_user(uow, command.user_id, command.if_match, lock=attempts > 1)
            if command.large or _many_values(user):
                await asyncio.to_thread(_domain, partial(change, user))
            else:
                _domain(partial(change, user))
            await _check_manager(uow, user)
            taken = _taken("User", user, user.state_view, command.unique)
            await _flush(uow, user.user_name, taken)
            return user

        return await self._retrying(caller, command.if_match, work)

    async def delete_user(self, caller: Caller, command: DeleteUser) -> None:
        """Hard delete; the user leaves every group it was in, as membership events on them."""

        async def work(uow: UnitOfWork) -> None:
            await uow.queue_for_groups_of(command.user_id)
            user = await _load_user(uow, command.user_id, command.if_match, lock=True)
            _domain(user.deprovision)
            await _leave_groups(uow, command.user_id)
            await uow.flush()

        await self._retrying(caller, command.if_match, work)

    # -- groups ---------------------------------------------------------------------------

    async def create_group(self, caller: Caller, command: CreateGroup) -> Group:
        group_id, edit = uuid.uuid4(), command.edit

        async def work(uow: UnitOfWork) -> Group:
            display_name = None if edit.display_name is UNSET else edit.display_name
            external_id = None if edit.external_id is UNSET else edit.external_id
            extensions = None if edit.extensions is UNSET else edit.extensions
            # A missing displayName is the domain's to refuse (InvalidValue), as any other.
            group = _domain(
                partial(
                    Group.create,
                    group_id,
                    caller.tenant_id,
                    display_name,  # type: ignore[arg-type]
                    external_id,
                    extensions,
                )
            )
            uow.add_group(group)
            await _change_members(uow, group, edit)
            taken = _taken("Group", group, group.extensions, self.documents.unique(edit.declared))
            await _flush(uow, group.display_name, taken, "displayName")
            return group

        return await self._retrying(caller, None, work)

    async def change_group(self, caller: Caller, command: ChangeGroup) -> Group:
        edit = command.edit

        async def work(uow: UnitOfWork) -> Group:
            group = await _load_group(uow, command.group_id, command.if_match)
            display_name = group.display_name if edit.display_name is UNSET else edit.display_name
            external_id = group.external_id if edit.external_id is UNSET else edit.external_id
            extensions = None if edit.extensions is UNSET else edit.extensions
            if edit.extension_ops:
                extensions = self.documents.patched_extensions(group.extensions, edit)
            if extensions is not None:
                self.documents.check_immutable(group.extensions, extensions, edit.declared)
            _domain(partial(group.update, display_name, external_id, extensions))
            await _change_members(uow, group, edit)
            taken = _taken("Group", group, group.extensions, self.documents.unique(edit.declared))
            await _flush(uow, group.display_name, taken, "displayName")
            return group

        return await self._retrying(caller, command.if_match, work)

    async def delete_group(self, caller: Caller, command: DeleteGroup) -> None:
        """The group goes, and leaves every group it was nested in, as membership events."""

        async def work(uow: UnitOfWork) -> None:
            await uow.queue_for_groups_of(command.group_id)
            group = await _load_group(uow, command.group_id, command.if_match)
            _domain(group.delete)
            await _leave_groups(uow, command.group_id)
            await uow.flush()

        await self._retrying(caller, command.if_match, work)


def _many_values(user: User) -> bool:
    state = user.state_view
    return sum(len(state.get(a) or ()) for a in MULTI_VALUED) > THREAD_USER_VALUES


async def _load_user(
    uow: UnitOfWork, user_id: UUID, if_match: str | None, *, lock: bool = False
) -> User:
    user = await (uow.user_for_update(user_id) if lock else uow.user(user_id))
    if user is None or user.deprovisioned:
        raise NotFound("User", str(user_id))
    if if_match is not None and not etag_matches(if_match, user.version):
        raise PreconditionFailed()
    return user


async def _check_manager(uow: UnitOfWork, user: User) -> None:
    """A manager must be a user of the same tenant (Entra sets it only once both exist)."""
    manager = user.state_view.get("manager")  # not `state`: a sorted copy of it all
    if manager is None:
        return
    if not any(
        type(e).__name__ in ("ManagerChanged", "UserProvisioned") for e in user.pending_events
    ):
        return
    if not await uow.user_exists(UUID(manager)):
        raise Invalid(f"manager {manager} is not a user of this tenant")


def _taken(
    resource_type: str,
    resource: User | Group,
    state: Mapping[str, Any],
    unique: tuple[Unique, ...],
) -> dict[str, tuple[str, Declared]]:
    """Index name -> the value a clash on it names, and how to find its holder, for the
    declared unique attributes the resource holds: each has a unique index per tenant
    (infra/schemas.py), so the write itself refuses a taken value, with no lock and no extra
    query."""
    out: dict[str, tuple[str, Declared]] = {}
    if not resource.pending_events:
        return out
    for attribute in unique:
        value = (state.get(attribute.urn) or {}).get(attribute.attribute)
        if value is not None:
            urn, name, exact, kind = (
                attribute.urn, attribute.attribute, attribute.case_exact, attribute.kind
            )  # fmt: skip
            index = index_name(resource_type, resource.tenant_id, urn, name, exact, kind)
            out[index] = (
                f"{urn}:{name} {str(value)[:100]!r}",
                Declared(resource_type, urn, name, exact, kind, value),
            )
    return out


async def _load_group(uow: UnitOfWork, group_id: UUID, if_match: str | None) -> Group:
    group = await uow.group(group_id)
    if group is None or group.deleted:
        raise NotFound("Group", str(group_id))
    if if_match is not None and not etag_matches(if_match, group.version):
        raise PreconditionFailed()
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
        raise Invalid(f"members not found in this tenant: {', '.join(sorted(bad)[:20])}")
    return out


async def _change_members(uow: UnitOfWork, group: Group, edit: GroupEdit) -> None:
    """Turn the requested change into the real delta, checked against the membership rows."""
    if not edit.touches_members:
        return
    adds = _canonical_ids(edit.adds, strict=True)
    removes = _canonical_ids(edit.removes, strict=False)
    if edit.clear_members:
        current = await uow.memberships.members(group.id)
        added, removed = adds - current, current - adds
    else:
        existing = await uow.memberships.members_among(group.id, adds | removes)
        added, removed = adds - existing, removes & existing
    if added:
        await _check_new_members(uow, group, added)
    displays = {}
    for raw, display in edit.displays.items():
        try:
            displays[str(UUID(raw))] = display
        except ValueError:
            continue
    _domain(
        partial(
            group.change_membership, [str(a) for a in added], [str(r) for r in removed], displays
        )
    )


async def _check_new_members(uow: UnitOfWork, group: Group, added: set[UUID]) -> None:
    """New members must be users or groups of this tenant, and no group may contain itself."""
    found, nested = await uow.memberships.joinable(added)
    missing = sorted(str(m) for m in added - found)
    if missing:
        raise Invalid(f"members not found in this tenant: {', '.join(missing[:20])}")
    if nested and await uow.memberships.would_contain_itself(group.id, nested):
        raise Invalid("adding these members would make a group contain itself")


async def _leave_groups(uow: UnitOfWork, member_id: UUID) -> None:
    # Read again under the member's lock: it may have joined a group since it queued.
    for group_id in await uow.memberships.groups_of(member_id):
        if not uow.queued_for(group_id):
            raise _GroupsChanged
        parent = await uow.group(group_id)
        if parent is not None and not parent.deleted:
            parent.change_membership([], [str(member_id)])


# The views' indexes over client text, by the attribute that feeds them.
_INDEXED_ATTRIBUTES = {
    "scim_users_user_name_uq": "userName",
    "scim_users_external_id_idx": "externalId",
    "scim_users_email_keys_idx": "emails",
    "scim_groups_display_name_uq": "displayName",
    "scim_groups_external_id_idx": "externalId",
}


async def _flush(
    uow: UnitOfWork,
    name: str,
    taken: Mapping[str, tuple[str, Declared]] | None = None,
    attribute: str = "userName",
) -> None:
    """Flush the unit of work; a value another resource holds is a 409 naming the attribute
    and the value (as Entra's provisioning logs do)."""
    try:
        await uow.flush()
    except asyncpg.UniqueViolationError as e:
        if is_unique_violation(e, "scim_users_user_name_uq"):
            raise Taken(f"{attribute} {name!r} is already taken", ("User", name)) from None
        if is_unique_violation(e, "scim_groups_display_name_uq"):
            raise Taken(f"{attribute} {name!r} is already taken", ("Group", name)) from None
        constraint = str(getattr(e, "constraint_name", None) or "")
        if INDEX_PREFIX in constraint:
            named = (taken or {}).get(constraint)
            if named is None:
                raise Taken("a declared unique attribute's value is already taken") from None
            raise Taken(f"{named[0]} is already taken", named[1]) from None
        raise
    except asyncpg.ProgramLimitExceededError as e:
        # A long value that does not compress outgrows an index entry (about 2.7 kB); the
        # transaction is rolled back whole.
        index = re.search(r'for index "([^"]+)"', str(e))
        what = _INDEXED_ATTRIBUTES.get(index.group(1), "a value") if index else "a value"
        raise Invalid(f"{what} is too long to be stored") from None


def _domain(command: Callable[[], T]) -> T:
    try:
        return command()
    except InvalidValue as e:
        raise Invalid(e.detail) from None
    except ResourceDeleted as e:
        raise NotFound("Resource", str(e.resource_id)) from None
