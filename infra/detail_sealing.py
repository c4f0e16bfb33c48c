"""A failed request's error detail, sealed under the data key of the subject it is about
(issue 17): a 409 quotes the userName another user holds, a 400 may quote a value of the user
a PATCH or PUT tried to change. Erasing that subject makes the detail `[erased]`.

In the `RequestRecorded` event (stored_events): `error.detail` reads `[encrypted]`,
`error.sealedFor` names the subject and `error._sealed_` holds the detail, AES-256-GCM under
the subject's key with the record's id and the subject as associated data.

In the provisioning log (`audit_entries.error_reason`): the text `[sealed <subject id>]
<base64>`, the event's ciphertext as it is (the entry's id is the record's): the projection
needs no key for it, so a rebuild after an erasure writes the same row. An entry about a
subject seals its reason under its own key besides (infra.audit_sealing). Readers open it
through `open_reasons` (infra.audit_sealing.open_entries).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

from infra.audit_sealing import _open, _seal, load
from infra.keys import KeyRing
from infra.sealing import ERASED, PLACEHOLDER, SEALED

SEALED_FOR = "sealedFor"
_REASON_PREFIX = "[sealed "
_UUID_TEXT = 36


def _error_aad(record_id: UUID, subject_id: UUID) -> bytes:
    return b"request-error:" + record_id.bytes + subject_id.bytes


# -- the RequestRecorded event ---------------------------------------------------------------


async def seal_error(
    conn: Any, keys: KeyRing, record_id: UUID, subject_id: UUID | None, error: dict[str, Any]
) -> dict[str, Any]:
    """The error as the request record stores it: its detail sealed under the subject's key
    (in clear when there is no subject or it has no key row: a stream from before encryption;
    `[erased]` when the subject was erased)."""
    detail = error.get("detail")
    if subject_id is None or not isinstance(detail, str):
        return error
    await keys.load(conn, [subject_id], missing_unreadable=True)
    if keys.is_absent(subject_id) or not keys.known(subject_id):
        return error
    cipher = keys.cipher(subject_id)
    if cipher is None:
        return {**error, "detail": ERASED}
    sealed = _seal(cipher, _error_aad(record_id, subject_id), detail)
    # `required`: what the provisioning log's error code (MandatoryFieldsMissing) reads of it.
    return {**error, "detail": PLACEHOLDER, "required": "required" in detail,
            SEALED_FOR: str(subject_id), SEALED: sealed}  # fmt: skip


def sealed_reason(error: Mapping[str, Any]) -> str | None:
    """The reason an entry stores for a stored error whose detail is sealed: the event's
    ciphertext as it is, named by its subject (no key needed, so a rebuild after an erasure
    writes the very same row); None if the detail is not sealed."""
    subject, sealed = error.get(SEALED_FOR), error.get(SEALED)
    if not isinstance(subject, str) or not isinstance(sealed, str):
        return None
    return f"{_REASON_PREFIX}{subject}] {sealed}"


def reason_subject(reason: Any) -> UUID | None:
    if not isinstance(reason, str) or not reason.startswith(_REASON_PREFIX):
        return None
    try:
        return UUID(reason[len(_REASON_PREFIX) : len(_REASON_PREFIX) + _UUID_TEXT])
    except ValueError:
        return None


def open_reason(keys: KeyRing, record_id: UUID, reason: Any) -> Any:
    """The detail `sealed_reason` names, `[erased]` if it cannot be opened, else as it is."""
    subject = reason_subject(reason)
    if subject is None:
        return reason
    text = reason[len(_REASON_PREFIX) + _UUID_TEXT + 2 :]
    opened = _open(keys.cipher(subject), _error_aad(record_id, subject), text)
    return opened if isinstance(opened, str) else ERASED


async def open_reasons(conn: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries' rows (opened by infra.audit_sealing.open_entries) with the reasons
    `seal_reason` stored put back, in place."""
    subjects = {s for s in (reason_subject(r.get("error_reason")) for r in rows) if s}
    if not subjects:
        return rows
    keys = await load(conn, subjects)
    for r in rows:
        if reason_subject(r.get("error_reason")) is not None and isinstance(r.get("id"), UUID):
            r["error_reason"] = open_reason(keys, r["id"], r["error_reason"])
    return rows
