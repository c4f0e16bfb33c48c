"""The provisioning log's personal values, sealed under the data key of the subject an entry is
about (issue 17): erasing the subject makes them unreadable, whatever a scrub finds or not.

What is sealed. Of an entry (`audit_entries`) about a user or a group: its target's name and
external id, the old and new values of its modifiedProperties, its error's reason. The clear
columns then read `[encrypted]` (null stays null; the attribute names of modifiedProperties
stay, the shape of the change is not personal) and `sealed` holds the values. Of the
projection's copy of a resource (`audit_resources.state`): all of it, as `{"_sealed_": ...}`.
An entry about no subject (a schema declaration, a request that failed before it named one)
and a subject without a key row (a stream stored before encryption) stay in clear.

How. AES-256-GCM under the subject's data key (infra.keys), the tenant, the subject and the
row (the entry's transaction id) as associated data. The nonce is synthetic, an HMAC of the
associated data and the value under a key derived from the data key: the same values sealed
for the same row give the same bytes, so a rebuild makes the very rows the live projection
made and `projections verify` compares them as they are; equal nonces only ever seal equal
plaintexts, so GCM's one rule holds.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from uuid import UUID

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from infra.keys import _NONCE, KeyRing, latest_ring
from infra.sealing import ERASED, PLACEHOLDER, SEALED

SUBJECT_TYPES = ("User", "Group")
# A nonce no random one is expected to be (2^-96): the derivation of the HMAC key.
_DERIVE_NONCE = b"\xff" * _NONCE


def ring() -> KeyRing:
    return latest_ring()


async def load(conn: Any, subjects: Iterable[UUID | None]) -> KeyRing:
    """The key ring, with the keys of these subjects loaded (a missing row remembered)."""
    keys = ring()
    wanted = [s for s in set(subjects) if s is not None]
    if wanted:
        await keys.load(conn, wanted, missing_unreadable=True)
    return keys


def _seal(cipher: AESGCM, aad: bytes, value: Any) -> str:
    plain = orjson.dumps(value)
    mac_key = cipher.encrypt(_DERIVE_NONCE, bytes(32), b"scimledger:audit-nonce")[:32]
    nonce = hmac.digest(mac_key, aad + plain, "sha256")[:_NONCE]  # one call, in C
    return base64.b64encode(nonce + cipher.encrypt(nonce, plain, aad)).decode()


def _open(cipher: AESGCM | None, aad: bytes, text: str) -> Any:
    """The sealed value; None when it cannot be opened (the key is gone, or not this key)."""
    if cipher is None:
        return None
    raw = binascii.a2b_base64(text)  # base64.b64decode without its wrapper: once per entry
    try:
        return orjson.loads(cipher.decrypt(raw[:_NONCE], raw[_NONCE:], aad))
    except InvalidTag:
        return None


def _entry_aad(tenant_id: UUID, subject_id: UUID, transaction_id: int) -> bytes:
    return b"audit-entry:" + tenant_id.bytes + subject_id.bytes + transaction_id.to_bytes(8, "big")


# -- entries --------------------------------------------------------------------------------


def entry_subject(target_type: Any, target_id: Any) -> UUID | None:
    return target_id if target_type in SUBJECT_TYPES and isinstance(target_id, UUID) else None


def seal_entry(
    keys: KeyRing,
    tenant_id: UUID,
    transaction_id: int,
    subject_id: UUID | None,
    name: str | None,
    source: str | None,
    properties: list[dict[str, Any]],
    reason: str | None,
) -> tuple[str | None, str | None, list[dict[str, Any]], str | None, str | None]:
    """(name, source, properties, reason, sealed) as the entry's row stores them."""
    if subject_id is None or keys.is_absent(subject_id):
        return name, source, properties, reason, None
    _loaded(keys, subject_id)
    cipher = keys.cipher(subject_id)
    if cipher is None:  # erased: what the erasure's scrub leaves of an entry (projections.audit)
        return ERASED, None, [], ERASED if reason is not None else None, None
    values = [v for p in properties for v in (p.get("oldValue"), p.get("newValue"))]
    if name is None and source is None and reason is None and not values:
        return name, source, properties, reason, None
    sealed = _seal(cipher, _entry_aad(tenant_id, subject_id, transaction_id),
                   [name, source, values, reason])  # fmt: skip
    shown = [
        {
            **p,
            "oldValue": None if p.get("oldValue") is None else PLACEHOLDER,  # _hidden, inline
            "newValue": None if p.get("newValue") is None else PLACEHOLDER,
        }
        for p in properties
    ]
    return _hidden(name), _hidden(source), shown, _hidden(reason), sealed


def _loaded(keys: KeyRing, subject_id: UUID) -> None:
    """Never write a value in clear because its key was not loaded (or evicted since)."""
    if not keys.known(subject_id):
        raise LookupError(f"the data key of {subject_id} was not loaded before sealing")


def _hidden(value: Any) -> Any:
    return None if value is None else PLACEHOLDER


async def open_entries(conn: Any, rows: Sequence[Any]) -> list[dict[str, Any]]:
    """Entries' rows with their sealed values put back, or `[erased]` where they are gone."""
    from infra.detail_sealing import open_reasons
    from infra.group_labels import name_groups

    out = [dict(r) for r in rows]
    sealed = [r for r in out if r.get("sealed")]
    if not sealed:
        return await name_groups(conn, await open_reasons(conn, out))
    keys = await load(conn, (r["target_id"] for r in sealed))
    for r in sealed:
        subject = r["target_id"]
        aad = _entry_aad(r["tenant_id"], subject, r["transaction_id"])
        opened = _open(keys.cipher(subject), aad, r.pop("sealed"))
        if opened is None:
            name, source, values, reason = ERASED, None, None, ERASED
        else:
            name, source, values, reason = opened
        r["target_name"] = name
        r["source_id"] = source
        if r.get("error_reason") is not None:
            r["error_reason"] = reason
        r["modified_properties"] = _restore(r["modified_properties"], values)
    return await name_groups(conn, await open_reasons(conn, out))


def _restore(properties: Any, values: list[Any] | None) -> Any:
    if type(properties) is str:  # jsonb read without the pool's codec
        properties = orjson.loads(properties)
    source = iter(values) if values is not None else None
    out = []
    for p in properties or ():
        old, new = (next(source), next(source)) if source is not None else (ERASED, ERASED)
        p = dict(p)
        if p.get("oldValue") is not None:
            p["oldValue"] = old
        if p.get("newValue") is not None:
            p["newValue"] = new
        out.append(p)
    return out


# -- the projection's copy of a resource ----------------------------------------------------


def _state_aad(tenant_id: UUID, subject_id: UUID) -> bytes:
    return b"audit-resource:" + tenant_id.bytes + subject_id.bytes


def seal_state(
    keys: KeyRing, tenant_id: UUID, subject_id: UUID, state: Mapping[str, Any] | None
) -> Any:
    """A resource's state as `audit_resources` stores it: sealed if the subject has a key."""
    if state is None or keys.is_absent(subject_id):
        return state
    _loaded(keys, subject_id)
    cipher = keys.cipher(subject_id)
    if cipher is None:
        return state
    return {SEALED: _seal(cipher, _state_aad(tenant_id, subject_id), state)}


def open_state(keys: KeyRing, tenant_id: UUID, subject_id: UUID, stored: Any) -> Any:
    """The state `seal_state` stored (None: it cannot be read any more)."""
    if type(stored) is not dict or SEALED not in stored:
        return stored
    return _open(keys.cipher(subject_id), _state_aad(tenant_id, subject_id), stored[SEALED])
