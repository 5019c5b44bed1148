"""Personal data in the abuse layer: client addresses and account names.

Both identify people, so they leave this package in exactly two ways: as log fields built by
:func:`subject` (the one place log anonymisation will hook in), and as keyed pseudonyms
(HMAC-SHA256 under a key derived from the caller's) wherever they are stored outside the
encrypted database — counter keys, Redis keys, greylisting triplets.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
# 128 bits of HMAC output: collisions between two clients' counters are out of reach, and
# counter keys stay short in Redis.
PSEUDONYM_BYTES = 16


def subject(ip: str | None = None, account: str | None = None) -> dict[str, str]:
    """The ``extra=`` fields naming whom a log record is about; nothing else names anyone."""
    fields: dict[str, str] = {}
    if ip is not None:
        fields["ip"] = ip
    if account is not None:
        fields["account"] = account
    return fields


def derive_key(key: bytes, purpose: str) -> bytes:
    """An independent subkey of the caller's abuse key for one purpose (HKDF, RFC 5869)."""
    if len(key) != KEY_BYTES:
        raise ValueError("abuse key must be 32 bytes")
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=b"postvern abuse v1",
        info=purpose.encode(),
    )
    return hkdf.derive(key)


def normalise_account(account: str) -> str:
    """Accounts compare case-insensitively (the directory's rule for login names)."""
    return account.strip().casefold()


def normalise_address(address: str) -> str:
    """Envelope addresses as greylisting and per-sender counters compare them.

    The domain is case-insensitive (RFC 5321 §2.4); the local part strictly is not, but every
    real mailbox provider treats it so, and a sender varying case must not get new counters.
    """
    return address.strip().strip("<>").casefold()


class Pseudonyms:
    """Keyed, stable pseudonyms: equal inputs give equal outputs, nothing gives the input back."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "Pseudonyms(<secret>)"

    def digest(self, kind: str, *parts: str) -> bytes:
        """The pseudonym of ``parts`` in the namespace ``kind``, as raw bytes."""
        message = "\0".join((kind, *parts)).encode("utf-8", "surrogatepass")
        return hmac.new(self._key, message, hashlib.sha256).digest()[:PSEUDONYM_BYTES]

    def text(self, kind: str, *parts: str) -> str:
        """The pseudonym as hex, for counter and Redis keys."""
        return self.digest(kind, *parts).hex()
