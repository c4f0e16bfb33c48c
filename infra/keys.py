"""Crypto-shredding: a data key per subject, and the sealing of personal values in events.

Key hierarchy. The master key comes from configuration (`SCIMLEDGER_MASTER_KEY`, base64 of 32
bytes; or the file `SCIMLEDGER_MASTER_KEY_FILE`; by default `<data dir>/master.key`, created on
first start). It wraps one key-encryption key (KEK) per tenant and version (`tenant_keks`),
which wraps one data key per subject, a user or a group (`subject_keys`). All wrapping and all
sealing is AES-256-GCM (`cryptography`). Keys never go into events.

Sealing (infra.sealing): of a user's or a group's event, the personal values are sealed with
the subject's data key. Erasing a subject destroys its data key (the row stays, `wrapped`
NULL): its events then read `[erased]` where the values were.

Caching. Unwrapped keys are cached in memory, an LRU of `SCIMLEDGER_KEY_CACHE` subjects (an
evicted key row is read again when needed; docs/erasure.md). A write for a subject checks the
key row in the appending statement itself (see infra.eventstore_sql; a stream's first event
needs no check: an erased subject's stream has one already), so an erasure made on another
instance is effective at once; a reader of one stream re-reads the key row.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

import structlog
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from eventsourcing.domain import DomainEventProtocol

MASTER_ENV = "SCIMLEDGER_MASTER_KEY"
MASTER_FILE_ENV = "SCIMLEDGER_MASTER_KEY_FILE"
GROUP_NAMES_ENV = "SCIMLEDGER_ENCRYPT_GROUP_NAMES"
KEY_CACHE_ENV = "SCIMLEDGER_KEY_CACHE"
DEFAULT_KEY_CACHE = 100_000
MASTER_FILE = "master.key"

_NONCE = 12
# The events holding personal values: a user's and a group's.
PERSONAL_MODULES = ("domain.user", "domain.group")

_log = structlog.get_logger()

# Subjects this process has found erased (ids are unique UUIDs, whichever key ring saw them):
# the audit projection leaves their values out (projections.audit).
_ERASED_SUBJECTS: set[UUID] = set()


# The key ring this process made last (one master key per process): the provisioning log's
# projection and its readers seal and open with it (infra.audit_sealing).
_LATEST: list[KeyRing] = []


def _cache_size() -> int:
    text = os.environ.get(KEY_CACHE_ENV, "")
    try:
        size = int(text) if text.strip() else DEFAULT_KEY_CACHE
    except ValueError as e:
        raise ValueError(f"{KEY_CACHE_ENV}: not a number: {text!r}") from e
    if size < 1:
        raise ValueError(f"{KEY_CACHE_ENV}: at least 1, got {size}")
    return size


def latest_ring() -> KeyRing:
    if not _LATEST:
        raise RuntimeError("no key ring yet: open the database (or an EventStore) first")
    return _LATEST[0]


def is_erased(subject_id: UUID) -> bool:
    return subject_id in _ERASED_SUBJECTS


class SubjectErased(Exception):
    """The subject's data key was destroyed: nothing more can be written for it."""

    def __init__(self, subject_id: UUID) -> None:
        super().__init__(f"subject {subject_id} has been erased")
        self.subject_id = subject_id


# -- the master key ----------------------------------------------------------------------------


def master_id(master: bytes) -> str:
    """A name for a master key that does not reveal it."""
    return hashlib.sha256(b"scimledger-master-key:" + master).hexdigest()[:16]


def _decode_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError as e:
        raise ValueError(f"{where}: not base64") from e
    if len(key) != 32:
        raise ValueError(f"{where}: a master key is 32 bytes (base64), got {len(key)}")
    return key


def new_master_key_text() -> str:
    return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()


