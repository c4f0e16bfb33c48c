"""Feeds, issue 18's third round: a catch-up signed by the signer processes is byte for byte
the catch-up signed by the producer alone (deterministic ES256), and valid against the JWKS;
a notice stream that leaves events sealed reports what unsealing them reports."""

from __future__ import annotations

import os
import signal
import sys
import types
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from infra.config import Settings
from infra.database import Database
from infra.eventstore import START
from infra.tenants import IssuedToken
from service.feeds import batch, build, sets, signing
from service.feeds.keys import current_key, jwks
from service.feeds.producer import Producer, read_log
from tests.test_entra_users import create as create_user
from tests.test_entra_users import patch as patch_user
from tests.test_feeds import _verify, serving
from tests.test_feeds_catchup import BASE, _history, _produce, _stream


async def _replay(database: Database, stream_id: uuid.UUID) -> None:
    """The stream from the start again, in the same epoch: the same jtis (not a reset)."""
    async with database.pool.acquire() as conn:
        await conn.execute("DELETE FROM feed_sets WHERE stream_id = $1", stream_id)
        await conn.execute(
            "UPDATE feed_streams SET checkpoint_transaction = 0, checkpoint_position = 0"
            " WHERE id = $1",
            stream_id,
        )


@pytest.mark.parametrize("full", [False, True])
async def test_the_signer_processes_sign_what_the_producer_alone_signs(
    settings: Settings,
    database: Database,
    tenant: IssuedToken,
    auth: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    full: bool,
) -> None:
    async with serving(settings, database) as client:
        await _history(client, auth)
        for i in range(4):
            user = await create_user(client, auth, user_name=f"more{i}@example.com")
            off = {"op": "replace", "path": "active", "value": False}
            await patch_user(client, auth, user["id"], off)
    stream_id = await _stream(database, "signed", full=full)
    monkeypatch.setattr(build, "clock", lambda: 1_700_000_000.0)  # one iat for all runs
    monkeypatch.setattr(batch, "SIGNERS", signing.SignerPool(0))
    alone = await _produce(database, Producer(database, lambda: BASE), stream_id)

    pool = signing.SignerPool(2)
    monkeypatch.setattr(build, "SIGNERS", pool)
    monkeypatch.setattr(batch, "SIGNERS", pool)
    monkeypatch.setattr(batch, "POOL_FROM", 1)  # every step through the pool,
    monkeypatch.setattr(batch, "CHUNK", 3)  # in chunks that split transactions
    await _replay(database, stream_id)
    try:
        pooled = await _produce(database, Producer(database, lambda: BASE), stream_id)
        assert pool._pool is not None  # the signer processes did sign
        # A signer killed: the pool is dropped and the chunk signed here, the same tokens.
        processes = list(pool._pool._processes.values())
        os.kill(processes[0].pid, signal.SIGKILL)
        processes[0].join(10)
        await _replay(database, stream_id)
        recovered = await _produce(database, Producer(database, lambda: BASE), stream_id)
    finally:
        pool.close()
    assert len(alone) >= 15
    assert pooled == alone
    assert recovered == alone
    async with database.pool.acquire() as conn:
        keys = await jwks(conn)
    claims = _verify(pooled, keys)
    assert len({c["jti"] for c in claims}) == len(claims)
    assert {c["iat"] for c in claims} == {1_700_000_000}


async def test_a_signer_process_does_not_run_the_main_module_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signer needs signing.py alone: spawning one must not run the parent's main module (under
    `serve` the CLI, which imports the whole service) as multiprocessing's spawn does."""
    ran = tmp_path / "ran"
    script = tmp_path / "cli.py"
    script.write_text(f"open({str(ran)!r}, 'w').close()\n")
    main = types.ModuleType("__main__")
    main.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", main)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    header = signing.b64(b'{"alg":"ES256","kid":"k"}') + b"."
    pool = signing.SignerPool(1)
    try:
        payloads = [b'{"jti":"1"}', b'{"jti":"2"}']
        tokens = await pool.sign("k", pem, header, payloads)
        assert pool._pool is not None  # signed by a signer process, not inline
        assert tokens == signing.SignerPool.inline("k", pem, header, payloads)
    finally:
        pool.close()
    assert not ran.exists()
    assert main.__file__ == str(script) and main.__spec__ is None  # put back


async def test_inline_signatures_are_deterministic_and_verify(
    database: Database, tenant: IssuedToken
) -> None:
    async with database.pool.acquire() as conn:
        key = await current_key(conn, tenant.tenant_id)
        keys = await jwks(conn)
    payloads = [b'{"iss":"x","jti":"%d","events":{}}' % i for i in range(5)]
    inline = signing.SignerPool.inline(key.kid, key.private_pem, key.header, payloads)
    assert inline == [key.sign_json(p) for p in payloads]
    assert [c["jti"] for c in _verify(inline, keys)] == ["0", "1", "2", "3", "4"]


def _notice_view(change: sets.Change) -> tuple[Any, ...]:
    """What a notice SET reports of a change (RFC 9967 §2.4 attribute names, sub_id)."""
    names = sets.created_names(change) if change.created else list(change.attributes)
    return (
        change.resource_type,
        change.resource_id,
        change.version,
        change.created,
        change.deleted,
        change.activated,
        change.deactivated,
        change.external_id,
        names,
        change.added,
        change.removed,
    )


async def test_a_notice_stream_reads_sealed_events_as_unsealing_them_would(
    settings: Settings, database: Database, tenant: IssuedToken, auth: dict[str, str]
) -> None:
    async with serving(settings, database) as client:
        await _history(client, auth)  # users with externalIds, extensions, a group, a PUT
        user = await create_user(client, auth, user_name="kim@example.com")
        await patch_user(
            client,
            auth,
            user["id"],
            {"op": "replace", "path": "name.givenName", "value": "Kim"},
            {"op": "replace", "path": "externalId", "value": "kim-2"},
            {"op": "remove", "path": "title"},
        )
    made = Producer(database, lambda: BASE)
    async with database.pool.acquire() as conn:
        records = await read_log(conn, START, 10_000)
        await database.store.load_keys(conn, records)
        shaped: list[tuple[Any, ...]] = []
        unsealed: list[tuple[Any, ...]] = []
        for transaction in build.by_request(records):
            valued = {id(r) for r in transaction if build.holds_values(r)}
            notice = await made._decoded(conn, transaction, valued)
            full = [database.store.to_domain(r) for r in transaction]
            shaped += [_notice_view(c) for c in sets.changes_of(notice)]
            unsealed += [_notice_view(c) for c in sets.changes_of(full)]
            assert build.method_of(notice) == build.method_of(full)
    assert len(shaped) > 10
    assert shaped == unsealed
    assert any(view[7] == "kim-2" for view in shaped)  # an externalId, unsealed for sub_id
    # Most events a notice stream reads stay sealed: only those with an externalId are opened.
    assert sum(build.holds_values(r) for r in records) < len(records) / 2


def test_the_raw_signature_is_the_der_one_re_encoded() -> None:
    """signing.raw_signature (a slice of the DER) gives what decoding the DER gives, also for
    an R or S shorter than 32 bytes (its leading byte zero) and one with a sign byte."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    key = ec.generate_private_key(ec.SECP256R1())
    lengths: set[int] = set()
    for i in range(3000):
        der = key.sign(b"m%d" % i, signing._ECDSA)
        r, s = decode_dss_signature(der)
        assert signing.raw_signature(der) == r.to_bytes(32, "big") + s.to_bytes(32, "big")
        lengths.add(der[3])
    assert {31, 32, 33} <= lengths  # short, plain and signed R were all met
