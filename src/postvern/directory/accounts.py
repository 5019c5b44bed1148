"""Account operations that touch keys: create a user, log in, change or recover a password,
add and revoke app passwords, remove a user.

These tie the directory (slots, public key), the key slots (Argon2id wrap/unwrap) and the
mailbox file together, in an order that a crash cannot turn into lost mail: the mailbox file
exists before the directory names it, and slots are swapped in one transaction. Every method
here may run Argon2id, so the server calls them from a worker thread.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from postvern.crypto import keyslots, seal
from postvern.crypto.keyslots import KDFParams, WrongSecret
from postvern.crypto.serverkey import ServerKey
from postvern.directory.addresses import AddressError, normalise_address
from postvern.directory.db import AliasChange, Directory, DirectoryError, KeySlot, User
from postvern.store.mailbox import Mailbox
from postvern.store.spool import Spool

log = logging.getLogger(__name__)

MAILBOX_DIR = "mailboxes"
MIN_PASSWORD_LENGTH = 10  # NIST SP 800-63B asks for ≥ 8; we ask a little more
MAX_SECRET_LENGTH = 1024  # bounds Argon2id input; no real password is longer
RECOVERY_GROUPS = 8  # 32 characters × 5 bits = 160 bits
APP_PASSWORD_GROUPS = 5  # 20 characters × 5 bits = 100 bits
MAX_APP_PASSWORDS = 50
_DUMMY_SALT = b"postvern-no-user"


class AuthFailed(Exception):
    """Wrong address or secret. Deliberately says no more than that."""


@dataclass(frozen=True, slots=True)
class Unlocked:
    user: User
    mailbox_key: bytes
    slot: KeySlot

    def __repr__(self) -> str:
        return f"Unlocked(user={self.user.address!r}, slot={self.slot.kind})"


@dataclass(frozen=True, slots=True)
class NewUser:
    user: User
    password: str
    recovery_key: str
    generated_password: bool


def _context(user_id: str, kind: str) -> bytes:
    # AEAD associated data: a slot only opens for the user and purpose it was made for.
    return f"postvern keyslot v1|{user_id}|{kind}".encode()


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise DirectoryError(f"password must be at least {MIN_PASSWORD_LENGTH} characters")
    if len(password.encode()) > MAX_SECRET_LENGTH:
        raise DirectoryError("password too long")


class Accounts:
    def __init__(
        self, data_dir: Path, directory: Directory, server_key: ServerKey, kdf: KDFParams
    ) -> None:
        self.data_dir = data_dir
        self.directory = directory
        self.kdf = kdf
        self.spool = Spool(data_dir)
        self._tag_key = server_key.derive("keyslot lookup tag")

    def mailbox_path(self, user: User) -> Path:
        return self.data_dir / MAILBOX_DIR / f"{user.id}.sqlite"

    def _wrap(self, user_id: str, kind: str, mk: bytes, secret: bytes) -> keyslots.WrappedKey:
        return keyslots.wrap(mk, secret, self.kdf, _context(user_id, kind))

    # -- creation and removal ----------------------------------------------------------

    def check_new_address(self, address: str) -> str:
        """The normalised address if a user can be created there; otherwise why not.

        Checked before anything about the password, so that ``user add`` of a name that is
        taken says so rather than complaining about the password (and the CLI asks before it
        prompts for one).
        """
        address = normalise_address(address)
        domain = address.rpartition("@")[2]
        if not self.directory.has_domain(domain):
            raise DirectoryError(f"domain {domain} is not configured (postvern domain add)")
        if self.directory.user(address) is not None:
            raise DirectoryError(f"{address} already exists")
        return address

    def create_user(
        self, address: str, password: str | None, quota: int = 0, *, user_id: str | None = None
    ) -> NewUser:
        """``user_id``: the id a cluster front chose, by which it placed the user on this
        node (cluster/portal.py); a fresh one otherwise."""
        address = self.check_new_address(address)
        generated = password is None
        if password is None:
            password = keyslots.generate_secret(4)
        check_password(password)
        user_id = user_id or self.directory.new_user_id()
        mk = keyslots.new_mailbox_key()
        private, public = seal.generate_keypair()
        recovery = keyslots.generate_secret(RECOVERY_GROUPS)
        recovery_bytes = keyslots.normalise_generated(recovery)
        slots = [
            ("password", None, None, self._wrap(user_id, "password", mk, password.encode())),
            (
                "recovery",
                None,
                keyslots.lookup_tag(self._tag_key, recovery_bytes),
                self._wrap(user_id, "recovery", mk, recovery_bytes),
            ),
        ]
        path = self.data_dir / MAILBOX_DIR / f"{user_id}.sqlite"
        path.parent.mkdir(mode=0o700, exist_ok=True)
        # The mailbox exists before the directory names it: a crash in between leaves an
        # orphan file nobody can open, never a user without a mailbox.
        Mailbox.create(path, mk, private).close()
        try:
            user = self.directory.insert_user(user_id, address, quota, public, slots)
        except BaseException:
            _remove_mailbox_files(path)
            raise
        return NewUser(user, password, recovery, generated)

    def remove_user(self, address: str) -> list[AliasChange]:
        """Delete the user, their mailbox and spool; returns the aliases this changed."""
        user = self._user(address)
        changes = self.directory.delete_user(user.id)
        _remove_mailbox_files(self.mailbox_path(user))
        self.spool.remove_user(user.id)
        return changes

    def _user(self, address: str) -> User:
        user = self.directory.user(address)
        if user is None:
            raise DirectoryError(f"no such user: {address}")
        return user

    # -- unlocking ---------------------------------------------------------------------

    def authenticate(self, address: str, secret: str) -> Unlocked:
        """Unlock with the password or an app password (not the recovery key).

        An unknown address costs the same Argon2id as a known one, so timing does not tell
        whether an account exists.
        """
        secret_bytes = secret.encode()
        try:
            user = self.directory.user(address) if len(secret_bytes) <= MAX_SECRET_LENGTH else None
        except AddressError:
            user = None
        if user is None:
            keyslots.derive_kek(secret_bytes[:MAX_SECRET_LENGTH], _DUMMY_SALT, self.kdf)
            raise AuthFailed
        tag = keyslots.lookup_tag(self._tag_key, keyslots.normalise_generated(secret))
        app_slot = self.directory.slot_by_tag(user.id, "app", tag)
        if app_slot is not None:
            unlocked = self._try(user, app_slot, keyslots.normalise_generated(secret))
            if unlocked is not None:
                self.directory.touch_slot(app_slot.id)
                return unlocked
        for slot in self.directory.slots(user.id, "password"):
            unlocked = self._try(user, slot, secret_bytes)
            if unlocked is not None:
                return unlocked
        raise AuthFailed

    def _try(self, user: User, slot: KeySlot, secret: bytes) -> Unlocked | None:
        try:
            mk = keyslots.unwrap(slot.wrapped, secret, _context(user.id, slot.kind))
        except WrongSecret:
            return None
        return Unlocked(user, mk, slot)

    def _unlock_with_recovery(self, user: User, recovery_key: str) -> Unlocked:
        secret = keyslots.normalise_generated(recovery_key)
        for slot in self.directory.slots(user.id, "recovery"):
            unlocked = self._try(user, slot, secret)
            if unlocked is not None:
                return unlocked
        raise AuthFailed

    # -- changing secrets --------------------------------------------------------------

    def change_password(self, address: str, current: str, new: str) -> None:
        """Rewrap the password slot. ``current`` may be the password or an app password."""
        check_password(new)
        unlocked = self.authenticate(address, current)
        user = unlocked.user
        wrapped = self._wrap(user.id, "password", unlocked.mailbox_key, new.encode())
        self.directory.replace_slots(user.id, "password", None, None, wrapped)

    def recover(self, address: str, recovery_key: str, new_password: str) -> str:
        """Reset the password with the recovery key; returns a fresh recovery key.

        The old recovery key has just been typed somewhere, so it is replaced as well.
        """
        check_password(new_password)
        user = self._user(address)
        unlocked = self._unlock_with_recovery(user, recovery_key)
        mk = unlocked.mailbox_key
        self.directory.replace_slots(
            user.id,
            "password",
            None,
            None,
            self._wrap(user.id, "password", mk, new_password.encode()),
        )
        return self.new_recovery_key(user, mk)

    def new_recovery_key(self, user: User, mk: bytes) -> str:
        """Replace the recovery key slot, with the mailbox key already unlocked (the account
        portal's session holds it); returns the new key, to be shown once."""
        recovery = keyslots.generate_secret(RECOVERY_GROUPS)
        recovery_bytes = keyslots.normalise_generated(recovery)
        self.directory.replace_slots(
            user.id,
            "recovery",
            None,
            keyslots.lookup_tag(self._tag_key, recovery_bytes),
            self._wrap(user.id, "recovery", mk, recovery_bytes),
        )
        return recovery

    def add_app_password(self, address: str, password: str, label: str) -> str:
        """Create an app password (needs the account password to reach the mailbox key)."""
        label = label.strip()
        if not label or len(label) > 64 or not label.isprintable():
            raise DirectoryError("label must be 1 to 64 printable characters")
        unlocked = self.authenticate(address, password)
        return self.add_app_password_unlocked(unlocked.user, unlocked.mailbox_key, label)

    def add_app_password_unlocked(self, user: User, mk: bytes, label: str) -> str:
        """The same with the mailbox key already unlocked (the account portal's session)."""
        label = label.strip()
        if not label or len(label) > 64 or not label.isprintable():
            raise DirectoryError("label must be 1 to 64 printable characters")
        existing = self.directory.slots(user.id, "app")
        if any(s.label == label for s in existing):
            raise DirectoryError(f"an app password named {label!r} already exists")
        if len(existing) >= MAX_APP_PASSWORDS:
            raise DirectoryError(f"at most {MAX_APP_PASSWORDS} app passwords per user")
        secret = keyslots.generate_secret(APP_PASSWORD_GROUPS)
        normal = keyslots.normalise_generated(secret)
        self.directory.add_slot(
            user.id,
            "app",
            label,
            keyslots.lookup_tag(self._tag_key, normal),
            self._wrap(user.id, "app", mk, normal),
        )
        return secret

    def app_passwords(self, address: str) -> list[KeySlot]:
        return self.directory.slots(self._user(address).id, "app")

    def revoke_app_password(self, address: str, label: str) -> None:
        user = self._user(address)
        if not self.directory.delete_slot(user.id, "app", label):
            raise DirectoryError(f"no app password named {label!r} for {user.address}")


def _remove_mailbox_files(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            os.unlink(f"{path}{suffix}")
        except FileNotFoundError:
            pass
