"""Logging in, for every protocol: check the abuse gate, unlock the key slot, open the mailbox.

IMAP, POP3 and SMTP AUTH all come through :class:`LoginService`, so the rules are the same
everywhere: a banned address is refused before any password hashing; Argon2id runs in a
worker thread, a bounded number at a time (each takes 64 MiB); a failure is reported to the
abuse module and answered only after a delay, so guessing is slow even before a ban.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

from postvern.directory.accounts import Accounts, AuthFailed, Unlocked
from postvern.directory.db import User
from postvern.store.service import MailboxHandle, MailboxRegistry

log = logging.getLogger(__name__)

# Argon2id with the default parameters takes 64 MiB and ~100 ms of one core: a handful at a
# time keeps a login storm from exhausting memory while real users still get in promptly.
MAX_CONCURRENT_KDF = 4


class LoginRefused(Exception):
    """Login did not succeed. ``reason`` is ``failed`` (wrong credentials) or ``banned``."""

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
    ) -> None:
        self.accounts = accounts
        self.registry = registry
        self.gate: AbuseGate = gate or OpenGate()
        self.kdf_runs = 0  # how often a password reached Argon2id (exported as a metric)
        self.failure_delay = failure_delay
        self._kdf_slots = asyncio.Semaphore(MAX_CONCURRENT_KDF)

    async def verify(self, address: str, secret: str, peer_ip: str, protocol: str) -> Unlocked:
        """Check credentials without opening the mailbox (SMTP submission AUTH)."""
        refusal = await self.gate.login_allowed(peer_ip, address)
        if refusal is not None:
            raise LoginRefused("banned", refusal)
        try:
            async with self._kdf_slots:
                self.kdf_runs += 1
                unlocked = await asyncio.get_running_loop().run_in_executor(
                    self.registry.executor, self.accounts.authenticate, address, secret
                )
        except AuthFailed:
            await self.gate.login_failed(peer_ip, address, protocol)
            log.info("authentication failed", extra={"protocol": protocol})
            await asyncio.sleep(self.failure_delay)
            if self.gate.is_banned(peer_ip) is not None:
                raise LoginRefused("banned", "too many failed logins; try again later") from None
            raise LoginRefused("failed", "authentication failed") from None
        await self.gate.login_succeeded(peer_ip, address, protocol)
        return unlocked

    async def login(self, address: str, secret: str, peer_ip: str, protocol: str) -> LoggedIn:
        """Verify, then unlock the mailbox (importing its spool). Release the handle at logout."""
        unlocked = await self.verify(address, secret, peer_ip, protocol)
        handle = await self.registry.unlock(unlocked.user, unlocked.mailbox_key)
        return LoggedIn(unlocked.user, handle)
