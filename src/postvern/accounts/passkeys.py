"""Passkeys (WebAuthn Level 3, through the ``webauthn`` library): a second factor, and — where
the authenticator has the PRF extension — a key slot of their own.

A passkey's PRF (WebAuthn L3 §10.1.4, on CTAP2's hmac-secret) gives 32 bytes that only
that credential, with the user present, can produce for a given salt. Those bytes wrap the
mailbox key in a key slot of kind ``passkey`` (label: the credential id), exactly as a
password does: the passkey alone then unlocks the zero-access mailbox, with nothing typed,
as Bitwarden and Proton unlock vaults. A passkey without PRF only ever counts as a second
factor, after the password.

The PRF output is full-entropy, so the slot's Argon2id runs at its floor (it only keeps one
slot format); the salt is one per server and public, as the spec allows: it is the
credential's secret, not the salt, that makes the output unguessable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import webauthn
from webauthn.helpers import bytes_to_base64url, options_to_json
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from postvern.accounts.store import AccountStore, now
from postvern.crypto import keyslots
from postvern.crypto.keyslots import KDFParams

MAX_PASSKEYS = 20  # per user
MAX_NAME = 64
PRF_SALT = hashlib.sha256(b"postvern passkey key slot v1").digest()
PRF_OUTPUT_BYTES = 32  # WebAuthn L3 §10.1.4: each PRF result is 32 bytes
# Full-entropy input: the KDF's floor (keyslots.MIN_MEMORY_KIB) is all a slot needs.
PRF_SLOT_KDF = KDFParams(time_cost=1, memory_kib=keyslots.MIN_MEMORY_KIB, parallelism=1)
CEREMONY_TIMEOUT_MS = 120_000


class PasskeyError(ValueError):
    """A registration or assertion that failed (message says why, briefly)."""


@dataclass(frozen=True, slots=True)
class Passkey:
    id: int
    user_id: str
    credential_id: bytes
    public_key: bytes
    sign_count: int
    name: str
    prf: bool  # also a key slot
    created: int
    last_used: int | None

    @property
    def slot_label(self) -> str:
        return bytes_to_base64url(self.credential_id)


_COLS = "id, user_id, credential_id, public_key, sign_count, name, prf_salt, created, last_used"


def _passkey(row: tuple[Any, ...]) -> Passkey:
    return Passkey(
        int(row[0]),
        str(row[1]),
        bytes(row[2]),
        bytes(row[3]),
        int(row[4]),
        str(row[5]),
        row[6] is not None,
        int(row[7]),
        None if row[8] is None else int(row[8]),
    )


def slot_context(user_id: str) -> bytes:
    # The same associated data as directory.accounts gives every slot of this kind.
    return f"postvern keyslot v1|{user_id}|passkey".encode()


class Passkeys:
    def __init__(self, store: AccountStore, rp_name: str) -> None:
        self.store = store
        self.rp_name = rp_name

    # -- registration ------------------------------------------------------------------

    def registration_options(self, user_id: str, address: str, rp_id: str) -> tuple[str, bytes]:
        """The options JSON for navigator.credentials.create, and its challenge to keep."""
        options = webauthn.generate_registration_options(
            rp_id=rp_id,
            rp_name=self.rp_name,
            user_name=address,
            user_id=user_id.encode(),
            user_display_name=address,
            timeout=CEREMONY_TIMEOUT_MS,
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.REQUIRED,
                user_verification=UserVerificationRequirement.PREFERRED,
            ),
            exclude_credentials=[
                PublicKeyCredentialDescriptor(id=p.credential_id) for p in self.list(user_id)
            ],
        )
        return options_to_json(options), options.challenge

    def register(
        self,
        user_id: str,
        name: str,
        credential: dict[str, Any],
        challenge: bytes,
        rp_id: str,
        origin: str,
    ) -> Passkey:
        name = name.strip() or "Passkey"
        if len(name) > MAX_NAME or not name.isprintable():
            raise PasskeyError(f"a passkey name is 1 to {MAX_NAME} printable characters")
        if len(self.list(user_id)) >= MAX_PASSKEYS:
            raise PasskeyError(f"at most {MAX_PASSKEYS} passkeys per user")
        try:
            verified = webauthn.verify_registration_response(
                credential=json.dumps(credential),
                expected_challenge=challenge,
                expected_rp_id=rp_id,
                expected_origin=origin,
            )
        except (WebAuthnException, ValueError, KeyError) as e:
            raise PasskeyError(f"the passkey could not be verified: {e}") from None
        with self.store.tx() as c:
            c.execute(
                "INSERT INTO passkeys(user_id, credential_id, public_key, sign_count, name,"
                " created) VALUES(?, ?, ?, ?, ?, ?)",
                (
                    user_id,
                    verified.credential_id,
                    verified.credential_public_key,
                    verified.sign_count,
                    name,
                    now(),
                ),
            )
        found = self.by_credential(verified.credential_id)
        assert found is not None
        return found

    # -- assertion ---------------------------------------------------------------------

    def authentication_options(self, rp_id: str, user_id: str | None) -> tuple[str, bytes]:
        """Options for navigator.credentials.get: the user's passkeys, or (for a login with
        no address typed) any discoverable one."""
        allow = (
            [PublicKeyCredentialDescriptor(id=p.credential_id) for p in self.list(user_id)]
            if user_id is not None
            else None
        )
        options = webauthn.generate_authentication_options(
            rp_id=rp_id,
            timeout=CEREMONY_TIMEOUT_MS,
            allow_credentials=allow,
            user_verification=UserVerificationRequirement.PREFERRED,
        )
        return options_to_json(options), options.challenge

    def verify(
        self,
        credential: dict[str, Any],
        challenge: bytes,
        rp_id: str,
        origin: str,
        user_id: str | None = None,
    ) -> Passkey:
        """The passkey that made this assertion (of ``user_id`` if given), its counter bumped."""
        try:
            raw_id = webauthn.base64url_to_bytes(str(credential.get("rawId", "")))
        except (ValueError, TypeError):
            raise PasskeyError("malformed credential") from None
        passkey = self.by_credential(raw_id)
        if passkey is None or (user_id is not None and passkey.user_id != user_id):
            raise PasskeyError("unknown passkey")
        try:
            verified = webauthn.verify_authentication_response(
                credential=json.dumps(credential),
                expected_challenge=challenge,
                expected_rp_id=rp_id,
                expected_origin=origin,
                credential_public_key=passkey.public_key,
                credential_current_sign_count=passkey.sign_count,
            )
        except (WebAuthnException, ValueError, KeyError) as e:
            raise PasskeyError(f"the passkey could not be verified: {e}") from None
        self.store.execute(
            "UPDATE passkeys SET sign_count=?, last_used=? WHERE id=?",
            (verified.new_sign_count, now(), passkey.id),
        )
        return passkey

    # -- PRF key slots -----------------------------------------------------------------

    def add_slot(self, passkey: Passkey, mailbox_key: bytes, prf_output: bytes) -> None:
        """Make the passkey a key slot: its PRF output wraps the mailbox key."""
        if len(prf_output) != PRF_OUTPUT_BYTES:
            raise PasskeyError("the authenticator gave no usable PRF output")
        wrapped = keyslots.wrap(
            mailbox_key, prf_output, PRF_SLOT_KDF, slot_context(passkey.user_id)
        )
        directory = self.store.directory
        with self.store.tx() as c:
            c.execute(
                "DELETE FROM keyslots WHERE user_id=? AND kind='passkey' AND label=?",
                (passkey.user_id, passkey.slot_label),
            )
            c.execute("UPDATE passkeys SET prf_salt=? WHERE id=?", (PRF_SALT, passkey.id))
        directory.add_slot(passkey.user_id, "passkey", passkey.slot_label, None, wrapped)

    def unlock(self, passkey: Passkey, prf_output: bytes) -> bytes | None:
        """The mailbox key from the passkey's slot, or None (no slot, or wrong output)."""
        for slot in self.store.directory.slots(passkey.user_id, "passkey"):
            if slot.label != passkey.slot_label:
                continue
            try:
                return keyslots.unwrap(slot.wrapped, prf_output, slot_context(passkey.user_id))
            except keyslots.WrongSecret:
                return None
        return None

    # -- listing and removal -----------------------------------------------------------

    def by_credential(self, credential_id: bytes) -> Passkey | None:
        rows = self.store.rows(
            f"SELECT {_COLS} FROM passkeys WHERE credential_id=?", (credential_id,)
        )
        return _passkey(rows[0]) if rows else None

    def list(self, user_id: str) -> list[Passkey]:
        rows = self.store.rows(
            f"SELECT {_COLS} FROM passkeys WHERE user_id=? ORDER BY created, id", (user_id,)
        )
        return [_passkey(r) for r in rows]

    def rename(self, user_id: str, passkey_id: int, name: str) -> bool:
        name = name.strip()
        if not name or len(name) > MAX_NAME or not name.isprintable():
            raise PasskeyError(f"a passkey name is 1 to {MAX_NAME} printable characters")
        return (
            self.store.execute(
                "UPDATE passkeys SET name=? WHERE user_id=? AND id=?", (name, user_id, passkey_id)
            )
            == 1
        )

    def remove(self, user_id: str, passkey_id: int) -> bool:
        """Delete the passkey and its key slot together."""
        with self.store.tx() as c:
            rows = c.execute(
                "SELECT credential_id FROM passkeys WHERE user_id=? AND id=?",
                (user_id, passkey_id),
            ).fetchall()
            if not rows:
                return False
            label = bytes_to_base64url(bytes(rows[0][0]))
            c.execute(
                "DELETE FROM keyslots WHERE user_id=? AND kind='passkey' AND label=?",
                (user_id, label),
            )
            c.execute("DELETE FROM passkeys WHERE id=?", (passkey_id,))
        return True
