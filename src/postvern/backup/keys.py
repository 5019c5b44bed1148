"""The keys of a backup: the offline key pair, the server's wrap and signing keys.

* The **offline backup key** is an HPKE key pair of the spool's suite (ML-KEM-768 + X25519,
  :mod:`postvern.crypto.seal`). Its public half lives on the server
  (``backup/offline.pub``); its private half is printed once by ``postvern backup init`` and
  never kept. With it alone, a fresh machine opens every snapshot and the server key sealed in
  it (disaster recovery).
* The **wrap key** (HKDF of the server key, purpose ``backup key wrap``) wraps each
  snapshot's key a second time, so the running server can verify its own backups.
* The **signing key** (Ed25519, RFC 8032; its seed is HKDF of the server key, purpose
  ``backup manifest signing``) signs every manifest. On the server it verifies with its own
  public half. A fresh machine has no server key yet — and the HPKE wrap to the offline key is
  not authentic (anyone holding the public half can make one) — so the printed offline key
  carries the signing *public* key with it: what the operator wrote down at ``backup init``
  is what a restore trusts, never anything read from the bucket.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from postvern.crypto import seal
from postvern.crypto.serverkey import ServerKey

BACKUP_DIR = "backup"
OFFLINE_PUBLIC_FILE = "offline.pub"
# The printed offline key: a prefix naming the format, then base64url of the HPKE private key
# (ML-KEM seed ‖ X25519 scalar, 96 bytes) ‖ the Ed25519 manifest-signing public key (32).
OFFLINE_PREFIX = "postvern-backup-key-v1:"
SIGNING_PUBLIC_BYTES = 32
WRAP_PURPOSE = "backup key wrap"
SIGNING_PURPOSE = "backup manifest signing"


class BackupKeyError(Exception):
    """No offline key configured, or a printed key that does not parse."""


def signing_key(server_key: ServerKey) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(server_key.derive(SIGNING_PURPOSE))


def signing_public(server_key: ServerKey) -> bytes:
    return signing_key(server_key).public_key().public_bytes_raw()


def wrap_key(server_key: ServerKey) -> bytes:
    return server_key.derive(WRAP_PURPOSE)


@dataclass(frozen=True)
class OfflineKey:
    """The printed offline key: opens snapshots and authenticates them on a fresh machine."""

    private: bytes = field(repr=False)
    signing_public: bytes

    def encode(self) -> str:
        raw = self.private + self.signing_public
        return OFFLINE_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def parse(cls, text: str) -> OfflineKey:
        text = "".join(text.split())
        if not text.startswith(OFFLINE_PREFIX):
            raise BackupKeyError(f"not an offline backup key (expected {OFFLINE_PREFIX}…)")
        body = text[len(OFFLINE_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except ValueError:
            raise BackupKeyError("offline backup key is damaged") from None
        if len(raw) != seal.PRIVATE_BYTES + SIGNING_PUBLIC_BYTES:
            raise BackupKeyError("offline backup key has the wrong length")
        return cls(raw[: seal.PRIVATE_BYTES], raw[seal.PRIVATE_BYTES :])

    @classmethod
    def load(cls, path: Path) -> OfflineKey:
        return cls.parse(path.read_text())


def generate(server_key: ServerKey) -> tuple[OfflineKey, bytes]:
    """A new offline key pair: (the key to print, the public half to keep)."""
    private, public = seal.generate_keypair()
    return OfflineKey(private, signing_public(server_key)), public


def backup_dir(data_dir: Path) -> Path:
    path = data_dir / BACKUP_DIR
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def save_public(data_dir: Path, public: bytes) -> None:
    path = backup_dir(data_dir) / OFFLINE_PUBLIC_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(public.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_public(data_dir: Path) -> bytes:
    path = data_dir / BACKUP_DIR / OFFLINE_PUBLIC_FILE
    try:
        public = bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        raise BackupKeyError("no offline backup key: run `postvern backup init`") from None
    except ValueError:
        raise BackupKeyError(f"{path}: not hex") from None
    if len(public) != seal.PUBLIC_BYTES:
        raise BackupKeyError(f"{path}: wrong length")
    return public
