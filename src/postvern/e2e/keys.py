"""The per-user key store: public keys and the user's choices, kept in the directory.

One row per user who has uploaded anything (``e2e_keys``, directory migration 5): the OpenPGP
certificate and the S/MIME certificate (public parts only: the server never holds the key
that decrypts), which of them incoming mail is encrypted to (or none), the outer Subject
policy, and whether the OpenPGP key is published through WKD and Autocrypt. Keys are checked
before they are stored (:func:`postvern.e2e.openpgp.check_key`,
:func:`postvern.e2e.smime.check_certificate`), so what is stored can be used.

Methods are synchronous, like the directory's; the server calls them from a worker thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum

from postvern.directory.db import Directory, DirectoryError, User
from postvern.e2e import openpgp, smime
from postvern.e2e.protect import SubjectPolicy


class Format(Enum):
    OPENPGP = "openpgp"
    SMIME = "smime"


@dataclass(frozen=True, slots=True)
class UserKeys:
    user_id: str
    openpgp: bytes | None  # binary OpenPGP certificate
    smime: bytes | None  # DER X.509 certificate
    encrypt: Format | None  # None: incoming mail is stored as it came
    subject: SubjectPolicy
    publish: bool  # the OpenPGP key is served by WKD and sent in Autocrypt headers


_COLS = "user_id, openpgp, smime, encrypt, subject, publish"


def _row(row: tuple[object, ...]) -> UserKeys:
    user_id, pgp, cert, encrypt, subject, publish = row
    return UserKeys(
        user_id=str(user_id),
        openpgp=bytes(pgp) if isinstance(pgp, bytes | memoryview) else None,
        smime=bytes(cert) if isinstance(cert, bytes | memoryview) else None,
        encrypt=Format(encrypt) if isinstance(encrypt, str) else None,
        subject=SubjectPolicy(subject),
        publish=bool(publish),
    )


class KeyStore:
    """Reads and changes the ``e2e_keys`` rows through the directory's connection."""

    def __init__(self, directory: Directory) -> None:
        self.directory = directory

    def get(self, user_id: str) -> UserKeys | None:
        rows = self.directory._rows(f"SELECT {_COLS} FROM e2e_keys WHERE user_id=?", (user_id,))
        return _row(rows[0]) if rows else None

    def published(self, domain: str) -> list[tuple[User, bytes]]:
        """Every user of ``domain`` who published an OpenPGP key, with the key."""
        rows = self.directory._rows(
            "SELECT u.id, k.openpgp FROM e2e_keys k JOIN users u ON u.id = k.user_id"
            " WHERE u.domain=? AND k.publish=1 AND k.openpgp IS NOT NULL",
            (domain.lower(),),
        )
        found = []
        for user_id, data in rows:
            user = self.directory.user_by_id(str(user_id))
            if user is not None:
                found.append((user, bytes(data)))
        return found

    def _upsert(self, user_id: str, column: str, value: object) -> None:
        # ``column`` is one of this module's constant names, never outside input.
        with self.directory._tx() as c:
            c.execute(
                f"INSERT INTO e2e_keys(user_id, {column}, updated) VALUES(?, ?, ?)"
                f" ON CONFLICT(user_id) DO UPDATE SET {column}=excluded.{column},"
                " updated=excluded.updated",
                (user_id, value, int(time.time())),
            )

    def import_openpgp(self, user: User, data: bytes, *, publish: bool = False) -> openpgp.KeyInfo:
        """Check and store the user's OpenPGP key (replacing one stored before)."""
        info = openpgp.check_key(data)
        if publish and not openpgp.has_address(info, user.address):
            raise openpgp.KeyRefused(
                f"the key has no user ID for {user.address}: it cannot be published for it"
            )
        self._upsert(user.id, "openpgp", info.data)
        self._upsert(user.id, "publish", int(publish))
        return info

    def import_smime(self, user: User, data: bytes) -> smime.CertInfo:
        info = smime.check_certificate(data)
        self._upsert(user.id, "smime", info.data)
        return info

    def remove(self, user: User, fmt: Format) -> bool:
        """Forget one key; encryption that used it is turned off. False if there was none."""
        keys = self.get(user.id)
        if keys is None or getattr(keys, fmt.value) is None:
            return False
        with self.directory._tx() as c:
            c.execute(
                f"UPDATE e2e_keys SET {fmt.value}=NULL, updated=?,"
                " encrypt=CASE WHEN encrypt=? THEN NULL ELSE encrypt END,"
                " publish=CASE WHEN ? THEN 0 ELSE publish END WHERE user_id=?",
                (int(time.time()), fmt.value, fmt is Format.OPENPGP, user.id),
            )
        return True

    def set_encrypt(
        self, user: User, fmt: Format | None, subject: SubjectPolicy | None = None
    ) -> None:
        """Turn encryption of incoming mail on (to the key of ``fmt``) or off (None)."""
        if fmt is not None:
            keys = self.get(user.id)
            if keys is None or getattr(keys, fmt.value) is None:
                what = "OpenPGP key" if fmt is Format.OPENPGP else "S/MIME certificate"
                raise DirectoryError(f"{user.address} has no {what}: import one first")
        self._upsert(user.id, "encrypt", fmt.value if fmt else None)
        if subject is not None:
            self._upsert(user.id, "subject", subject.value)

    def set_publish(self, user: User, publish: bool) -> None:
        keys = self.get(user.id)
        if publish:
            if keys is None or keys.openpgp is None:
                raise DirectoryError(f"{user.address} has no OpenPGP key: import one first")
            info = openpgp.check_key(keys.openpgp)
            if not openpgp.has_address(info, user.address):
                raise openpgp.KeyRefused(f"the key has no user ID for {user.address}")
        self._upsert(user.id, "publish", int(publish))
