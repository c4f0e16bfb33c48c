"""One short function per SCIM write: load, call the domain, commit.

A write that loses a race on its stream (another request appended first) is retried from a
fresh load, unless the client sent If-Match: then the client's view is stale and it gets 412.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar
from uuid import UUID

import asyncpg

from domain.errors import InvalidValue, ResourceDeleted
from domain.user import User
from infra.database import Database
from infra.eventstore import ConcurrencyError
from service.errors import ScimError, invalid_value, not_found, precondition_failed, uniqueness
from service.unit_of_work import UnitOfWork, is_unique_violation

MAX_ATTEMPTS = 8
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks, and which request this is (it is stored with every event it causes)."""

    tenant_id: UUID
    request_id: str


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


async def provision_user(db: Database, caller: Caller, desired: Mapping[str, Any]) -> User:
    user_id = uuid.uuid4()
    async with UnitOfWork(db, caller.tenant_id, caller.request_id) as uow:
        user = _domain(lambda: User.provision(user_id, caller.tenant_id, desired))
        await _check_manager(uow, user)
        uow.add_user(user)
        await _flush(uow, user)
    return user


async def update_user(
    db: Database,
    caller: Caller,
    user_id: UUID,
    change: Callable[[User], None],
    if_match: str | None = None,
) -> User:
    """Apply `change` (a domain command on the loaded user) and commit what it triggered."""
    for _attempt in range(MAX_ATTEMPTS):
        try:
            async with UnitOfWork(db, caller.tenant_id, caller.request_id) as uow:
                user = await _load_user(uow, user_id, if_match)
                _domain(partial(change, user))
                await _check_manager(uow, user)
                await _flush(uow, user)
            return user
        except ConcurrencyError:
            if if_match is not None:
                raise precondition_failed() from None
    raise ScimError(409, "The resource is being changed by other requests; retry", "mutability")


async def deprovision_user(
    db: Database, caller: Caller, user_id: UUID, if_match: str | None = None
) -> None:
    await update_user(db, caller, user_id, lambda user: user.deprovision(), if_match)


async def _load_user(uow: UnitOfWork, user_id: UUID, if_match: str | None) -> User:
    user = await uow.user(user_id)
    if user is None or user.deprovisioned:
        raise not_found("User", str(user_id))
    if if_match is not None and not etag_matches(if_match, user.version):
        raise precondition_failed()
    return user


async def _check_manager(uow: UnitOfWork, user: User) -> None:
    """A manager must be a user of the same tenant (Entra sets it only once both exist)."""
    manager = user.state.get("manager")
    if not user.pending_events or manager is None:
        return
    if not any(
        type(e).__name__ in ("ManagerChanged", "UserProvisioned") for e in user.pending_events
    ):
        return
    if not await uow.user_exists(UUID(manager)):
        raise invalid_value(f"manager {manager} is not a user of this tenant")


async def _flush(uow: UnitOfWork, user: User) -> None:
    try:
        await uow.flush()
    except asyncpg.UniqueViolationError as e:
        if is_unique_violation(e, "scim_users_user_name_uq"):
            raise uniqueness(f"userName {user.user_name!r} is already taken") from None
        raise


def _domain(command: Callable[[], T]) -> T:
    try:
        return command()
    except InvalidValue as e:
        raise invalid_value(e.detail) from None
    except ResourceDeleted as e:
        raise not_found("Resource", str(e.resource_id)) from None
