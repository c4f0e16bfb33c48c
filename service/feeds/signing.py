"""ES256 signatures of SETs (RFC 7518 §3.4), in this process or, for a catch-up, in signer
processes on the other core(s).

One signature costs ~35 µs of OpenSSL (bench.feeds), half of a SET's whole cost, and the
producer's process is one core (Python 3.11's GIL: a signing thread would wait for it after
every signature). So a step with many SETs hands chunks of serialised claims to a small pool
of spawned processes (`SCIMLEDGER_FEED_SIGNERS`, default 2; 0: none) while it builds the next
ones. The tenant's private key goes to a signer with each chunk, over the pool's pipe (never
disk or the environment), and lives in that process's memory only, like the producer's.

Signatures are deterministic (RFC 6979, OpenSSL >= 3.2): the same claims signed again, in
any process, give the same token, so a SET produced again after a lost commit is the same
bytes, and the pool's tokens are the inline ones (tests/test_feeds_signing.py).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import Any

import structlog
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

log = structlog.get_logger("scimledger.feeds")
# A step's SETs go to the pool from this many on (a live write's few are signed inline: the
# round trip to a signer would cost more than the signatures).
POOL_FROM = 200
CHUNK = 250  # SETs per task: the first chunk is signed while the next ones are built
RETRY_AFTER = 60.0


def _ecdsa() -> ec.ECDSA:
    try:
        return ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
    except UnsupportedAlgorithm:  # OpenSSL < 3.2: random k, still a valid ES256 signature
        return ec.ECDSA(hashes.SHA256())


_ECDSA = _ecdsa()
_LOADED: dict[str, Any] = {}  # kid -> private key, in a signer process


def b64(data: bytes) -> bytes:
    """base64url without padding (RFC 7515 §2)."""
    return binascii.b2a_base64(data, newline=False).rstrip(b"=").translate(_URLSAFE)


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def compact(key: Any, header: bytes, payload: bytes) -> str:
    """The compact JWS (RFC 7515 §7.1) of one serialised claims set: `header` is the encoded
    protected header and its dot; the signature is R || S, 32 bytes each (RFC 7518 §3.4)."""
    signing_input = header + b64(payload)
    return (signing_input + b"." + b64(raw_signature(key.sign(signing_input, _ECDSA)))).decode()


def raw_signature(der: bytes) -> bytes:
    """R || S of a DER ECDSA-Sig-Value (SEQUENCE of two INTEGERs; a P-256 one is under 128
    bytes, so every length is one byte): each integer without its sign byte, left-padded to
    32 bytes. A slice, not cryptography's decode_dss_signature and two int conversions: ~2 µs
    of a catch-up's SET (bench.feeds)."""
    r_len = der[3]
    r, s = der[4 : 4 + r_len], der[6 + r_len :]
    return r[-32:].rjust(32, b"\0") + s[-32:].rjust(32, b"\0")


def sign_chunk(kid: str, pem: str, header: bytes, payloads: Sequence[bytes]) -> list[str]:
    """In a signer process: the compact JWS of each payload, in order."""
    key = _LOADED.get(kid)
    if key is None:
        if len(_LOADED) >= 100:
            _LOADED.clear()
        key = _LOADED[kid] = serialization.load_pem_private_key(pem.encode(), password=None)
    return [compact(key, header, p) for p in payloads]


@contextlib.contextmanager
def _main_not_inherited() -> Iterator[None]:
    """While a signer is spawned, the parent's `__main__` is not named to it. A spawned child
    otherwise runs the parent's main module again before anything else (multiprocessing's
    "safe importing of main module"): under `serve` the CLI, which imports the whole service,
    ~0.4-0.8 s of CPU per signer (bench.feeds); a signer needs only this module (~0.1 s), which
    unpickling `sign_chunk` imports. The names are put back before the spawn returns."""
    names = vars(sys.modules["__main__"])
    saved: dict[str, Any] = {n: names[n] for n in ("__spec__", "__file__") if n in names}
    names["__spec__"] = None
    names.pop("__file__", None)
    try:
        yield
    finally:
        names.pop("__spec__", None)
        names.update(saved)


class _SignerProcess(SpawnProcess):
    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        with _main_not_inherited():
            return SpawnProcess._Popen(process_obj)


class _SignerContext(SpawnContext):
    """Spawn (nothing of this process inherited), without the main module (above)."""

    Process = _SignerProcess


def _workers() -> int:
    raw = os.environ.get("SCIMLEDGER_FEED_SIGNERS")
    return max(0, int(raw)) if raw else 2


class SignerPool:
    """The signer processes, started at the first catch-up and kept. A broken pool (a signer
    killed, or one that could not start) is dropped and the producer signs alone for
    `RETRY_AFTER` seconds, then a new pool is tried."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = _workers() if workers is None else workers
        self._pool: ProcessPoolExecutor | None = None
        self._broken_at = -RETRY_AFTER  # monotonic time the pool last broke

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=_SignerContext())
        return self._pool

    async def sign(self, kid: str, pem: str, header: bytes, payloads: list[bytes]) -> list[str]:
        """The tokens of these payloads, signed by a signer process (inline if none)."""
        if self.workers == 0 or not payloads or self._broken_at + RETRY_AFTER > time.monotonic():
            return self.inline(kid, pem, header, payloads)
        loop = asyncio.get_running_loop()
        try:
            executor = self._executor()
            return await loop.run_in_executor(executor, sign_chunk, kid, pem, header, payloads)
        except BrokenExecutor as e:
            if self._pool is not None:  # once per broken pool, not once per chunk
                log.warning("feed signer lost, signing inline", error=f"{type(e).__name__}: {e}")
            self._broken_at = time.monotonic()
            self.close()
            return self.inline(kid, pem, header, payloads)

    @staticmethod
    def inline(kid: str, pem: str, header: bytes, payloads: Sequence[bytes]) -> list[str]:
        return sign_chunk(kid, pem, header, payloads)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


SIGNERS = SignerPool()
