"""Key slots: the mailbox key wrapped under Argon2id(secret), as LUKS2 does for disks.

A mailbox key (MK) is 256 random bits. Each secret that may open the mailbox — the password,
every app password, the recovery key — has its own slot: ``ChaCha20-Poly1305(KEK, MK)`` with
``KEK = Argon2id(secret, salt, params)``. Changing a password rewraps one slot and re-encrypts
nothing. The slot's associated data binds it to its user and purpose, so a slot copied onto
another account or relabelled does not open.
"""

from __future__ import annotations

import hmac
import json
import secrets
from dataclasses import dataclass

from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

MAILBOX_KEY_BYTES = 32
SALT_BYTES = 16
NONCE_BYTES = 12
# Refuse slots whose stored parameters would let a tampered directory make us burn
# unbounded memory or time on one login (a denial of service by configuration).
MAX_MEMORY_KIB = 4 * 1024 * 1024
MAX_TIME_COST = 64
MIN_MEMORY_KIB = 8 * 1024


class WrongSecret(Exception):
    """The secret does not open this slot."""


class BadSlot(Exception):
    """The slot's stored parameters are malformed or outside the allowed range."""


@dataclass(frozen=True, slots=True)
class KDFParams:
    time_cost: int = 3
    memory_kib: int = 65536
    parallelism: int = 4

    def to_json(self) -> str:
        return json.dumps({"t": self.time_cost, "m": self.memory_kib, "p": self.parallelism})

    @classmethod
    def from_json(cls, text: str) -> KDFParams:
        try:
            d = json.loads(text)
            params = cls(int(d["t"]), int(d["m"]), int(d["p"]))
        except (ValueError, KeyError, TypeError):
            raise BadSlot("unreadable KDF parameters") from None
        if not (1 <= params.time_cost <= MAX_TIME_COST):
            raise BadSlot("KDF time cost out of range")
        if not (MIN_MEMORY_KIB <= params.memory_kib <= MAX_MEMORY_KIB):
            raise BadSlot("KDF memory out of range")
        if not (1 <= params.parallelism <= 64):
            raise BadSlot("KDF parallelism out of range")
        return params


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """What a slot stores: everything needed to unwrap, nothing that reveals MK."""

    salt: bytes
    nonce: bytes
    ciphertext: bytes
    params: KDFParams


def new_mailbox_key() -> bytes:
    return secrets.token_bytes(MAILBOX_KEY_BYTES)


def derive_kek(secret: bytes, salt: bytes, params: KDFParams) -> bytes:
    """Argon2id (RFC 9106). Slow by design: call it off the event loop."""
    return hash_secret_raw(
        secret=secret,
        salt=salt,
        time_cost=params.time_cost,
        memory_cost=params.memory_kib,
        parallelism=params.parallelism,
        hash_len=32,
        type=Type.ID,
    )


def wrap(mailbox_key: bytes, secret: bytes, params: KDFParams, context: bytes) -> WrappedKey:
    salt = secrets.token_bytes(SALT_BYTES)
    nonce = secrets.token_bytes(NONCE_BYTES)
    kek = derive_kek(secret, salt, params)
    ciphertext = ChaCha20Poly1305(kek).encrypt(nonce, mailbox_key, context)
    return WrappedKey(salt, nonce, ciphertext, params)


def unwrap(slot: WrappedKey, secret: bytes, context: bytes) -> bytes:
    """Return MK, or raise WrongSecret. The AEAD tag check is the password check."""
    kek = derive_kek(secret, slot.salt, slot.params)
    try:
        return ChaCha20Poly1305(kek).decrypt(slot.nonce, slot.ciphertext, context)
    except InvalidTag:
        raise WrongSecret from None


def lookup_tag(tag_key: bytes, secret: bytes) -> bytes:
    """A keyed tag that finds an app-password slot without trying every slot.

    Only used for generated app passwords and recovery keys, which carry ≥ 100 bits of
    entropy, so a fast keyed hash reveals nothing an attacker could brute-force. The user's
    chosen password never gets a tag: only Argon2id ever touches it.
    """
    return hmac.new(tag_key, secret, "sha256").digest()[:16]


# Generated secrets: an alphabet without look-alikes (no 0/o, 1/l/i), grouped for reading.
_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"


def generate_secret(groups: int, group_len: int = 4) -> str:
    """A random secret like ``abcd-efgh-…``; 5 bits per character."""
    chars = [secrets.choice(_ALPHABET) for _ in range(groups * group_len)]
    return "-".join("".join(chars[i : i + group_len]) for i in range(0, len(chars), group_len))


def normalise_generated(secret: str) -> bytes:
    """Accept a generated secret typed with any case, spaces or dashes."""
    return "".join(c for c in secret.lower() if c.isalnum()).encode()
