"""The User aggregate: one provisioned user of one tenant, kept as its canonical SCIM state.

Commands take a desired state, diff it with the current one and trigger only the events needed.
Each `@event` method is an event: its arguments are the stored fields and its body is how the
event changes the state, on first trigger and on every replay. Bodies never refuse; rules are
checked by the commands before anything is triggered.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.created import created
from domain.errors import AlreadyDeprovisioned, InvalidValue
from domain.schema import (
    ACTIVE,
    EMAILS,
    ENTERPRISE,
    ENTERPRISE_PREFIX,
    MANAGER,
    NAME,
    USER_ENTERPRISE_ATTRIBUTES,
    USER_MULTI_VALUED_ATTRIBUTES,
    USER_NAME,
    USER_STRING_ATTRIBUTES,
    extension_changes,
    is_extension_urn,
    normalise_user,
    respell_extensions,
    split_extension_attribute,
)

# Attributes with events of their own; every other one goes into UserAttributesChanged.
_OTHER_MULTI_VALUED = tuple(a for a in USER_MULTI_VALUED_ATTRIBUTES if a != EMAILS)


class User(Aggregate):
    """A user provisioned into one tenant; deprovisioning is final."""

    class EmailChanged(Aggregate.Event):
        """The user's emails, in full (an empty list clears them).

        Version 1 carried only the work address, as `email: str | None`; version 2 carries the
        SCIM multi-valued list, so type and primary survive.
        """

        class_version = 2
        emails: list[dict[str, Any]]

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            email = state.pop("email", None)
            state["emails"] = [{"primary": True, "type": "work", "value": email}] if email else []

    @event("UserProvisioned")
    def __init__(
        self,
        id: UUID,
        tenant_id: UUID,
        user_name: str,
        attributes: dict[str, Any],
    ) -> None:
        # `id` is consumed by the library (it becomes originator_id, not an event field).
        self._start(tenant_id, user_name, attributes)

    def _start(self, tenant_id: UUID, user_name: str, attributes: dict[str, Any]) -> None:
        self.tenant_id = tenant_id
        self.deprovisioned = False
        self._state: dict[str, Any] = {USER_NAME: user_name, **_copy(attributes)}

    # -- creation ---------------------------------------------------------------------------

    @staticmethod
    def normalise(state: Mapping[str, Any]) -> dict[str, Any]:
        """The canonical form of `state` (see domain.schema); raises InvalidValue."""
        return normalise_user(state)

    @classmethod
    def provision(cls, user_id: UUID, tenant_id: UUID, state: Mapping[str, Any]) -> User:
        """A new user with the caller's id; the only pending event is UserProvisioned."""
        # A new user is active unless the request says otherwise (the usual SCIM default).
        attributes = normalise_user(
            {ACTIVE: True, **{k: v for k, v in state.items() if v is not None}}
        )
        _check_manager(attributes, user_id)
        user_name = attributes.pop(USER_NAME)
        # What `cls(id=…, …)` does, without the library's generic path (domain.created): half
        # of this method's cost on every POST /Users. The same event and the same aggregate.
        provisioned = created(
            cls,
            cls.UserProvisioned,  # type: ignore[attr-defined]  # made by @event
            user_id,
            tenant_id=tenant_id,
            user_name=user_name,
            attributes=attributes,
        )
        user = object.__new__(cls)
        user.__base_init__(user_id, cls.INITIAL_VERSION, provisioned.timestamp)
        user._start(tenant_id, user_name, attributes)
        user.pending_events.append(provisioned)
        return user

    @classmethod
    def from_state(
        cls,
        user_id: UUID,
        version: int,
        tenant_id: UUID,
        state: Mapping[str, Any],
        created_on: datetime,
        modified_on: datetime,
        *,
        deprovisioned: bool = False,
        owned: bool = False,
    ) -> User:
        """Rebuild a user at `version` from a stored canonical state (as `user.state` returned).

        Events after `version` can then be applied with `event.mutate(user)`, as on a snapshot.
        `owned`: the caller hands `state` over (a freshly decoded row nothing else holds), so
        it is kept as it is instead of copied; a replay builds users from rows by the thousand.
        """
        user = object.__new__(cls)
        user.__base_init__(originator_id=user_id, originator_version=version, timestamp=created_on)
        user.modified_on = modified_on
        user.tenant_id = tenant_id
        user.deprovisioned = deprovisioned
        user._state = dict(state) if owned else _copy(dict(state))
        return user

    # -- read side --------------------------------------------------------------------------

    @property
    def state(self) -> dict[str, Any]:
        """The canonical state, sorted by key (a copy: changing it changes nothing)."""
        copied: dict[str, Any] = _copy(dict(sorted(self._state.items())))
        return copied

    @property
    def state_view(self) -> Mapping[str, Any]:
        """The canonical state itself, unsorted and not copied: for projections that read it at
        once (to write a row, to list its attributes) and never keep or change it."""
        return self._state

    @property
    def user_name(self) -> str:
        return str(self._state[USER_NAME])

    @property
    def active(self) -> bool:
        """Unassigned (a client removed it) counts as not active: access fails closed."""
        return self._state.get(ACTIVE) is True

    # -- commands ---------------------------------------------------------------------------

    def update(self, desired: Mapping[str, Any]) -> None:
        """Move to the desired state, triggering only the events needed (none if equal)."""
        self._check_not_deprovisioned()
        old = self._state
        new = respell_extensions(old, normalise_user(desired))
        _check_manager(new, self.id)

        if new[USER_NAME] != old[USER_NAME]:
            self._change_user_name(new[USER_NAME])
        if new.get(NAME) != old.get(NAME):
            self._change_name(new.get(NAME))
        if new.get(EMAILS) != old.get(EMAILS):
            self._change_emails(new.get(EMAILS, []))
        changed = _attribute_changes(old, new)
        if changed:
            self._change_attributes(changed)
        if new.get(MANAGER) != old.get(MANAGER):
            self._change_manager(new.get(MANAGER))
        if new.get(ACTIVE) != old.get(ACTIVE):
            if new.get(ACTIVE) is True:
                self._reactivate()
            elif new.get(ACTIVE) is False:
                self._deactivate()
            else:
                self._unassign_active()

    def deprovision(self) -> None:
        """Hard delete (SCIM DELETE). A second call raises AlreadyDeprovisioned."""
        self._check_not_deprovisioned()
        self._deprovision()

    def _check_not_deprovisioned(self) -> None:
        if self.deprovisioned:
            raise AlreadyDeprovisioned(self.id)

    # -- events -----------------------------------------------------------------------------

    @event("UserNameChanged")
    def _change_user_name(self, user_name: str) -> None:
        self._state[USER_NAME] = user_name

    @event("NameChanged")
    def _change_name(self, name: dict[str, str] | None) -> None:
        _put(self._state, NAME, name)

    @event(EmailChanged)
    def _change_emails(self, emails: list[dict[str, Any]]) -> None:
        _put(self._state, EMAILS, emails)

    @event("UserAttributesChanged")
    def _change_attributes(self, changed: dict[str, Any]) -> None:
        for key, value in changed.items():
            if is_extension_urn(key):
                urn, attribute = split_extension_attribute(key)
                extension = dict(self._state.get(urn, {}))
                _put(extension, attribute, value)
                _put(self._state, urn, dict(sorted(extension.items())))
            elif key.startswith(ENTERPRISE_PREFIX):
                enterprise = dict(self._state.get(ENTERPRISE, {}))
                _put(enterprise, key.removeprefix(ENTERPRISE_PREFIX), value)
                _put(self._state, ENTERPRISE, dict(sorted(enterprise.items())))
            else:
                _put(self._state, key, value)

    @event("ManagerChanged")
    def _change_manager(self, manager: str | None) -> None:
        _put(self._state, MANAGER, manager)

    @event("UserDeactivated")
    def _deactivate(self) -> None:
        self._state[ACTIVE] = False

    @event("UserReactivated")
    def _reactivate(self) -> None:
        self._state[ACTIVE] = True

    @event("UserActiveUnassigned")
    def _unassign_active(self) -> None:
        # RFC 7644 §3.5.2.2: a removed attribute is unassigned, and reads back absent.
        self._state.pop(ACTIVE, None)

    @event("UserDeprovisioned")
    def _deprovision(self) -> None:
        self.deprovisioned = True


