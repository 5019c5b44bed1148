"""The warm-login cache: a repeated login answered without running Argon2id again.

Mail clients log in all the time — every IMAP connection, every POP3 poll, every SMTP
submission — and each cold login costs a full Argon2id (64 MiB, most of a core for ~0.1 s)
by design. Dovecot answers repeated logins from its auth cache; this is the same idea,
kept within zero-access:

* An entry is found through HMAC-SHA256(address, secret) under a key drawn at random when
  the process starts. The key never leaves memory, so the cache cannot be computed or
  checked offline, and the secret itself is never stored. The MAC is compared in constant
  time (:func:`hmac.compare_digest`).
* What an entry holds — the unwrapped mailbox key — is what every open session of the user
  already holds in this process. It stays while the user has a mailbox open and for
  ``idle_seconds`` after the last login, then it is dropped.
* The caller checks, on every hit, that the key slot the secret opened still exists
  unchanged in the directory (a password change or an app-password revocation, from this
  process or from the CLI, replaces or deletes the slot), so a changed or revoked secret
  stops working at once.
* Only successes are cached; failures always pay the full cost and count toward bans.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from postvern.directory.accounts import Unlocked

# Entries kept at most, least recently used dropped first: a bound on memory whatever the
# number of accounts, far above the users one machine serves at once.
MAX_ENTRIES = 10_000
# Several secrets may open one account (the password and each app password, one per
# client); a user with more distinct ones than this just pays a cold login.
MAX_SECRETS_PER_ACCOUNT = 8


@dataclass
class _Entry:
    mac: bytes
    unlocked: Unlocked
    expires: float


class LoginCache:
    def __init__(self, idle_seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._accounts: OrderedDict[str, list[_Entry]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.idle_seconds > 0

    def _mac(self, address: str, secret: str) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (address.encode(), secret.encode()):
            mac.update(len(part).to_bytes(4, "big"))  # unambiguous: no two pairs collide
            mac.update(part)
        return mac.digest()

    def lookup(self, address: str, secret: str, in_use: Callable[[str], bool]) -> Unlocked | None:
        """The unlock a previous login with this secret produced, if it is still warm.

        ``in_use(user_id)`` says whether the user has a mailbox open (their sessions keep
        the entry alive past its idle time).
        """
        if not self.enabled:
            return None
        entries = self._accounts.get(address)
        if not entries:
            return None
        mac = self._mac(address, secret)
        now = self._clock()
        found = None
        for entry in entries:
            if hmac.compare_digest(entry.mac, mac):
                found = entry
        if found is None:
            return None
        if found.expires <= now and not in_use(found.unlocked.user.id):
            self.forget(address)
            return None
        found.expires = now + self.idle_seconds
        self._accounts.move_to_end(address)
        return found.unlocked

    def store(self, address: str, secret: str, unlocked: Unlocked) -> None:
        if not self.enabled:
            return
        mac = self._mac(address, secret)
        entries = [e for e in self._accounts.pop(address, []) if e.mac != mac]
        entries.append(_Entry(mac, unlocked, self._clock() + self.idle_seconds))
        self._accounts[address] = entries[-MAX_SECRETS_PER_ACCOUNT:]
        while len(self._accounts) > MAX_ENTRIES:
            self._accounts.popitem(last=False)

    def forget(self, address: str) -> None:
        """Drop every entry of the account (a secret changed, or one no longer opens it)."""
        self._accounts.pop(address, None)

    def __len__(self) -> int:
        return len(self._accounts)
