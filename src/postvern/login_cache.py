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
  stops working at once. That check is a trip to the directory's thread; it is skipped
  (:meth:`LoginCache.confirmed`) while nothing at all was committed to the directory since
  the entry last passed it for the protocol — the directory file's WAL index header, which
  every commit of every process changes, is the same (:class:`WalIndexWatch`; the trip cost
  0.15 ms of CPU per warm login measured alone, half of it the thread hop itself, against a
  quarter of the whole warm login) — and that pass is younger than
  CONFIRMED_SECONDS. A password change, a revocation, a disabled account or two-factor
  turned on are all commits, so they are never missed.
* Only successes are cached; failures always pay the full cost and count toward bans.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from postvern.directory.accounts import Unlocked
from postvern.encdb import WAL_INDEX_HEADER

# Entries kept at most, least recently used dropped first: a bound on memory whatever the
# number of accounts, far above the users one machine serves at once.
MAX_ENTRIES = 10_000
# Several secrets may open one account (the password and each app password, one per
# client); a user with more distinct ones than this just pays a cold login.
MAX_SECRETS_PER_ACCOUNT = 8
# How long a passed check of the key slot stands while the directory has not changed: it
# bounds how stale an app password's "last used" gets (Directory.confirm_slot brings it up
# to date at most once a minute) and is a backstop should a change not show in the header.
CONFIRMED_SECONDS = 30.0


class WalIndexWatch:
    """The WAL index header of an SQLite file this process has open (the directory), read
    through SQLite's own descriptor of ``<file>-shm``: opening and closing one of our own
    would drop SQLite's POSIX locks on it (fcntl(2) releases a process's locks on a file
    when any of its descriptors of that file is closed). The descriptor is found once in
    /proc/self/fd and checked against the path (device and inode) before every read."""

    def __init__(self, path: Path) -> None:
        self.shm = Path(f"{path}-shm")
        self._fd = -1

    def version(self) -> bytes | None:
        """What every commit to the file changes (encdb.WAL_INDEX_HEADER bytes); None when
        it cannot be read (then the caller asks the database)."""
        try:
            st = os.stat(self.shm)
        except OSError:
            return None
        if not self._same(self._fd, st):
            self._fd = self._find(st)
            if self._fd < 0:
                return None
        header = os.pread(self._fd, WAL_INDEX_HEADER, 0)
        return header if len(header) == WAL_INDEX_HEADER else None

    @staticmethod
    def _same(fd: int, st: os.stat_result) -> bool:
        if fd < 0:
            return False
        try:
            mine = os.fstat(fd)
        except OSError:
            return False
        return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)

    def _find(self, st: os.stat_result) -> int:
        target = os.path.realpath(self.shm)
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{name}") == target and self._same(int(name), st):
                    return int(name)
            except OSError:
                continue  # closed meanwhile
        return -1


@dataclass
class _Entry:
    mac: bytes
    unlocked: Unlocked
    expires: float
    # protocol -> (the directory's version, until when) of the last passed check.
    confirmed: dict[str, tuple[bytes, float]] = field(default_factory=dict)


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

    def _entry(self, address: str, unlocked: Unlocked) -> _Entry | None:
        for entry in self._accounts.get(address, ()):
            if entry.unlocked is unlocked:
                return entry
        return None

    def confirmed(
        self, address: str, unlocked: Unlocked, protocol: str, version: bytes | None
    ) -> bool:
        """Whether ``unlocked`` (from :meth:`lookup`) passed the directory check for
        ``protocol`` at this very ``version`` of the directory, recently enough."""
        entry = self._entry(address, unlocked) if version is not None else None
        if entry is None:
            return False
        passed = entry.confirmed.get(protocol)
        return passed is not None and passed[0] == version and passed[1] > self._clock()

    def confirm(
        self, address: str, unlocked: Unlocked, protocol: str, version: bytes | None
    ) -> None:
        """Remember that the check passed at ``version``, read before the check ran (a
        commit in between makes the next hit check again, never the other way round)."""
        entry = self._entry(address, unlocked) if version is not None else None
        if entry is not None and version is not None:
            entry.confirmed[protocol] = (version, self._clock() + CONFIRMED_SECONDS)

    def forget(self, address: str) -> None:
        """Drop every entry of the account (a secret changed, or one no longer opens it)."""
        self._accounts.pop(address, None)

    def __len__(self) -> int:
        return len(self._accounts)