def _check_manager(state: Mapping[str, Any], user_id: UUID) -> None:
    if state.get(MANAGER) == str(user_id):
        raise InvalidValue(MANAGER, "a user cannot be their own manager")


def _attribute_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """What UserAttributesChanged records: new values by canonical name, None for cleared."""
    changed: dict[str, Any] = {}
    for attribute in USER_STRING_ATTRIBUTES + _OTHER_MULTI_VALUED:
        if new.get(attribute) != old.get(attribute):
            changed[attribute] = new.get(attribute)
    old_enterprise = old.get(ENTERPRISE, {})
    new_enterprise = new.get(ENTERPRISE, {})
    for sub in USER_ENTERPRISE_ATTRIBUTES:
        if new_enterprise.get(sub) != old_enterprise.get(sub):
            changed[ENTERPRISE_PREFIX + sub] = new_enterprise.get(sub)
    changed.update(extension_changes(old, new))
    return dict(sorted(changed.items()))


def _put(target: dict[str, Any], key: str, value: Any) -> None:
    """Set a copy of `value`, or remove the key when the value is empty (cleared)."""
    if value is None or value == "" or value == [] or value == {}:
        target.pop(key, None)
    else:
        target[key] = _copy(value)


_CONTAINERS = (dict, list)  # (a tuple: `dict | list` inline builds a union on each call)


def _copy(value: Any) -> Any:
    """A deep copy of JSON-shaped state (dicts, lists, scalars); copy.deepcopy costs ~2.5x
    more, and a replay copies every user's state on every event."""
    if isinstance(value, dict):
        return {k: _copy(v) if isinstance(v, _CONTAINERS) else v for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) if isinstance(v, _CONTAINERS) else v for v in value]
    return value
