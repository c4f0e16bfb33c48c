"""Turning a transaction's domain events into one stream's signed SETs, without I/O.

The producer (service/feeds/producer.py) decodes a batch of whole transactions (for a full
stream unsealing their personal values with the subjects' keys, which never leave the serving
process; for a notice stream only the externalIds, `shape_of`) and hands them here. `Signer`
serialises each SET's claims; they are signed here (`inline`) or, in a catch-up, by the signer
processes (`pooled`, service/feeds/signing.py): one core signs ~38,000 ES256 SETs a second.
An erased subject's changes become notices: attribute names, never values.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from eventsourcing.utils import resolve_topic

from domain.request import ProvisioningRequest
from infra.eventstore import RecordedEvent
from infra.keys import is_erased
from infra.sealing import PLACEHOLDER, SEALED, SEALED_DISPLAYS, made
from service.feeds import sets
from service.feeds.keys import SigningKey
from service.feeds.signing import SIGNERS

clock = time.time  # `iat` (tests fix it)
# (jti, kid, compact JWS, the subject whose personal values it carries)
Token = tuple[str, str, str, uuid.UUID | None]
# A SET before its signature: (jti, serialised claims, subject as in Token)
Unsigned = tuple[str, bytes, uuid.UUID | None]


@dataclass(frozen=True, slots=True)
class StreamView:
    """What building a stream's SETs needs of it (picklable, for the worker processes)."""

    id: uuid.UUID
    full: bool
    events: frozenset[str]
    scope_group: uuid.UUID | None


class Signer:
    """Signs the SETs of one batch for one stream: one key, issuer, audience and `iat`.

    A SET's `jti` is derived from what it reports, never drawn at random: the stream, the
    event's identity (the resource's id and its version after the change; a version belongs to
    one transaction, whatever global position a failover gives it) and the SET's index among
    those the change makes. A SET produced again (the producer's last commits lost in a crash
    or failover, service/feeds/producer.py) carries the same `jti`, so the receiver's
    de-duplication and an acknowledgement of either copy work (RFC 8417 §2.2: `jti` unique per
    SET; RFC 8936 §2.4: acknowledgements name it). An operator's `feeds reset` moves the stream
    to its next epoch, part of the derivation: a replay is new SETs, not a redelivery.
    """

    def __init__(
        self,
        key: SigningKey,
        issuer: str,
        audience: str,
        stream_id: uuid.UUID,
        epoch: int = 0,
        iat: int = 0,
    ) -> None:
        self.key = key
        self.issuer = issuer
        self.audience = audience
        self.iat = iat or int(clock())
        # `feeds reset` starts a new epoch: a replay's SETs are new ones (streams.reset).
        self._stream = stream_id.bytes + epoch.to_bytes(4, "big")
        self._head = b'{"iss":%s,"iat":%d,"jti":"' % (orjson.dumps(issuer), self.iat)
        self._aud = b'","aud":' + orjson.dumps(audience)

    def jti(self, resource_id: uuid.UUID, version: int, index: int) -> str:
        return jti_of(self._stream, resource_id, version, index)

    def __call__(
        self,
        identity: tuple[uuid.UUID, int, int],
        txn: str,
        subject: dict[str, Any],
        events: dict[str, Any],
        personal: uuid.UUID | None = None,
    ) -> Unsigned:
        """`personal`: the subject whose personal values the SET carries (a full form's data,
        an externalId), so an erasure finds it while it waits (service/feeds/erasure.py)."""
        jti = self.jti(*identity)
        # sets.claims' members in its order, serialised around the per-batch constants.
        payload = b"".join(
            (
                self._head,
                jti.encode(),
                self._aud,
                b',"txn":' + orjson.dumps(txn) if txn else b"",
                b',"sub_id":',
                orjson.dumps(subject),
                b',"events":',
                orjson.dumps(events),
                b"}",
            )
        )
        return jti, payload, personal

    def inline(self, unsigned: Sequence[Unsigned]) -> list[Token]:
        """These SETs signed in this process."""
        kid, sign = self.key.kid, self.key.sign_json
        return [(jti, kid, sign(payload), personal) for jti, payload, personal in unsigned]

    async def pooled(self, unsigned: Sequence[Unsigned]) -> list[Token]:
        """These SETs signed by a signer process (service/feeds/signing.py)."""
        key = self.key
        signed = await SIGNERS.sign(key.kid, key.private_pem, key.header, [u[1] for u in unsigned])
        return [(u[0], key.kid, token, u[2]) for u, token in zip(unsigned, signed, strict=True)]


def jti_of(stream: bytes, resource_id: uuid.UUID, version: int, index: int) -> str:
    """32 hex digits: a keyed-by-stream digest, so one change's SETs on two streams (or two
    SETs of one change) never share a `jti`, and a stream's `jti`s reveal nothing else."""
    tail = version.to_bytes(8, "big") + index.to_bytes(4, "big")
    return hashlib.blake2b(resource_id.bytes + tail, digest_size=16, key=stream).hexdigest()


