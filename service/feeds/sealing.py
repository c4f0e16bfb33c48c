"""The feeds' signing keys at rest: sealed (AES-256-GCM) before they reach the database.

The sealing key, first found of:
1. `SCIMLEDGER_FEED_KEY`: 32 bytes, base64url;
2. derived (HKDF-SHA256) from `SCIMLEDGER_MASTER_KEY`, the deployment's master secret;
3. the file `feed-key` in the data directory (`SCIMLEDGER_DATA_DIR`, default `var`), made
   (mode 0600, 32 random bytes) on first use. Several instances need the same key: give them
   one of the variables, or the same file.

A sealed value is `sealed:v1:` + base64url(nonce || ciphertext), with the key's `kid` as the
associated data, so a sealed key copied onto another row does not open. A value without the
prefix is a key stored before sealing existed: it is read as it is and sealed when next loaded
(service/feeds/keys.py).
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PREFIX = "sealed:v1:"
KEY_FILE = "feed-key"
_cache: dict[tuple[str, str, str], bytes] = {}


class SealError(Exception):
    """A sealed key that does not open: the sealing key changed, or the row was tampered with."""


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sealing_key() -> bytes:
    feed = os.environ.get("SCIMLEDGER_FEED_KEY", "")
    master = os.environ.get("SCIMLEDGER_MASTER_KEY", "")
    data_dir = os.environ.get("SCIMLEDGER_DATA_DIR", "var")
    cached = _cache.get((feed, master, data_dir))
    if cached is not None:
        return cached
    if feed:
        key = _b64decode(feed)
        if len(key) != 32:
            raise SealError("SCIMLEDGER_FEED_KEY must be 32 bytes, base64url")
    elif master:
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"scimledger feed signing keys"
        ).derive(master.encode())
    else:
        key = _file_key(Path(data_dir) / KEY_FILE)
    _cache[(feed, master, data_dir)] = key
    return key


def _file_key(path: Path) -> bytes:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
    key = path.read_bytes()
    if len(key) != 32:
        raise SealError(f"{path} must hold 32 bytes")
    return key


def seal(kid: str, private_pem: str) -> str:
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(sealing_key()).encrypt(nonce, private_pem.encode(), kid.encode())
    return PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")


def is_sealed(stored: str) -> bool:
    return stored.startswith(PREFIX)


def unseal(kid: str, stored: str) -> str:
    """The PEM of a stored key (sealed, or plain from before sealing)."""
    if not is_sealed(stored):
        return stored
    raw = _b64decode(stored.removeprefix(PREFIX))
    try:
        return AESGCM(sealing_key()).decrypt(raw[:12], raw[12:], kid.encode()).decode()
    except (InvalidTag, ValueError):
        raise SealError(
            f"feed signing key {kid} does not open: SCIMLEDGER_FEED_KEY, SCIMLEDGER_MASTER_KEY"
            " or the data directory's feed-key is not the one it was sealed with"
        ) from None
