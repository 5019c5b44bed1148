"""The account operations the portal and the API call, in one place, off the event loop.

Every method that touches the directory or runs Argon2id runs it in the mailbox registry's
worker threads; every check of a secret goes through the login service, so the portal's
password and second-factor failures count toward the same limits and bans as IMAP's, POP3's
and SMTP's (abuse/). Nothing here renders anything.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from postvern.accounts import policy
from postvern.accounts.history import LoginHistory
from postvern.accounts.invitations import Invitations
from postvern.accounts.passkeys import Passkey, PasskeyError, Passkeys
from postvern.accounts.recovery_codes import RecoveryCodes
from postvern.accounts.sessions import FULL, PENDING, Session, SessionStore
from postvern.accounts.settings import Settings
from postvern.accounts.store import AccountStore
from postvern.accounts.tokens import APITokens
from postvern.accounts.totp import DIGITS as TOTP_DIGITS
from postvern.accounts.totp import TOTP
from postvern.app import App
from postvern.cluster.portal import UNAVAILABLE, PortalClient, PortalError
from postvern.directory.accounts import Accounts, check_password
from postvern.directory.addresses import AddressError
from postvern.directory.db import DirectoryError, User
from postvern.directory.forwarding import Forwarding, ForwardingPolicy
from postvern.login import LoginRefused, LoginService

T = TypeVar("T")
SECOND_FACTOR = "web-2fa"  # the protocol name failed second factors are counted under
# Aliases a user may give themselves in their own domain ("within what the admin allows":
# the administrator's own `postvern alias` has no such limit).
MAX_USER_ALIASES = 20


class AccountError(Exception):
    """A request refused with a message for the user."""


def _refusal(e: LoginRefused, wrong: str) -> str:
    if e.reason == "banned":
        return "Too many failed attempts. Try again later."
    return UNAVAILABLE if e.reason == "unavailable" else wrong


@dataclass(frozen=True, slots=True)
class Dashboard:
    user: User
    usage: int
    quota: int
    two_factor: bool
    recent: list[Any]


class AccountService:
    def __init__(self, app: App, login: LoginService, sessions: SessionStore | None = None) -> None:
        self.app = app
        self.login = login
        self.accounts: Accounts = app.accounts
        self.directory = app.directory
        self.store = AccountStore(app.directory)
        key = app.server_key.derive
        self.totp = TOTP(self.store, key("totp secrets"), issuer=app.settings.hostname)
        self.recovery_codes = RecoveryCodes(self.store, key("recovery codes"))
        self.tokens = APITokens(self.store, key("api tokens"))
        self.invitations = Invitations(self.store, key("invitations"))
        self.passkeys = Passkeys(self.store, rp_name=f"Postvern ({app.settings.hostname})")
        self.settings = Settings(self.store)
        self.history = LoginHistory(self.store)
        self.sessions = sessions if sessions is not None else SessionStore()
        # On a cluster front: the user's mailbox node logs in and keeps the mailbox key
        # (cluster/portal.py); sessions then hold its grant, never the key.
        self.remote: PortalClient | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.login.registry.executor, fn, *args)

    # -- logging in --------------------------------------------------------------------

    async def password_login(self, session: Session, address: str, password: str, ip: str) -> str:
        """Check the password; the session becomes FULL or PENDING (a second factor is owed).

        Unknown addresses and wrong passwords take the same path and time (the login
        service runs Argon2id for both), so the answer tells nothing about who exists.
        """
        try:
            if self.remote is not None:
                user, session.mailbox_grant = await self.remote.login(address, password, ip)
            else:
                unlocked = await self.login.verify(address, password, ip, policy.WEB)
                user, session.mailbox_key = unlocked.user, unlocked.mailbox_key
        except LoginRefused as e:
            raise AccountError(_refusal(e, "The address or the password is not right.")) from None
        # The login service (here or on the mailbox node) refuses a disabled account.
        session.user_id, session.address = user.id, user.address
        session.tries = 0
        if await self.run(policy.two_factor_on, self.directory, user.id):
            session.stage = PENDING
            return PENDING
        await self._complete(session, ip, "password")
        return FULL

    async def second_factor(self, session: Session, code: str, ip: str) -> None:
        """Accept a TOTP code or a recovery code for a PENDING session."""
        assert session.stage == PENDING and session.user_id and session.address
        allowed = await self.login.gate.login_allowed(ip, session.address)
        if allowed is not None:
            raise AccountError("Too many failed attempts. Try again later.")
        user_id = session.user_id
        ok = await self.run(self.totp.verify, user_id, code, time.time())
        method = "password + code"
        if not ok and len("".join(code.split())) > 6:
            ok = await self.run(self.recovery_codes.use, user_id, code)
            method = "password + recovery code"
        if not ok:
            await self.second_factor_failed(session, ip)
        await self._complete(session, ip, method)

    async def second_factor_failed(self, session: Session, ip: str) -> None:
        assert session.address is not None
        await self.login.gate.login_failed(ip, session.address, SECOND_FACTOR)
        session.tries += 1
        await asyncio.sleep(self.login.failure_delay)
        if session.tries >= 5 or self.login.gate.is_banned(ip) is not None:
            if self.remote is not None:  # the mailbox node's grant goes with the session
                await self.remote.revoke(session)
            self.sessions.drop(session)
            raise AccountError("Too many wrong codes. Log in again.")
        raise AccountError("That code is not right, or it was already used.")

    async def second_factor_failed_quiet(self, ip: str, address: str) -> None:
        """A wrong code while enrolling: counted like any failed second factor."""
        await self.login.gate.login_failed(ip, address, SECOND_FACTOR)
        await asyncio.sleep(self.login.failure_delay)

    async def complete_second_factor(self, session: Session, ip: str, method: str) -> None:
        assert session.stage == PENDING
        await self._complete(session, ip, method)

    async def _complete(self, session: Session, ip: str, method: str) -> None:
        assert session.user_id is not None and session.address is not None
        session.stage = FULL
        session.method = method
        self.sessions.mark_authenticated(session)
        await self.login.gate.login_succeeded(ip, session.address, policy.WEB)
        await self.run(self.history.record, session.user_id, ip, f"web: {method}")

    async def passkey_login(self, session: Session, passkey: Passkey, prf: bytes, ip: str) -> None:
        """A whole login with a passkey that is a key slot: its PRF output opens the mailbox
        key (here, or on a cluster front by the user's mailbox node, which keeps it)."""
        user = await self.run(self.directory.user_by_id, passkey.user_id)
        if user is None or (await self.run(self.settings.get, user.id)).disabled:
            raise AccountError("This passkey cannot log in.")
        if self.remote is not None:
            try:
                grant = await self.remote.passkey_login(user.id, passkey.id, prf)
            except LoginRefused as e:
                raise AccountError(_refusal(e, "This passkey cannot log in.")) from None
            session.mailbox_grant = grant
        else:
            session.mailbox_key = await self.run(self.passkeys.unlock, passkey, prf)
        if session.mailbox_grant is None and session.mailbox_key is None:
            raise PasskeyError(
                "This passkey is a second factor only: log in with your password first."
            )
        session.user_id, session.address = user.id, user.address
        await self._complete(session, ip, "passkey")

    async def reauthenticate(self, session: Session, secret: str, ip: str) -> None:
        """The user proves again that it is them, before an action that weakens the account
        or reads all of it: the account password, or a current authenticator code.

        A recovery code does not do (it is for a lost factor, not a confirmation). A wrong
        secret counts as a failed login toward the client's limits and bans, as at login.
        """
        assert session.address is not None and session.user_id is not None
        code = "".join(secret.split())
        if len(code) == TOTP_DIGITS and code.isdigit():
            allowed = await self.login.gate.login_allowed(ip, session.address)
            if allowed is not None:
                raise AccountError("Too many failed attempts. Try again later.")
            if not await self.run(self.totp.verify, session.user_id, code, time.time()):
                await self.second_factor_failed_quiet(ip, session.address)
                raise AccountError("That is neither your password nor a current code.")
        else:
            try:
                if self.remote is not None:  # and the node's grant is renewed
                    _, session.mailbox_grant = await self.remote.login(session.address, secret, ip)
                else:
                    await self.login.verify(session.address, secret, ip, policy.WEB)
            except LoginRefused as e:
                raise AccountError(
                    _refusal(e, "That is neither your password nor a current code.")
                ) from None
        self.sessions.mark_authenticated(session)

    # -- the account -------------------------------------------------------------------

    async def user(self, session: Session) -> User:
        assert session.address is not None
        user = await self.run(self.directory.user, session.address)
        if user is None:
            self.sessions.drop(session)
            raise AccountError("This account no longer exists.")
        return user

    async def is_admin(self, session: Session) -> bool:
        return session.user_id is not None and await self.run(self._is_admin, session.user_id)

    def _is_admin(self, user_id: str) -> bool:
        """The admin role; or, while nobody has it, the postmaster (the configured address,
        else the first user), so a new server has an administrator without a shell."""
        if self.settings.get(user_id).admin:
            return True
        if self.store.rows("SELECT 1 FROM account_settings WHERE role='admin' LIMIT 1"):
            return False
        postmaster = self.directory.postmaster or self.directory._first_user_address()
        user = self.directory.user_by_id(user_id)
        return user is not None and user.address == postmaster

    async def dashboard(self, session: Session) -> Dashboard:
        user = await self.user(session)
        usage = await self.run(self.directory.usage_hint, user.id)
        two_factor = await self.run(policy.two_factor_on, self.directory, user.id)
        recent = await self.run(self.history.recent, user.id)
        return Dashboard(user, usage, user.quota, two_factor, recent)

    async def change_password(self, session: Session, current: str, new: str, ip: str) -> None:
        """Rewrap the password slot, as ``postvern user passwd`` does (current one needed)."""
        assert session.address is not None
        try:
            check_password(new)
        except DirectoryError as e:
            raise AccountError(str(e).capitalize() + ".") from None
        if self.remote is not None:  # the mailbox node unlocks and rewraps (cluster/portal.py)
            try:
                await self.remote.change_password(session.address, current, new, ip)
            except LoginRefused as e:
                raise AccountError(_refusal(e, "The current password is not right.")) from None
            except PortalError as e:
                raise AccountError(e.message.capitalize() + ".") from None
        else:
            try:
                await self.login.verify(session.address, current, ip, policy.WEB)
            except LoginRefused:
                raise AccountError("The current password is not right.") from None
            await self.run(self.accounts.change_password, session.address, current, new)
        self.login.cache.forget(session.address)  # a front's too (submission logs in there)

    async def add_app_password(self, session: Session, label: str) -> str:
        """A new app password, wrapped with the mailbox key the session holds; shown once."""
        user = await self.user(session)
        if self.remote is not None:
            return await self._on_node(self.remote.app_password(session, label))
        if session.mailbox_key is None:
            raise AccountError("Log in again to add an app password.")
        try:
            return await self.run(
                self.accounts.add_app_password_unlocked, user, session.mailbox_key, label
            )
        except DirectoryError as e:
            raise AccountError(str(e).capitalize() + ".") from None

    async def revoke_app_password(self, user: User, label: str) -> None:
        try:
            await self.run(self.accounts.revoke_app_password, user.address, label)
        except DirectoryError:
            raise AccountError("No such app password.") from None
        self.login.cache.forget(user.address)

    async def regenerate_recovery_key(self, session: Session) -> str:
        user = await self.user(session)
        if self.remote is not None:
            return await self._on_node(self.remote.recovery_key(session))
        if session.mailbox_key is None:
            raise AccountError("Log in again to make a new recovery key.")
        return await self.run(self.accounts.new_recovery_key, user, session.mailbox_key)

    async def _on_node(self, call: Awaitable[str]) -> str:
        """A secret the mailbox node made with the key it holds (cluster/portal.py)."""
        try:
            return await call
        except PortalError as e:
            if e.reason == "unavailable":
                raise AccountError(UNAVAILABLE) from None
            if e.reason == "refused":
                raise AccountError(e.message.capitalize() + ".") from None
            raise AccountError("Confirm your password again to do this.") from None

    async def two_factor_changed(self, user: User) -> None:
        """Second factors changed: cached mail logins are re-judged from scratch."""
        self.login.cache.forget(user.address)

    # -- aliases of the user's own address ---------------------------------------------

    async def own_aliases(self, user: User) -> list[str]:
        aliases = await self.run(self.directory.aliases)
        return [a.address for a in aliases if a.targets == (user.address,)]

    async def add_alias(self, user: User, localpart: str) -> str:
        if len(await self.own_aliases(user)) >= MAX_USER_ALIASES:
            raise AccountError(f"At most {MAX_USER_ALIASES} aliases; ask your administrator.")
        address = f"{localpart.strip()}@{user.domain}"
        try:
            alias = await self.run(self.directory.add_alias, address, [user.address])
        except (DirectoryError, ValueError) as e:
            raise AccountError(str(e)) from None
        return alias.address

    async def remove_alias(self, user: User, address: str) -> None:
        if address not in await self.own_aliases(user):
            raise AccountError("No such alias of yours.")
        await self.run(self.directory.remove_alias, address)

    # -- forwarding of the user's own mail ---------------------------------------------

    @property
    def forwarding_policy(self) -> ForwardingPolicy:
        return self.directory.forwarding_policy

    async def forwarding(self, user: User) -> Forwarding:
        return await self.run(self.directory.forwarding, user.id)

    async def set_forwarding(self, user: User, targets: list[str], keep_copy: bool) -> Forwarding:
        """Forward the user's mail to outside addresses (none: stop), within the policy."""
        try:
            return await self.run(self.directory.set_forwarding, user.id, targets, keep_copy)
        except (DirectoryError, AddressError) as e:
            raise AccountError(f"{e}.") from None
