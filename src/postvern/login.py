"""Logging in, for every protocol: check the abuse gate, unlock the key slot, open the mailbox.

IMAP, POP3 and SMTP AUTH all come through :class:`LoginService`, so the rules are the same
everywhere: a banned address is refused before any password hashing; Argon2id runs in a
worker thread, a bounded number at a time (each takes 64 MiB); a failure is reported to the
abuse module and answered only after a delay, so guessing is slow even before a ban.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, TypeVar

from postvern.accounts import policy
from postvern.directory.accounts import Accounts, AuthFailed, Unlocked
from postvern.directory.addresses import AddressError, normalise_address
from postvern.directory.db import DB_NAME, User
from postvern.login_cache import LoginCache, WalIndexWatch
from postvern.store.service import MailboxHandle, MailboxRegistry

log = logging.getLogger(__name__)
T = TypeVar("T")
# A warm-cache hit whose slot stands but may not log in over this protocol (login._warm).
REFUSED = object()

# Addresses whose normal form is remembered (login._account): IDNA encoding and Unicode
# normalisation cost more than the rest of a warm login's own work (bench/login.py's
# profile, about 5% of a worker's Python time under the login loop); a few thousand
# entries cover the accounts one process serves at once, and the table is emptied when full.
NORMAL_FORMS_KEPT = 4096
# RFC 5321 §4.5.3.1.3: a path is at most 256 octets, so an address at most 254; longer
# strings (any the IMAP parser lets through) are never kept, which bounds the table's size.
MAX_ADDRESS_KEPT = 254
# Argon2id with the default parameters takes 64 MiB and ~100 ms of one core: a handful at a
# time keeps a login storm from exhausting memory while real users still get in promptly.
MAX_CONCURRENT_KDF = 4


class LoginRefused(Exception):
    """Login did not succeed. ``reason`` is ``failed`` (wrong credentials), ``banned``, or
    ``app-password``: the account has two-factor authentication on, so over a mail protocol
    only an app password opens it (``accounts.policy``). That reason is given for every
    failed login to such an account, right password or wrong, so it tells nothing about the
    password."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class AbuseGate(Protocol):
    """What the login path needs from the abuse module (#6); a permissive default below."""

    async def login_allowed(self, ip: str, account: str) -> str | None:
        """None if allowed; otherwise a short reason to give the client."""

    async def login_failed(self, ip: str, account: str, protocol: str) -> None: ...

    async def login_succeeded(self, ip: str, account: str, protocol: str) -> None: ...

    def is_banned(self, ip: str) -> object | None:
        """Non-None once the address is banned (a failure may just have tipped it over)."""


class OpenGate:
    def is_banned(self, ip: str) -> object | None:
        return None

    async def login_allowed(self, ip: str, account: str) -> str | None:
        return None

    async def login_failed(self, ip: str, account: str, protocol: str) -> None:
        return None

    async def login_succeeded(self, ip: str, account: str, protocol: str) -> None:
        return None


@dataclass
class LoggedIn:
    user: User
    mailbox: MailboxHandle


