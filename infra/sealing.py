"""Sealing: the personal values of a user's or a group's event, sealed with its subject's data
key (infra.keys) on their way into the store, and put back (or `[erased]`) on their way out.

Of an event's fields, every leaf that is not null or a boolean is personal, except the ids, the
timestamp and `active`. In the stored state each sealed leaf reads `"[encrypted]"` and the
ciphertext of all of them (AES-256-GCM, the stream id and version as associated data), in walk
order, is in `_sealed_`; so the shape of a change (which attributes, how many emails) stays in
clear. An erased subject's events read `[erased]` where the values were.
"""

from __future__ import annotations

import base64
import os
from binascii import a2b_base64
from typing import Any, cast
from uuid import UUID

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper, StoredEvent
from eventsourcing.utils import get_topic, resolve_topic

from infra.keys import _NONCE, PERSONAL_MODULES, KeyRing, SubjectErased, uuids
from infra.transcoder import OrjsonTranscoder, _tag, _untag

SEALED = "_sealed_"
PLACEHOLDER = "[encrypted]"
ERASED = "[erased]"

# Event fields never sealed: ids, times, the library's own. And attributes kept in clear.
_CLEAR_FIELDS = frozenset(
    {
        "originator_id",
        "originator_version",
        "timestamp",
        "tenant_id",
        "originator_topic",
        "class_version",
        "added",
        "removed",
        "_displays_",  # members' displays, each sealed under its member's key (seal_displays)
    }
)
_CLEAR_ATTRIBUTES = frozenset({"active"})
_DICT_FIELDS = frozenset({"attributes", "changed"})
# Identity fields unique per tenant in the views: an erased one reads `[erased <id>]`, so that
# a replay of two erased subjects alive at once does not collide on the unique index.
_IDENTITY_FIELDS = frozenset({"user_name", "display_name"})


def seal(
    ring: KeyRing, state: dict[str, Any], topic_module: str, subject_id: UUID, version: int
) -> None:
    """Seal the personal values of an event's state in place (see the module's doc)."""
    cipher = ring.cipher(subject_id)
    if cipher is None:
        raise SubjectErased(subject_id)
    if DISPLAYS in state and topic_module == "domain.group":
        seal_displays(ring, state, subject_id, version)
    leaves = split(ring, state, topic_module)
    if leaves:
        nonce = os.urandom(_NONCE)
        sealed = cipher.encrypt(nonce, orjson.dumps(_tag(leaves)), _aad(subject_id, version))
        state[SEALED] = base64.b64encode(nonce + sealed).decode()


def _personal_fields(ring: KeyRing, state: dict[str, Any], topic_module: str) -> list[str]:
    """The fields of an event's state whose values are sealed: all but the clear ones (and a
    group's displayName when group names are not sealed)."""
    group_name_clear = topic_module == "domain.group" and not ring.encrypt_group_names
    return [
        field
        for field in state
        if field not in _CLEAR_FIELDS and not (group_name_clear and field == "display_name")
    ]


def split(ring: KeyRing, state: dict[str, Any], topic_module: str) -> list[Any]:
    """Take the personal values out of an event's state (in place), in walk order."""
    leaves: list[Any] = []
    for field in _personal_fields(ring, state, topic_module):
        value = state[field]
        if field in _DICT_FIELDS and type(value) is dict:
            state[field] = {
                k: (v if k in _CLEAR_ATTRIBUTES else _collect(v, leaves)) for k, v in value.items()
            }
        else:
            state[field] = _collect(value, leaves)
    return leaves


def unseal(
    ring: KeyRing, state: dict[str, Any], topic_module: str, subject_id: UUID, version: int
) -> None:
    """Put the sealed values back, or `[erased]` if the subject's key is gone."""
    sealed = state.pop(SEALED, None)
    if sealed is None:
        return
    # (Hot: a replay unseals most events of the store, some more than once. One look-up of the
    # key in the common case, base64 without the module's wrapper, the fields walked in place.)
    cipher = _cipher(ring, subject_id)  # none: erased, or its key row is lost
    leaves: list[Any] | None = None
    if cipher is not None:
        raw = a2b_base64(sealed)
        try:
            leaves = _untag(
                orjson.loads(cipher.decrypt(raw[:_NONCE], raw[_NONCE:], _aad(subject_id, version)))
            )
        except InvalidTag:
            leaves = None  # not this key: a key replaced since (a restored old backup)
    source = iter(leaves) if leaves is not None else None
    group_name_clear = topic_module == "domain.group" and not ring.encrypt_group_names
    for field, value in state.items():
        if field in _CLEAR_FIELDS or (group_name_clear and field == "display_name"):
            continue  # (the rule of _personal_fields)
        if field in _DICT_FIELDS and type(value) is dict:
            state[field] = {
                k: (v if k in _CLEAR_ATTRIBUTES else _restore(v, source)) for k, v in value.items()
            }
        elif source is None and field in _IDENTITY_FIELDS and type(value) is str:
            state[field] = f"{ERASED[:-1]} {subject_id}]"
        else:
            state[field] = _restore(value, source)


# -- a group's members' displays: each under its member's key -------------------------------
#
# A client's `display` of a member (GroupMembershipChanged.displays) is the member's name: it
# is sealed under the MEMBER's data key, not the group's, so erasing the member makes it
# unreadable in the group's events too (docs/erasure.md). Stored as `_displays_`, member id →
# base64 of nonce + ciphertext, the group id, its version and the member id as associated data.
# Events stored before this kept `displays` under the group's key, and still read so.

DISPLAYS = "displays"
SEALED_DISPLAYS = "_displays_"


