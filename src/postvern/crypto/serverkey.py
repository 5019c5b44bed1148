"""The server key: one random secret per installation, from which every server-held key derives.

It encrypts the directory database (which holds TOTP seeds and DKIM keys), the outbound queue,
and keys the SRS and log-anonymisation MACs. It never opens a mailbox: mailbox keys are
wrapped under the users' secrets only (DESIGN.md, "Keys and storage").
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
KEY_FILE = "server.key"
ENV_VAR = "POSTVERN_SERVER_KEY"


class ServerKeyError(Exception):
    """The server key is missing, malformed or readable by others."""


class ServerKey:
    """Holds the root secret and hands out independent purpose-bound subkeys (HKDF, RFC 5869)."""

    __slots__ = ("_root",)

    def __init__(self, root: bytes) -> None:
        if len(root) != KEY_BYTES:
            raise ServerKeyError("server key must be 32 bytes")
        self._root = root

    def __repr__(self) -> str:
        return "ServerKey(<secret>)"

    def derive(self, purpose: str, length: int = 32) -> bytes:
        """A subkey for one purpose; distinct purposes give independent keys."""
        hkdf = HKDF(
            algorithm=hashes.SHA256(),
            length=length,
            salt=b"postvern server key v1",
            info=purpose.encode(),
        )
        return hkdf.derive(self._root)

    @classmethod
    def generate(cls) -> ServerKey:
        return cls(secrets.token_bytes(KEY_BYTES))

    def write(self, path: Path) -> None:
        """Create the key file 0600 from the first byte (never world-readable, even briefly)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, self._root.hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    @classmethod
    def load(cls, data_dir: Path, environ: dict[str, str] | None = None) -> ServerKey:
        env = os.environ if environ is None else environ
        if env.get(ENV_VAR):
            return cls._parse(env[ENV_VAR])
        path = data_dir / KEY_FILE
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ServerKeyError(f"{path}: not found (run `postvern init`)") from None
        if st.st_mode & 0o077:
            raise ServerKeyError(f"{path}: must not be readable by group or others (chmod 600)")
        return cls._parse(path.read_text())

    @classmethod
    def _parse(cls, text: str) -> ServerKey:
        try:
            root = bytes.fromhex(text.strip())
        except ValueError:
            raise ServerKeyError("server key is not hex") from None
        return cls(root)