class LoginService:
    def __init__(
        self,
        accounts: Accounts,
        registry: MailboxRegistry,
        gate: AbuseGate | None = None,
        failure_delay: float = 1.0,
        cache_seconds: float = 0.0,
    ) -> None:
        self.accounts = accounts
        self.registry = registry
        self.gate: AbuseGate = gate or OpenGate()
        self.kdf_runs = 0  # how often a password reached Argon2id (exported as a metric)
        self.warm_logins = 0  # how often the cache answered instead (exported as a metric)
        self.directory_checks = 0  # warm logins that had to ask the directory (_warm)
        self.failure_delay = failure_delay
        self.cache = LoginCache(cache_seconds)
        sqlite = accounts.directory.backend == "sqlite"
        self._directory = WalIndexWatch(accounts.data_dir / DB_NAME) if sqlite else None
        self._kdf_slots = asyncio.Semaphore(MAX_CONCURRENT_KDF)
        self._normal_forms: dict[str, str | None] = {}

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.registry.executor, fn, *args)

    async def verify(self, address: str, secret: str, peer_ip: str, protocol: str) -> Unlocked:
        """Check credentials without opening the mailbox (SMTP submission AUTH)."""
        refusal = await self.gate.login_allowed(peer_ip, address)
        if refusal is not None:
            raise LoginRefused("banned", refusal)
        account = self._account(address)
        if account is not None:
            warm = await self._warm(account, secret, protocol)
            if warm is REFUSED:
                await self._refuse(address, peer_ip, protocol)
            if isinstance(warm, Unlocked):
                await self.gate.login_succeeded(peer_ip, address, protocol)
                return warm
        version = self._directory_version()  # before the reads: see LoginCache.confirm
        try:
            async with self._kdf_slots:
                self.kdf_runs += 1
                unlocked = await self._thread(self.accounts.authenticate, address, secret)
        except AuthFailed:
            await self._refuse(address, peer_ip, protocol)
        if not await self._allowed(unlocked, protocol):
            await self._refuse(address, peer_ip, protocol)
        if account is not None:
            self.cache.store(account, secret, unlocked)
            self.cache.confirm(account, unlocked, protocol, version)
        await self.gate.login_succeeded(peer_ip, address, protocol)
        return unlocked

    def _account(self, address: str) -> str | None:
        """The address in its normal form (the cache's key), None if it is not one."""
        try:
            return self._normal_forms[address]
        except KeyError:
            pass
        try:
            account: str | None = normalise_address(address)
        except AddressError:
            account = None
        if len(address) > MAX_ADDRESS_KEPT:
            return account  # no valid address is that long: not worth a place
        if len(self._normal_forms) >= NORMAL_FORMS_KEPT:
            self._normal_forms.clear()  # a flood of names costs a recomputation, no more
        self._normal_forms[address] = account
        return account

    async def _allowed(self, unlocked: Unlocked, protocol: str) -> bool:
        return await self._thread(self._policy_allows, unlocked, protocol)

    def _policy_allows(self, unlocked: Unlocked, protocol: str) -> bool:
        """May the slot this secret opened log in over ``protocol``? Not for a disabled
        account, nor with the account password over mail protocols once 2FA is on."""
        return policy.login_allowed(
            self.accounts.directory, unlocked.user.id, unlocked.slot.kind, protocol
        )

    async def _refuse(self, address: str, peer_ip: str, protocol: str) -> NoReturn:
        """Count the failure, wait, and refuse (saying so if the account wants an app password)."""
        await self.gate.login_failed(peer_ip, address, protocol)
        log.info("authentication failed", extra={"protocol": protocol})
        await asyncio.sleep(self.failure_delay)
        if self.gate.is_banned(peer_ip) is not None:
            raise LoginRefused("banned", "too many failed logins; try again later")
        if protocol in policy.MAIL_PROTOCOLS and await self._thread(
            policy.two_factor_on_address, self.accounts.directory, address
        ):
            raise LoginRefused("app-password", policy.APP_PASSWORD_REQUIRED)
        raise LoginRefused("failed", "authentication failed")

    async def _warm(self, account: str, secret: str, protocol: str) -> Unlocked | object | None:
        """A cached unlock whose key slot is still the one the secret opened; None to take
        the cold path; REFUSED when the slot stands but may not log in over ``protocol``.

        Both checks run on every hit, in one trip to the directory's thread: a changed or
        revoked secret stops at once, and so does a cached account password over IMAP,
        POP3 and SMTP the moment two-factor authentication is turned on.
        """
        cached = self.cache.lookup(account, secret, self.registry.is_unlocked)
        if cached is None:
            return None
        version = self._directory_version()
        if not self.cache.confirmed(account, cached, protocol, version):
            self.directory_checks += 1
            verdict = await self._thread(self._recheck, cached, protocol)
            if verdict is None:
                self.cache.forget(account)  # password changed, app password revoked, user gone
                return None
            if verdict is REFUSED:
                return REFUSED
            self.cache.confirm(account, cached, protocol, version)
        self.warm_logins += 1
        return cached

    def _directory_version(self) -> bytes | None:
        """What every commit to the directory changes, read on the loop (a stat, an fstat
        and a pread of a file SQLite keeps mapped: no SQLite call); None for PostgreSQL,
        where every warm login asks the directory."""
        return self._directory.version() if self._directory is not None else None

    def _recheck(self, cached: Unlocked, protocol: str) -> Unlocked | object | None:
        if not self.accounts.directory.confirm_slot(cached.slot):
            return None
        return cached if self._policy_allows(cached, protocol) else REFUSED

    async def login(self, address: str, secret: str, peer_ip: str, protocol: str) -> LoggedIn:
        """Verify, then unlock the mailbox (importing its spool). Release the handle at logout."""
        unlocked = await self.verify(address, secret, peer_ip, protocol)
        handle = await self.registry.unlock(unlocked.user, unlocked.mailbox_key)
        return LoggedIn(unlocked.user, handle)