# A notice (RFC 9967 §2.4: attribute names) needs no personal value but the subject's
# externalId (its `sub_id`, §2.1), sealed like the others: an event that holds one is unsealed.
_HOLDS_VALUES = (
    b'"externalId":"' + PLACEHOLDER.encode(),
    b'"external_id":"' + PLACEHOLDER.encode(),
)
_CLASSES: dict[str, Any] = {}


def holds_values(record: RecordedEvent) -> bool:
    """Whether a notice SET of this event needs one of its sealed values (an externalId)."""
    state = record.state
    return _HOLDS_VALUES[0] in state or _HOLDS_VALUES[1] in state


def shape_of(record: RecordedEvent) -> Any:
    """The domain event with its personal values left sealed (`[encrypted]`, no key needed):
    its kind, ids and the names of what it set, all a notice SET reports. The mapper's
    decoding (infra/sealing.py SealingMapper.to_domain_event) without the unsealing; a
    catch-up's notices cost no key and no decryption."""
    cls = _CLASSES.get(record.topic)
    if cls is None:
        cls = _CLASSES[record.topic] = resolve_topic(record.topic)
    # Not untagged (OrjsonTranscoder): its tenant and timestamp stay {"_type_", "_data_"},
    # which no SET reports, and their UUID and datetime cost as much as the rest of it.
    state: dict[str, Any] = orjson.loads(record.state)
    state.pop(SEALED, None)
    state.pop(SEALED_DISPLAYS, None)  # members' displays: not in a notice
    return made(cls, state, record.originator_id, record.originator_version)


def by_request(records: Sequence[RecordedEvent]) -> list[list[RecordedEvent]]:
    """The records split by SCIM request, in the log's order: a request's events are one
    append (consecutive in its transaction), and a group commit puts several requests in one
    transaction, each with its own `txn` (RFC 9967 §2.2)."""
    out: list[list[RecordedEvent]] = []
    for record in records:
        if out and (last := out[-1][0]).transaction_id == record.transaction_id and (
            last.request_id == record.request_id
        ):
            out[-1].append(record)
        else:
            out.append([record])
    return out


def method_of(decoded: Sequence[Any]) -> str | None:
    """The SCIM request's HTTP method (PUT makes `prov:put`, RFC 9967 §2.4.3)."""
    method: str | None = None
    for event in decoded:
        if isinstance(event, ProvisioningRequest.Event):
            method = str(getattr(event, "request", {}).get("method") or "") or None
    return method


def txn_of(transaction: Sequence[RecordedEvent]) -> str:
    """txn (RFC 9967 §2.2): the request's change id, the same on every stream (a write
    without a request id: its transaction's)."""
    return transaction[0].request_id or f"tx-{transaction[0].transaction_id}"


def needs_resource(change: sets.Change, method: str | None, stream: StreamView) -> bool:
    """`prov:put:full` data is the whole resource after the change: read from the store."""
    return stream.full and change.data is None and method == "PUT" and not _erased(change)


def emit(
    changes: Sequence[sets.Change],
    method: str | None,
    txn: str,
    stream: StreamView,
    members: set[str] | None,
    sign: Signer,
    joined: list[str],
    left: list[str],
) -> list[Unsigned]:
    """The SETs of one transaction's changes for one stream, in order. `members` (the scope
    group's members, for a scoped stream) is updated, and who joined or left is recorded."""
    out: list[Unsigned] = []
    for change in changes:
        rid = str(change.resource_id) if members is not None else ""
        entering: list[str] = []
        leaving: list[str] = []
        if members is not None:
            if change.resource_type == "Group" and change.resource_id == stream.scope_group:
                members.add(rid)
                entering = [m for m in change.added if m not in members]
                leaving = [m for m in change.removed if m in members]
            if rid not in members and not entering and not leaving:
                continue
        # An erased subject (issue 17): notices only, naming attributes, never values.
        erased = _erased(change)
        if erased:
            change.external_id = None
        full = stream.full and not erased
        events = sets.payload_events(change, method=method, full=full, wanted=stream.events)
        index = 0
        if events:
            personal = change.resource_id if full or change.external_id else None
            identity = (change.resource_id, change.version, index)
            out.append(sign(identity, txn, sets.sub_id(change), events, personal))
        if change.deleted and members is not None:
            members.discard(rid)
            left.append(rid)
        # RFC 9967 §2.3: a member that joins or leaves the scope group enters or leaves the
        # stream (after the group's own patch, in the same transaction).
        for member, uri, gone in [(m, sets.FEED_ADD, False) for m in entering] + [
            (m, sets.FEED_REMOVE, True) for m in leaving
        ]:
            assert members is not None
            if gone:
                members.discard(member)
                left.append(member)
            else:
                members.add(member)
                joined.append(member)
            index += 1  # the member's SET: the group's change is the event it reports
            if uri.removeprefix(sets.PREFIX) in stream.events:
                identity = (change.resource_id, change.version, index)
                subject = sets.feed_subject("User", member, None)
                out.append(sign(identity, txn, subject, {uri: {}}))
    return out


def _erased(change: sets.Change) -> bool:
    return is_erased(change.resource_id)
