"""The sealed spool cipher: HPKE (RFC 9180) with the post-quantum hybrid KEM ML-KEM-768+X25519.

Mail for a locked mailbox is encrypted to the mailbox's public key, so the MX can accept it
without being able to read it back. Every key exchange is post-quantum (ML-KEM-768) and
classically safe (X25519) at once; the payload cipher is ChaCha20-Poly1305.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

SUITE = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
MLKEM_SEED_BYTES = 64
MLKEM_PUBLIC_BYTES = 1184
X25519_BYTES = 32
PRIVATE_BYTES = MLKEM_SEED_BYTES + X25519_BYTES
PUBLIC_BYTES = MLKEM_PUBLIC_BYTES + X25519_BYTES


class SealError(Exception):
    """A sealed item does not open with this key (wrong key, or tampered)."""


def generate_keypair() -> tuple[bytes, bytes]:
    """Return (private, public) as bytes: the ML-KEM seed ‖ X25519 scalar, and both public keys."""
    pq = mlkem.MLKEM768PrivateKey.generate()
    classic = x25519.X25519PrivateKey.generate()
    private = pq.private_bytes_raw() + classic.private_bytes_raw()
    public = pq.public_key().public_bytes_raw() + classic.public_key().public_bytes_raw()
    return private, public


def _public_key(public: bytes) -> hpke.MLKEM768X25519PublicKey:
    if len(public) != PUBLIC_BYTES:
        raise SealError("malformed public key")
    return hpke.MLKEM768X25519PublicKey(
        mlkem.MLKEM768PublicKey.from_public_bytes(public[:MLKEM_PUBLIC_BYTES]),
        x25519.X25519PublicKey.from_public_bytes(public[MLKEM_PUBLIC_BYTES:]),
    )


def _private_key(private: bytes) -> hpke.MLKEM768X25519PrivateKey:
    if len(private) != PRIVATE_BYTES:
        raise SealError("malformed private key")
    return hpke.MLKEM768X25519PrivateKey(
        mlkem.MLKEM768PrivateKey.from_seed_bytes(private[:MLKEM_SEED_BYTES]),
        x25519.X25519PrivateKey.from_private_bytes(private[MLKEM_SEED_BYTES:]),
    )


class Sealer:
    """Encrypts to one public key; cheap to keep per user."""

    __slots__ = ("_key",)

    def __init__(self, public: bytes) -> None:
        self._key = _public_key(public)

    def seal(self, plaintext: bytes, info: bytes) -> bytes:
        return SUITE.encrypt(plaintext, self._key, info=info)


class Opener:
    __slots__ = ("_key",)

    def __init__(self, private: bytes) -> None:
        self._key = _private_key(private)

    def __repr__(self) -> str:
        return "Opener(<secret>)"

    def open(self, ciphertext: bytes, info: bytes) -> bytes:
        try:
            return SUITE.decrypt(ciphertext, self._key, info=info)
        except Exception:  # the binding raises a generic error for any failure
            raise SealError("sealed item does not open with this key") from None