def load_master_key(data_dir: Path) -> bytes:
    """The configured master key; the embedded default creates `<data_dir>/master.key` once."""
    text = os.environ.get(MASTER_ENV)
    if text:
        return _decode_key(text, MASTER_ENV)
    file = os.environ.get(MASTER_FILE_ENV)
    path = Path(file) if file else data_dir / MASTER_FILE
    if not path.exists():
        if file:
            raise ValueError(f"{MASTER_FILE_ENV}: {path} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new_master_key_text() + "\n")
        try:
            os.link(tmp, path)  # atomic, and never replaces one another process made first
        except FileExistsError:
            pass
        else:
            _log.warning(
                "master key created",
                path=str(path),
                hint="keep a copy apart from the database backups: no event is readable without it",
            )
        finally:
            tmp.unlink()
    return _decode_key(path.read_text(encoding="utf-8"), str(path))


def _wrap(kek: AESGCM, key: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    return nonce + kek.encrypt(nonce, key, aad)


def _unwrap(kek: AESGCM, wrapped: bytes, aad: bytes) -> bytes:
    return kek.decrypt(wrapped[:_NONCE], wrapped[_NONCE:], aad)


def uuids(texts: Iterable[Any]) -> list[UUID]:
    """Those of `texts` that are UUIDs, as UUIDs (a client's member value may be anything)."""
    out = []
    for text in texts:
        try:
            out.append(UUID(text))
        except (TypeError, ValueError):
            continue
    return out


def _kek_aad(tenant_id: UUID, version: int) -> bytes:
    return b"kek:" + tenant_id.bytes + version.to_bytes(4, "big")


def _dk_aad(subject_id: UUID) -> bytes:
    return b"dk:" + subject_id.bytes


# -- the key ring ------------------------------------------------------------------------------


class KeyRing:
    """Tenant KEKs and subjects' data keys, unwrapped once and cached."""

    def __init__(
        self,
        master: bytes,
        *,
        encrypt_group_names: bool | None = None,
        cache_size: int | None = None,
    ) -> None:
        self._master = AESGCM(master)
        self.master_id = master_id(master)
        if encrypt_group_names is None:
            encrypt_group_names = os.environ.get(GROUP_NAMES_ENV, "1") not in ("0", "false", "no")
        self.encrypt_group_names = encrypt_group_names
        self._keks: dict[tuple[UUID, int], AESGCM] = {}
        self._current: dict[UUID, int] = {}
        self.cache_size = cache_size if cache_size is not None else _cache_size()
        # subject id -> its cipher, or None once erased; least recently used first.
        self._subjects: OrderedDict[UUID, AESGCM | None] = OrderedDict()
        # Subjects found without a key row (streams stored before encryption): their events
        # are in clear until `scimledger erase migrate`; a write makes them a key. Bounded the
        # same way (an evicted one is looked up again).
        self._absent: OrderedDict[UUID, None] = OrderedDict()
        _LATEST[:] = [self]  # the provisioning log's sealing uses it (infra.audit_sealing)

    # KEKs

    async def _kek(
        self, conn: Any, tenant_id: UUID, version: int | None = None
    ) -> tuple[int, AESGCM]:
        if version is None:
            version = self._current.get(tenant_id)
        if version is not None and (tenant_id, version) in self._keks:
            return version, self._keks[(tenant_id, version)]
        if version is None:
            row = await conn.fetchrow(
                "SELECT version, wrapped, master_id FROM tenant_keks WHERE tenant_id = $1"
                " ORDER BY version DESC LIMIT 1",
                tenant_id,
            )
            if row is None:
                wrapped = _wrap(
                    self._master, AESGCM.generate_key(bit_length=256), _kek_aad(tenant_id, 1)
                )
                await conn.execute(
                    "INSERT INTO tenant_keks (tenant_id, version, wrapped, master_id)"
                    " VALUES ($1, 1, $2, $3) ON CONFLICT DO NOTHING",
                    tenant_id,
                    wrapped,
                    self.master_id,
                )
                return await self._kek(conn, tenant_id)
        else:
            row = await conn.fetchrow(
                "SELECT version, wrapped, master_id FROM tenant_keks"
                " WHERE tenant_id = $1 AND version = $2",
                tenant_id,
                version,
            )
            if row is None:
                raise LookupError(f"tenant {tenant_id} has no key-encryption key {version}")
        if row["master_id"] != self.master_id:
            raise LookupError(
                f"tenant {tenant_id}'s key-encryption key is wrapped by master key"
                f" {row['master_id']}, not the configured one ({self.master_id})"
            )
        version = int(row["version"])
        kek = AESGCM(_unwrap(self._master, row["wrapped"], _kek_aad(tenant_id, version)))
        self._keks[(tenant_id, version)] = kek
        self._current[tenant_id] = max(version, self._current.get(tenant_id, 0))
        return version, kek

    # data keys

    def cipher(self, subject_id: UUID) -> AESGCM | None:
        """The subject's cipher if known (None: erased, or not loaded)."""
        return self._subjects.get(subject_id)

    def known(self, subject_id: UUID) -> bool:
        return subject_id in self._subjects

    def cached(self) -> int:
        """Subjects whose key (or its absence) is held in memory."""
        return len(self._subjects) + len(self._absent)

    def forget(self, subject_ids: Iterable[UUID]) -> None:
        for s in subject_ids:
            self._subjects.pop(s, None)
            self._absent.pop(s, None)

    def erased(self, subject_id: UUID) -> None:
        self._put(subject_id, None, frozenset())
        _ERASED_SUBJECTS.add(subject_id)

    def _put(self, subject_id: UUID, cipher: AESGCM | None, keep: Iterable[UUID]) -> None:
        """Cache a subject's key, most recently used; evict the least recently used past the
        cap, but none of `keep` (what the running load is loading)."""
        self._absent.pop(subject_id, None)
        self._subjects[subject_id] = cipher
        self._subjects.move_to_end(subject_id)
        self._evict(keep)

    def _put_absent(self, subject_id: UUID, keep: Iterable[UUID]) -> None:
        self._absent[subject_id] = None
        self._absent.move_to_end(subject_id)
        self._evict(keep)

    def _evict(self, keep: Iterable[UUID]) -> None:
        kept = keep if isinstance(keep, set | frozenset) else set(keep)
        for cache in (self._absent, self._subjects):
            while self.cached() > self.cache_size and cache:
                oldest = next(iter(cache))
                if oldest in kept:
                    break  # the rest is newer still: this load's own keys
                del cache[oldest]

    def _touch(self, subject_ids: Iterable[UUID]) -> None:
        for s in subject_ids:
            if s in self._subjects:
                self._subjects.move_to_end(s)
            elif s in self._absent:
                self._absent.move_to_end(s)

    async def load(
        self,
        conn: Any,
        subject_ids: Iterable[UUID],
        *,
        refresh: bool = False,
        missing_unreadable: bool = False,
        keep: Iterable[UUID] = (),
    ) -> None:
        """Load the data keys of these subjects (those not cached, or all with `refresh`).
        `missing_unreadable` (readers): a subject without a key row is remembered as such; its
        events read as stored (in clear if from before encryption, else `[erased]`)."""
        wanted = list(set(subject_ids))
        self._touch(wanted)
        asked = set(wanted).union(keep)
        if not refresh:
            wanted = [s for s in wanted if s not in self._subjects]
        if not wanted:
            self._evict(asked)  # what an earlier, larger batch left past the cap
            return
        rows = await conn.fetch(
            "SELECT subject_id, tenant_id, kek_version, wrapped FROM subject_keys"
            " WHERE subject_id = ANY($1::uuid[])",
            wanted,
        )
        for row in rows:
            await self._remember(conn, row, asked)
        if missing_unreadable:
            for s in wanted:
                if s not in self._subjects:
                    self._put_absent(s, asked)

    async def _remember(self, conn: Any, row: Any, keep: Iterable[UUID]) -> None:
        subject_id: UUID = row["subject_id"]
        if row["wrapped"] is None:
            self._put(subject_id, None, keep)
            _ERASED_SUBJECTS.add(subject_id)
            return
        _ERASED_SUBJECTS.discard(subject_id)
        _, kek = await self._kek(conn, row["tenant_id"], int(row["kek_version"]))
        self._put(subject_id, AESGCM(_unwrap(kek, row["wrapped"], _dk_aad(subject_id))), keep)

    async def prepare(
        self, conn: Any, tenant_id: UUID, events: Sequence[DomainEventProtocol[UUID]]
    ) -> list[tuple[UUID, int, bytes]]:
        """Make sure every personal event's subject has a key before its events are sealed.

        A new stream (version 1) gets a new key, returned as (subject, KEK version, wrapped)
        for the appending statement to insert. An older stream without a cached key has its key
        row read (or, for a stream written before encryption, a key made and stored now).
        Raises SubjectErased for an erased subject.
        """
        new: list[tuple[UUID, int, bytes]] = []
        missing: list[UUID] = []
        members: list[UUID] = []
        personal = [e for e in events if type(e).__module__ in PERSONAL_MODULES]
        for e in personal:
            # The members a membership change keeps a display of (sealed under their keys).
            members += uuids(getattr(e, "displays", None) or ())
        # This batch's keys stay cached until it is sealed (the cap may wait for the next load).
        batch = {e.originator_id for e in personal}.union(members)
        self._touch(batch)
        for e in personal:
            sid = e.originator_id
            if sid in self._subjects:
                if self._subjects[sid] is None:
                    raise SubjectErased(sid)
                continue
            if e.originator_version == 1:
                version, kek = await self._kek(conn, tenant_id)
                key = AESGCM.generate_key(bit_length=256)
                new.append((sid, version, _wrap(kek, key, _dk_aad(sid))))
                self._put(sid, AESGCM(key), batch)
            else:
                missing.append(sid)
        if missing:
            await self.load(conn, missing, keep=batch)
            for sid in missing:
                if sid not in self._subjects:
                    await self.create(conn, tenant_id, sid, keep=batch)
                if self._subjects.get(sid, None) is None:
                    raise SubjectErased(sid)
        if members:  # their displays are sealed under their own keys (infra.sealing)
            await self.load(conn, members, missing_unreadable=True, keep=batch)
        self._evict(batch)  # what an earlier, larger batch left past the cap
        return new

    async def create(
        self, conn: Any, tenant_id: UUID, subject_id: UUID, *, keep: Iterable[UUID] = ()
    ) -> None:
        """Store a key for a subject that has none yet (a stream from before encryption)."""
        version, kek = await self._kek(conn, tenant_id)
        key = AESGCM.generate_key(bit_length=256)
        await conn.execute(
            "INSERT INTO subject_keys (subject_id, tenant_id, kek_version, wrapped)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            subject_id,
            tenant_id,
            version,
            _wrap(kek, key, _dk_aad(subject_id)),
        )
        self._subjects.pop(subject_id, None)
        await self.load(conn, [subject_id], keep=keep)

    # rotation

    async def rotate(self, conn: Any, tenant_id: UUID, new_master: bytes | None = None) -> int:
        """A new KEK for the tenant; every live data key rewrapped with it (no event is
        touched). With `new_master`, every KEK of the tenant is rewrapped by it as well.
        Runs in the caller's transaction; returns the number of data keys rewrapped."""
        old_version, _ = await self._kek(conn, tenant_id)
        version = old_version + 1
        kek_key = AESGCM.generate_key(bit_length=256)
        master = AESGCM(new_master) if new_master is not None else self._master
        mid = master_id(new_master) if new_master is not None else self.master_id
        await conn.execute(
            "INSERT INTO tenant_keks (tenant_id, version, wrapped, master_id)"
            " VALUES ($1, $2, $3, $4)",
            tenant_id,
            version,
            _wrap(master, kek_key, _kek_aad(tenant_id, version)),
            mid,
        )
        new_kek = AESGCM(kek_key)
        rows = await conn.fetch(
            "SELECT subject_id, kek_version, wrapped FROM subject_keys"
            " WHERE tenant_id = $1 AND wrapped IS NOT NULL FOR UPDATE",
            tenant_id,
        )
        rewrapped: list[tuple[UUID, bytes]] = []
        for row in rows:
            _, kek = await self._kek(conn, tenant_id, int(row["kek_version"]))
            sid = row["subject_id"]
            key = _unwrap(kek, row["wrapped"], _dk_aad(sid))
            rewrapped.append((sid, _wrap(new_kek, key, _dk_aad(sid))))
        await conn.execute(
            "UPDATE subject_keys k SET wrapped = r.wrapped, kek_version = $2"
            " FROM unnest($1::uuid[], $3::bytea[]) AS r (subject_id, wrapped)"
            " WHERE k.subject_id = r.subject_id AND k.wrapped IS NOT NULL",
            [r[0] for r in rewrapped],
            version,
            [r[1] for r in rewrapped],
        )
        # Older KEKs wrap nothing any more: destroyed (an erased key stays destroyed too).
        await conn.execute(
            "DELETE FROM tenant_keks WHERE tenant_id = $1 AND version < $2", tenant_id, version
        )
        self._keks = {k: v for k, v in self._keks.items() if k[0] != tenant_id}
        self._current.pop(tenant_id, None)
        return len(rewrapped)

    def is_absent(self, subject_id: UUID) -> bool:
        """Found without a key row: a stream stored before encryption (in clear)."""
        return subject_id in self._absent