def display_members(state: dict[str, Any]) -> list[UUID]:
    """The members whose keys reading this stored state needs (see EventStore.load_keys)."""
    sealed = state.get(SEALED_DISPLAYS)
    return uuids(sealed) if type(sealed) is dict else []


def seal_displays(ring: KeyRing, state: dict[str, Any], group_id: UUID, version: int) -> None:
    """Move `displays` to `_displays_`, each sealed under its member's key. A member whose
    key is not known (no key row: a stream from before encryption) loses its display."""
    displays = state.pop(DISPLAYS)
    sealed: dict[str, str] = {}
    for member, display in (displays or {}).items():
        try:
            member_id = UUID(member)
        except ValueError:
            continue
        cipher = ring.cipher(member_id)
        if cipher is None:
            continue
        nonce = os.urandom(_NONCE)
        aad = _display_aad(group_id, version, member_id)
        raw = cipher.encrypt(nonce, orjson.dumps(display), aad)
        sealed[member] = base64.b64encode(nonce + raw).decode()
    state[SEALED_DISPLAYS] = sealed


def unseal_displays(ring: KeyRing, state: dict[str, Any], group_id: UUID, version: int) -> None:
    """Put `displays` back from `_displays_`; `[erased]` for a member whose key is gone."""
    sealed = state.pop(SEALED_DISPLAYS)
    displays: dict[str, Any] = {}
    for member, text in (sealed or {}).items():
        member_id = UUID(member)
        cipher = _cipher(ring, member_id)
        display: Any = ERASED
        if cipher is not None:
            raw = a2b_base64(text)
            aad = _display_aad(group_id, version, member_id)
            try:
                display = orjson.loads(cipher.decrypt(raw[:_NONCE], raw[_NONCE:], aad))
            except InvalidTag:
                display = ERASED
        displays[member] = display
    state[DISPLAYS] = displays


def _cipher(ring: KeyRing, subject_id: UUID) -> AESGCM | None:
    """The subject's cipher; None if erased or without a key row; never a guess for a key
    that was not loaded."""
    cipher = ring.cipher(subject_id)
    if cipher is None and not ring.known(subject_id) and not ring.is_absent(subject_id):
        raise LookupError(f"the data key of {subject_id} was not loaded before decoding")
    return cipher


def _display_aad(group_id: UUID, version: int, member_id: UUID) -> bytes:
    return group_id.bytes + version.to_bytes(8, "big") + member_id.bytes


def _aad(subject_id: UUID, version: int) -> bytes:
    return subject_id.bytes + version.to_bytes(8, "big")


def _collect(value: Any, leaves: list[Any]) -> Any:
    if type(value) is dict:
        return {k: _collect(v, leaves) for k, v in value.items()}
    if type(value) is list:
        return [_collect(v, leaves) for v in value]
    if value is None or type(value) is bool:
        return value
    leaves.append(value)
    return PLACEHOLDER


def _restore(value: Any, source: Any) -> Any:
    if type(value) is dict:
        return {k: _restore(v, source) for k, v in value.items()}
    if type(value) is list:
        return [_restore(v, source) for v in value]
    if type(value) is str:
        return ERASED if source is None else next(source)
    return value


def is_personal_topic(topic: str) -> bool:
    return topic.split(":", 1)[0] in PERSONAL_MODULES


class SealingMapper(Mapper[UUID]):
    """The library's Mapper, sealing personal values on the way in and out (`KeyRing`)."""

    def __init__(self, keys: KeyRing) -> None:
        super().__init__(transcoder=OrjsonTranscoder())
        self.keys = keys

    def to_stored_event(self, domain_event: DomainEventProtocol[UUID]) -> StoredEvent:
        cls = type(domain_event)
        topic = get_topic(cls)
        event_state = dict(vars(domain_event))
        originator_id = event_state.pop("originator_id")
        originator_version = event_state.pop("originator_version")
        class_version = getattr(cls, "class_version", 1)
        if class_version > 1:
            event_state["class_version"] = class_version
        module = cls.__module__
        if module in PERSONAL_MODULES:
            seal(self.keys, event_state, module, originator_id, originator_version)
        return StoredEvent(
            originator_id=originator_id,
            originator_version=originator_version,
            topic=topic,
            state=self.transcoder.encode(event_state),
        )

    def to_domain_event(self, stored_event: StoredEvent) -> DomainEventProtocol[UUID]:
        return self.decoded(
            stored_event.topic,
            stored_event.state,
            cast(UUID, stored_event.originator_id),
            stored_event.originator_version,
        )

    def decoded(
        self, topic: str, stored: bytes, originator_id: UUID, version: int
    ) -> DomainEventProtocol[UUID]:
        """`to_domain_event` of a stored event's fields (a replay's, without a StoredEvent)."""
        cls = resolve_topic(topic)
        event_state: dict[str, Any] = self.transcoder.decode(stored)
        if SEALED_DISPLAYS in event_state:
            unseal_displays(self.keys, event_state, originator_id, version)
        if SEALED in event_state:
            unseal(self.keys, event_state, cls.__module__, originator_id, version)
        event: DomainEventProtocol[UUID] = made(cls, event_state, originator_id, version)
        return event


def made(cls: type, state: dict[str, Any], originator_id: UUID, version: int) -> Any:
    """The domain event of class `cls` from its decoded `state`, upcast to the class's version,
    made as the library's mapper makes it (no __init__)."""
    state["originator_id"] = originator_id
    state["originator_version"] = version
    class_version = getattr(cls, "class_version", 1)
    from_version = state.pop("class_version", 1)
    while from_version < class_version:
        getattr(cls, f"upcast_v{from_version}_v{from_version + 1}")(state)
        from_version += 1
    event: Any = object.__new__(cls)
    object.__setattr__(event, "__dict__", state)
    return event
