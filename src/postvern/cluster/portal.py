"""The account portal on a front: what needs the mailbox is done on the user's mailbox node.

A front holds no mailbox and no mailbox key, yet its portal logs users in and serves pages
that read the mailbox (the mbox export, this week's Junk) or need its key (a new app
password, a new recovery key). Each of those is one request to the user's mailbox node on
its internal port, over the cluster's mutual TLS with the ALPN protocol ``postvern-portal``;
only a *front* certificate may ask (backend.py checks the role, as for IMAP and LMTP).

**Logging in** (and confirming with the password later) is done by the mailbox node: the
front passes the address, the password and the client's address; the node runs its own
login (Argon2id, or a hit in its login cache) and, if the user is its own, keeps the
unlocked mailbox key in memory under a fresh random **grant** and answers only the grant —
as an IMAP login through a front leaves the key in the node's session and nowhere else. The
front keeps the grant in the portal session (sealed in Redis: web/portal/shared_sessions.py)
and shows it for every later request. The grant is worth nothing without a front
certificate, is tied to its user (a grant of another user is refused the same as none), is
forgotten after ``IDLE_SECONDS`` unused or ``MAX_AGE_SECONDS`` in all, at logout, and when
the user is moved off the node; the portal then asks for the password again. Abuse checks
(bans, failure counting and delay) stay on the front, which sees the client.

**Account administration** typed on a front is done here too: ``user add`` (``create``: the
mailbox file is made on this node; a retry with the request's token after a lost answer gets
the same answer, CreateReplays), ``user passwd`` and ``user recover`` (``passwd``,
``recover``: Argon2id and the key on this node, as the single machine's command does them),
and ``user remove`` (``remove``: sessions ended, the directory row deleted, then the files;
whatever could not be removed is named in the answer).

The wire: one request per connection, a JSON line (``MAX_REQUEST``); one JSON line back;
for the mbox export that line is followed by frames of a 4-byte length and that many bytes,
one message each, and an empty frame at the end — so neither side holds the whole mailbox.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import ssl
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from postvern.accounts import policy
from postvern.accounts.passkeys import PRF_OUTPUT_BYTES, Passkey, PasskeyError, Passkeys
from postvern.accounts.sessions import IDLE_SECONDS, MAX_AGE_SECONDS, Session
from postvern.accounts.store import AccountStore
from postvern.cluster import pki
from postvern.cluster.move import EVICT_GRACE, MoveService, close_mailbox, user_files
from postvern.cluster.nodes import CLUSTER_DIR, ClusterError, Node, mailbox_nodes
from postvern.cluster.nodes import load as load_nodes
from postvern.cluster.placement import Placement, rendezvous
from postvern.cluster.proxy import Front
from postvern.directory.accounts import MAILBOX_DIR, Accounts, AuthFailed, NewUser, check_password
from postvern.directory.addresses import AddressError
from postvern.directory.db import AliasChange, DirectoryError, User
from postvern.login import LoginRefused, LoginService
from postvern.net import Channel
from postvern.store.service import MailboxRegistry
from postvern.store.spool import SPOOL_DIR
from postvern.web.portal import export

if TYPE_CHECKING:
    from postvern.app import App

log = logging.getLogger(__name__)

ALPN = "postvern-portal"
# A request is a JSON line of an address, a password, a grant and a label: far below this.
MAX_REQUEST = 16 * 1024
# An answer line (a grant, or at most MAX_JUNK_LISTED short junk entries).
MAX_ANSWER = 256 * 1024
# One frame is one message of the export: the node's message size limit bounds it; this
# bounds what a front reads from a node whatever that limit is.
MAX_FRAME = 256 * 1024 * 1024
FRAME = struct.Struct(">I")
# Connecting and a request's answer; a login may wait for Argon2id on the node.
CONNECT_TIMEOUT = 10.0
ANSWER_TIMEOUT = 60.0
# Grants a node keeps at most (the oldest go first): each is a user record and a 32-byte key.
MAX_GRANTS = 20_000
GRANT_BYTES = 32
UNAVAILABLE = "Your mailbox cannot be reached right now; try again in a moment."
# The protocols whose logins a front asks a node to check without a grant (``verify``):
# SMTP submission AUTH. (IMAP and POP3 logins are relayed by proxy.py instead.)
VERIFY_PROTOCOLS = ("smtp",)
# A user id as Directory.new_user_id makes it (a front chooses it for a new user).
USER_ID = re.compile(r"[0-9a-f]{32}")
# A ``create`` request's token, secrets.token_urlsafe(CREATE_TOKEN_BYTES) on the front: a
# retry with the same token after a lost answer gets that answer again (CreateReplays).
CREATE_TOKEN_BYTES = 32
CREATE_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
# How long a node keeps a created user's answer for such a retry: the front retries within
# seconds (CREATE_ATTEMPTS); kept short because it holds the new user's first secrets
# (sealed under a key only the token gives).
CREATE_REPLAY_SECONDS = 600.0
# Answers kept at most (the oldest go first): a bound on memory whatever asks.
MAX_CREATE_REPLAYS = 1_000
# The front asks this many times when the node's answer to ``create`` is lost (the same
# token each time, so the user is made once), waiting CREATE_RETRY_DELAY between.
CREATE_ATTEMPTS = 3
CREATE_RETRY_DELAY = 1.0
# What a mailbox node logs for each account change it made for a front (a front's
# ``postvern user passwd`` / ``recover`` / ``remove`` / ``add``): the Argon2id work is here.
CHANGED_LOG = "changed a password for a front"
RECOVERED_LOG = "reset a password with the recovery key for a front"
REMOVED_LOG = "removed a user for a front"
CREATED_LOG = "created a user for a front"
REPLAYED_LOG = "answered a retried create for a front"


class PortalError(Exception):
    """The mailbox node refused or could not be reached; ``reason`` says which."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.message = message  # the node's words for a refusal the user can act on


# -- the mailbox node's side ---------------------------------------------------------------


@dataclass
class _Grant:
    user: User
    mailbox_key: bytes = field(repr=False)
    created: float
    used: float


class Grants:
    """Unlocked mailbox keys of portal sessions, by the SHA-256 of their grant."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._grants: OrderedDict[bytes, _Grant] = OrderedDict()

    def issue(self, user: User, mailbox_key: bytes) -> str:
        grant = secrets.token_urlsafe(GRANT_BYTES)
        now = self._clock()
        self._grants[_digest(grant)] = _Grant(user, mailbox_key, now, now)
        while len(self._grants) > MAX_GRANTS:
            self._grants.popitem(last=False)
        return grant

    def get(self, grant: object, user_id: object) -> _Grant | None:
        """The grant's entry if it is live and the user's; None otherwise, alike."""
        if not isinstance(grant, str) or len(grant) > 100:
            return None
        key = _digest(grant)
        entry = self._grants.get(key)
        if entry is None:
            return None
        now = self._clock()
        if now - entry.used > IDLE_SECONDS or now - entry.created > MAX_AGE_SECONDS:
            del self._grants[key]
            return None
        if entry.user.id != user_id:
            return None
        entry.used = now
        self._grants.move_to_end(key)
        return entry

    def revoke(self, grant: object) -> None:
        if isinstance(grant, str):
            self._grants.pop(_digest(grant), None)

    def forget_user(self, user_id: str) -> None:
        for key in [k for k, g in self._grants.items() if g.user.id == user_id]:
            del self._grants[key]

    def __len__(self) -> int:
        return len(self._grants)


def _digest(grant: str) -> bytes:
    return hashlib.sha256(grant.encode()).digest()


@dataclass
class _Creation:
    user_id: str
    address: str
    at: float
    done: asyncio.Event = field(default_factory=asyncio.Event)
    sealed: bytes | None = field(default=None, repr=False)  # the answer, once made


class CreateReplays:
    """``create`` requests by their token, so that a retry after a lost answer gets that
    answer again instead of "already exists" — and the user is made once.

    An entry is found by the token's SHA-256; the answer it keeps (the generated password
    and the recovery key, shown once) is sealed with ChaCha20-Poly1305 under HMAC-SHA256 of
    the token, which only the asking front holds: this node's memory alone opens nothing.
    A retry that comes while the first try still runs waits for it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: OrderedDict[bytes, _Creation] = OrderedDict()

    def _expire(self) -> None:
        now = self._clock()
        while self._entries:
            key, oldest = next(iter(self._entries.items()))
            if (
                now - oldest.at <= CREATE_REPLAY_SECONDS
                and len(self._entries) <= MAX_CREATE_REPLAYS
            ):
                break
            del self._entries[key]
            oldest.done.set()  # a waiter takes the fresh path

    def find(self, token: str) -> _Creation | None:
        self._expire()
        return self._entries.get(_digest(token))

    def start(self, token: str, user_id: str, address: str) -> _Creation:
        entry = _Creation(user_id, address, self._clock())
        self._entries[_digest(token)] = entry
        self._expire()
        return entry

    def finish(self, token: str, entry: _Creation, answer: dict[str, Any] | None) -> None:
        """The first try is over: its answer kept for retries, or (None: refused, failed)
        the entry dropped so that a retry tries afresh."""
        if answer is None:
            self._entries.pop(_digest(token), None)
        else:
            nonce = secrets.token_bytes(12)
            data = json.dumps(answer).encode()
            entry.sealed = nonce + _answer_aead(token).encrypt(nonce, data, entry.user_id.encode())
        entry.done.set()

    @staticmethod
    def answer(token: str, entry: _Creation) -> dict[str, Any] | None:
        if entry.sealed is None:
            return None
        nonce, sealed = entry.sealed[:12], entry.sealed[12:]
        opened = _answer_aead(token).decrypt(nonce, sealed, entry.user_id.encode())
        answer: dict[str, Any] = json.loads(opened)
        return answer

    def __len__(self) -> int:
        return len(self._entries)


def _answer_aead(token: str) -> ChaCha20Poly1305:
    key = hmac.new(token.encode(), b"postvern create answer", hashlib.sha256).digest()
    return ChaCha20Poly1305(key)


class PortalService:
    """Serves ``postvern-portal`` on a mailbox node (backend.py hands it the connections)."""

    def __init__(
        self,
        *,
        login: LoginService,
        accounts: Accounts,
        registry: MailboxRegistry,
        owns: Callable[[str], bool],
        node: str = "",
        moves: MoveService | None = None,
    ) -> None:
        self.node = node  # this node's name: where the users it creates are placed
        self.login = login
        self.accounts = accounts
        self.registry = registry
        self.owns = owns
        self.moves = moves  # ends a removed user's sessions and closes the mailbox first
        self.grants = Grants()
        self.creations = CreateReplays()
        self.passkeys = Passkeys(AccountStore(accounts.directory), rp_name="")  # unlock only

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.registry.executor, fn, *args)

    async def serve(self, channel: Channel) -> str:
        request = await _read_request(channel)
        if request is None:
            return "no request"
        op = str(request.get("op", ""))
        try:
            if op == "mbox":
                entry = await self._granted(request)
                await self._mbox(channel, entry)
                return "mbox sent"
            answer = await self._answer(op, request)
        except PortalError as e:
            answer = {"ok": False, "error": e.reason}
        channel.write(_line(answer))
        await channel.drain()
        return op or "unknown request"

    async def _answer(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        if op == "login":
            return await self._login(request)
        if op == "passkey-login":
            return await self._passkey_login(request)
        if op == "password":
            return await self._change_password(request)
        if op == "verify":
            return await self._verify(request)
        if op == "create":
            return await self._create(request)
        if op in ("passwd", "recover"):
            return await self._new_password(op, request)
        if op == "remove":
            return await self._remove(request)
        if op == "revoke":
            self.grants.revoke(request.get("grant"))
            return {"ok": True}
        entry = await self._granted(request)
        if op == "junk":
            items = await _read_junk(self.registry, entry)
            return {"ok": True, "junk": [[i.date, i.sender, i.subject] for i in items]}
        if op == "app-password":
            label = str(request.get("label", ""))
            try:
                secret = await self._thread(
                    self.accounts.add_app_password_unlocked, entry.user, entry.mailbox_key, label
                )
            except DirectoryError as e:
                return {"ok": False, "error": "refused", "message": str(e)}
            return {"ok": True, "secret": secret}
        if op == "passkey-slot":
            passkey, prf = await self._passkey(request)
            try:
                await self._thread(self.passkeys.add_slot, passkey, entry.mailbox_key, prf)
            except PasskeyError as e:
                return {"ok": False, "error": "refused", "message": str(e)}
            return {"ok": True}
        if op == "recovery-key":
            key = await self._thread(self.accounts.new_recovery_key, entry.user, entry.mailbox_key)
            return {"ok": True, "secret": key}
        raise PortalError("unknown request")

    async def _login(self, request: dict[str, Any]) -> dict[str, Any]:
        """The node's own login for the portal: the secret unlocks the key here, or not."""
        address, secret = str(request.get("address", "")), str(request.get("secret", ""))
        ip = str(request.get("ip", ""))
        try:
            unlocked = await self.login.verify(address, secret, ip, policy.WEB)
        except LoginRefused as e:
            raise PortalError("banned" if e.reason == "banned" else "failed") from None
        if not await self._thread(self.owns, unlocked.user.id):
            raise PortalError("elsewhere")
        grant = self.grants.issue(unlocked.user, unlocked.mailbox_key)
        return {"ok": True, "user": unlocked.user.id, "grant": grant}

    async def _verify(self, request: dict[str, Any]) -> dict[str, Any]:
        """A mail protocol's AUTH on a front (SMTP submission): the node's own login checks
        the secret (Argon2id, or its login cache) and answers only the user — no grant, the
        key stays here (in the login cache, as after any login on one machine)."""
        protocol = str(request.get("protocol", ""))
        if protocol not in VERIFY_PROTOCOLS:
            raise PortalError("unknown request")
        address, secret = str(request.get("address", "")), str(request.get("secret", ""))
        try:
            unlocked = await self.login.verify(address, secret, str(request.get("ip")), protocol)
        except LoginRefused as e:
            raise PortalError("app-password" if e.reason == "app-password" else "failed") from None
        if not await self._thread(self.owns, unlocked.user.id):
            raise PortalError("elsewhere")
        log.info("verified a login for a front", extra={"protocol": protocol})
        return {"ok": True, "user": unlocked.user.id}

    async def _create(self, request: dict[str, Any]) -> dict[str, Any]:
        """A new user (``user add`` or an accepted invitation on a front): the mailbox file is
        made here, with the id the front chose, and the map names this node. A retry with
        the request's token gets the first try's answer (CreateReplays)."""
        user_id, address = request.get("user"), str(request.get("address", ""))
        password, quota = request.get("password"), request.get("quota", 0)
        token = request.get("token")
        if (
            not isinstance(user_id, str)
            or not USER_ID.fullmatch(user_id)
            or not isinstance(token, str)
            or not CREATE_TOKEN.fullmatch(token)
            or not (password is None or isinstance(password, str))
            or not isinstance(quota, int)
            or quota < 0
        ):
            raise PortalError("unknown request")
        while (entry := self.creations.find(token)) is not None:
            if (entry.user_id, entry.address) != (user_id, address):
                message = "this request token was used for another user"
                return {"ok": False, "error": "refused", "message": message}
            await entry.done.wait()
            replay = self.creations.answer(token, entry)
            if replay is not None:
                log.info(REPLAYED_LOG)
                return replay
            # The first try was refused or did not finish: this one tries afresh.
        entry = self.creations.start(token, user_id, address)
        answer: dict[str, Any] | None = None
        try:
            answer = await self._create_fresh(user_id, address, password, quota)
        finally:
            self.creations.finish(token, entry, answer if answer and answer["ok"] else None)
        return answer

    async def _create_fresh(
        self, user_id: str, address: str, password: str | None, quota: int
    ) -> dict[str, Any]:
        try:
            new = await self._thread(self._create_here, user_id, address, password, quota)
        except (DirectoryError, AddressError) as e:
            message = str(e)
            if await self._thread(self.accounts.directory.user_by_id, user_id) is not None:
                message = (
                    f"{address} was made by an earlier request whose answer this node no"
                    " longer holds (it restarted, or the answer expired): its password and"
                    " recovery key were never shown; remove the user and add it again"
                )
            return {"ok": False, "error": "refused", "message": message}
        log.info(CREATED_LOG)
        return {
            "ok": True,
            "user": new.user.id,
            "password": new.password if new.generated_password else None,
            "recovery": new.recovery_key,
        }

    def _create_here(self, user_id: str, address: str, password: str | None, quota: int) -> NewUser:
        new = self.accounts.create_user(address, password, quota, user_id=user_id)
        # Placed here, where its file is; should this fail, rendezvous hashing of its id (by
        # which the front chose this node) places it here too.
        self.accounts.directory.set_mailbox_node(new.user.id, self.node)
        return new

    async def _own_user(self, address: str) -> User | None:
        """The user at ``address`` if there is one (None: none, or not an address);
        PortalError("elsewhere") if it is placed on another node."""
        try:
            user: User | None = await self._thread(self.accounts.directory.user, address)
        except AddressError:
            return None
        if user is not None and not await self._thread(self.owns, user.id):
            raise PortalError("elsewhere")
        return user

    async def _new_password(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        """``postvern user passwd`` or ``recover`` on a front, as on one machine, with the
        Argon2id work and the key here. ``passwd``: the current password or an app password
        unlocks the key and the password slot is rewrapped; app passwords and the recovery
        key stay. ``recover``: the recovery key unlocks it, the password slot is rewrapped
        and the recovery key replaced (the old one was just typed somewhere); the new one
        goes back to be shown once. Either way the warm-login cache forgets the user at
        once, so the old password stops now."""
        address, new = str(request.get("address", "")), str(request.get("new", ""))
        old = str(request.get("current" if op == "passwd" else "recovery", ""))
        change = self.accounts.change_password if op == "passwd" else self.accounts.recover
        user = await self._own_user(address)
        try:
            fresh = await self._thread(change, address, old, new)
        except AuthFailed:
            raise PortalError("failed") from None
        except (DirectoryError, AddressError) as e:
            return {"ok": False, "error": "refused", "message": str(e)}
        if user is not None:
            self.login.cache.forget(user.address)
        if op == "passwd":
            log.info(CHANGED_LOG)
            return {"ok": True}
        log.info(RECOVERED_LOG)
        return {"ok": True, "recovery": fresh}

    async def _remove(self, request: dict[str, Any]) -> dict[str, Any]:
        """``postvern user remove`` on a front. The user is evicted first (refused from now
        on, sessions ended, the mailbox closed), then the directory row goes, then the
        files: a failure before the row goes changes nothing; after it, whatever file could
        not be removed is named in the answer (``left``), never silently orphaned."""
        user_id = request.get("user")
        if not isinstance(user_id, str) or not USER_ID.fullmatch(user_id):
            raise PortalError("unknown request")
        user = await self._thread(self.accounts.directory.user_by_id, user_id)
        if user is None or user.address != request.get("address"):
            return {"ok": False, "error": "refused", "message": "no such user"}
        if not await self._thread(self.owns, user_id):
            raise PortalError("elsewhere")
        if not await self._evict(user_id):
            message = "the mailbox is still in use; nothing was removed, try again"
            return {"ok": False, "error": "refused", "message": message}
        try:
            try:
                changes = await self._thread(self.accounts.directory.delete_user, user_id)
            except DirectoryError as e:
                return {"ok": False, "error": "refused", "message": str(e)}
            self.grants.forget_user(user_id)
            self.login.cache.forget(user.address)
            left = await self._thread(self._remove_files, user_id)
        finally:
            if self.moves is not None:
                self.moves.evicted.discard(user_id)  # gone from the directory by now, or kept
        log.info(REMOVED_LOG)
        return {"ok": True, "aliases": [[c.alias, list(c.dropped), c.removed] for c in changes],
                "left": left}  # fmt: skip

    async def _evict(self, user_id: str) -> bool:
        """As a move's EVICT (move.py): the user refused here from now on, their IMAP and
        POP3 sessions ended, the mailbox closed — nobody writes its files while they go.
        False (and served again) if it stays in use beyond the grace."""
        if self.moves is None:
            return True
        self.moves.evicted.add(user_id)
        deadline = time.monotonic() + EVICT_GRACE
        try:
            await self.moves.sessions.end(user_id, EVICT_GRACE)
            while not await close_mailbox(self.registry, user_id):
                if time.monotonic() > deadline:
                    raise TimeoutError
                await asyncio.sleep(0.05)
        except TimeoutError:
            self.moves.evicted.discard(user_id)
            return False
        return True

    def _remove_files(self, user_id: str) -> list[str]:
        """The user's mailbox files and spool removed; what is still there, and why."""
        data_dir = self.accounts.data_dir
        failed: dict[str, str] = {}
        for suffix in ("", "-wal", "-shm", "-journal"):
            rel = f"{MAILBOX_DIR}/{user_id}.sqlite{suffix}"
            try:
                (data_dir / rel).unlink(missing_ok=True)
            except OSError as e:
                failed[rel] = e.strerror or type(e).__name__
        try:
            self.accounts.spool.remove_user(user_id)
        except OSError as e:
            failed[f"{SPOOL_DIR}/{user_id}/"] = e.strerror or type(e).__name__
        still = set(user_files(data_dir, user_id)) | set(failed)
        if (data_dir / SPOOL_DIR / user_id).exists():
            still.add(f"{SPOOL_DIR}/{user_id}/")
        return [f"{rel} ({failed.get(rel, 'still there')})" for rel in sorted(still)]

    async def _passkey(self, request: dict[str, Any]) -> tuple[Passkey, bytes]:
        """The user's passkey the request names, and the PRF output it carries."""
        user_id, passkey_id = request.get("user"), request.get("passkey")
        if not isinstance(user_id, str) or not isinstance(passkey_id, int):
            raise PortalError("failed")
        try:
            prf = base64.b64decode(str(request.get("prf", "")), validate=True)
        except ValueError:
            raise PortalError("failed") from None
        found = [p for p in await self._thread(self.passkeys.list, user_id) if p.id == passkey_id]
        if not found or len(prf) != PRF_OUTPUT_BYTES:
            raise PortalError("failed")
        return found[0], prf

    async def _passkey_login(self, request: dict[str, Any]) -> dict[str, Any]:
        """A passkey that is a key slot: its PRF output unlocks the key here, or not. (The
        front checked the WebAuthn assertion; the PRF output is the secret itself.)"""
        passkey, prf = await self._passkey(request)
        mailbox_key = await self._thread(self.passkeys.unlock, passkey, prf)
        user = await self._thread(self.accounts.directory.user_by_id, passkey.user_id)
        if mailbox_key is None or user is None:
            raise PortalError("failed")
        if await self._thread(policy.disabled, self.accounts.directory, user.id):
            raise PortalError("failed")  # as the password login refuses a disabled account
        if not await self._thread(self.owns, user.id):
            raise PortalError("elsewhere")
        return {"ok": True, "user": user.id, "grant": self.grants.issue(user, mailbox_key)}

    async def _change_password(self, request: dict[str, Any]) -> dict[str, Any]:
        """Rewrap the password slot: the current password unlocks the key here."""
        address, current = str(request.get("address", "")), str(request.get("current", ""))
        try:
            unlocked = await self.login.verify(address, current, str(request.get("ip")), policy.WEB)
        except LoginRefused:
            raise PortalError("failed") from None
        if not await self._thread(self.owns, unlocked.user.id):
            raise PortalError("elsewhere")
        new = str(request.get("new", ""))
        try:
            await self._thread(self.accounts.change_password, address, current, new)
        except DirectoryError as e:
            return {"ok": False, "error": "refused", "message": str(e)}
        self.login.cache.forget(unlocked.user.address)
        return {"ok": True}

    async def _granted(self, request: dict[str, Any]) -> _Grant:
        entry = self.grants.get(request.get("grant"), request.get("user"))
        if entry is None:
            raise PortalError("grant")
        if not await self._thread(self.owns, entry.user.id):
            self.grants.forget_user(entry.user.id)  # moved away: its key is not ours to keep
            raise PortalError("elsewhere")
        if await self._thread(policy.disabled, self.accounts.directory, entry.user.id):
            self.grants.forget_user(entry.user.id)  # disabled since: no secret opens it now
            raise PortalError("grant")
        return entry

    async def _mbox(self, channel: Channel, entry: _Grant) -> None:
        handle = await self.registry.unlock(entry.user, entry.mailbox_key)
        try:
            listing = await handle.run(export.message_list, handle.box)
            channel.write(_line({"ok": True, "messages": len(listing)}))
            for folder_id, name, uid, when in listing:
                raw = await handle.run(handle.box.raw, folder_id, uid)
                data = export.mbox_entry(raw, name, when)
                channel.write(FRAME.pack(len(data)) + data)
                await channel.drain()
                if channel.lost:
                    return
            channel.write(FRAME.pack(0))
            await channel.drain()
        finally:
            await handle.release()


async def _read_junk(registry: MailboxRegistry, entry: _Grant) -> list[export.JunkItem]:
    handle = await registry.unlock(entry.user, entry.mailbox_key)
    try:
        return await handle.run(export.junk, handle.box, export.junk_since())
    finally:
        await handle.release()


async def _read_request(channel: Channel) -> dict[str, Any] | None:
    data = b""
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT):
            while b"\n" not in data:
                chunk = await channel.read()
                if not chunk or len(data) + len(chunk) > MAX_REQUEST:
                    return None
                data += chunk
        request = json.loads(data.split(b"\n", 1)[0])
    except (TimeoutError, ValueError):
        return None
    return request if isinstance(request, dict) else None


def _line(answer: dict[str, Any]) -> bytes:
    return json.dumps(answer, separators=(",", ":")).encode() + b"\n"


# -- the front's side ----------------------------------------------------------------------


async def _open(
    context: ssl.SSLContext, node: Node, request: dict[str, Any]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]]:
    """Send one request to ``node``'s portal service; the connection and its answer line
    (PortalError if it refused or did not answer)."""
    host, port = node.hostport
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=node.name, limit=MAX_ANSWER
            )
    except (OSError, TimeoutError) as e:
        log.warning("portal: mailbox node %s unreachable (%s)", node.name, type(e).__name__)
        raise PortalError("unavailable") from None
    try:
        writer.write(_line(request))
        async with asyncio.timeout(ANSWER_TIMEOUT):
            answer = json.loads(await reader.readline())
    except (OSError, TimeoutError, ValueError) as e:
        writer.close()
        log.warning("portal: no answer from %s (%s)", node.name, type(e).__name__)
        raise PortalError("unavailable") from None
    if not isinstance(answer, dict) or not answer.get("ok"):
        writer.close()
        if not isinstance(answer, dict):
            raise PortalError("unavailable")
        raise PortalError(str(answer.get("error")), str(answer.get("message", "")))
    return reader, writer, answer


async def _create_on(
    context: ssl.SSLContext, node: Node, user_id: str, address: str, password: str | None,
    quota: int,
) -> dict[str, Any]:  # fmt: skip
    """Ask ``node`` to create the user; DirectoryError with the reason if it cannot. An
    answer lost on the way is asked for again with the same token, which the node answers
    with the first try's result: the user is made once, and never "already exists"."""
    if password is not None:
        check_password(password)  # said at once; the node checks again
    request = {"op": "create", "user": user_id, "address": address, "password": password,
               "quota": quota, "token": secrets.token_urlsafe(CREATE_TOKEN_BYTES)}  # fmt: skip
    for attempt in range(1, CREATE_ATTEMPTS + 1):
        try:
            return await _ask(context, node, request)
        except PortalError as e:
            if e.reason == "refused":
                raise DirectoryError(e.message) from None
            if attempt == CREATE_ATTEMPTS:
                raise DirectoryError(
                    f"mailbox node {node.name} did not answer; try again (if it made the user"
                    " meanwhile, the address is taken now: remove it and add it again)"
                ) from None
        await asyncio.sleep(CREATE_RETRY_DELAY)
    raise AssertionError("unreachable")


async def _ask(context: ssl.SSLContext, node: Node, request: dict[str, Any]) -> dict[str, Any]:
    """One request to ``node`` and its answer line (PortalError if refused or unanswered)."""
    _, writer, answer = await _open(context, node, request)
    writer.close()
    return answer


def _new_user(found: User | None, answer: dict[str, Any], password: str | None) -> NewUser:
    if found is None:  # removed again at once, by someone else
        raise DirectoryError("the new user is gone")
    generated = answer.get("password")
    secret = str(generated) if generated is not None else password or ""
    return NewUser(found, secret, str(answer["recovery"]), generated is not None)


def create_user(app: App, address: str, password: str | None, quota: int) -> NewUser:
    """``postvern user add`` on a cluster node (blocking). On a front the user is placed on
    a mailbox node by rendezvous hashing of a fresh id, and that node makes the mailbox file
    (``create``): a front's disk holds no mailbox. On a mailbox node it is made and placed
    here."""
    s = app.settings
    if s.cluster.role != "front":
        new = app.accounts.create_user(address, password, quota)
        app.directory.set_mailbox_node(new.user.id, s.cluster.node)
        return new
    context, placement = _front_context(app)
    user_id = app.directory.new_user_id()
    node = rendezvous(user_id, mailbox_nodes(placement.nodes))
    answer = asyncio.run(_create_on(context, node, user_id, address, password, quota))
    return _new_user(app.directory.user_by_id(str(answer["user"])), answer, password)


def _front_context(app: App) -> tuple[ssl.SSLContext, Placement]:
    """A front's client context for ``postvern-portal`` and where users live."""
    folder = app.settings.path(CLUSTER_DIR)
    context = pki.NodeIdentity.in_dir(folder).client_context(ALPN)
    return context, Placement(app.directory, load_nodes(folder))


class NoAnswer(Exception):
    """The user's mailbox node could not be reached or did not answer (``node``)."""

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self.node = node


def _on_owner(app: App, user: User, request: dict[str, Any]) -> tuple[Node, dict[str, Any]]:
    """Send ``request`` about ``user`` to its mailbox node (blocking); the node and its
    answer. A refusal is a DirectoryError with the node's reason, ``failed`` (a wrong
    secret) AuthFailed, no answer NoAnswer."""
    context, placement = _front_context(app)
    try:
        node = placement.node_for(user.id)
    except ClusterError as e:
        raise DirectoryError(f"where {user.address} lives is not known: {e}") from None
    try:
        return node, asyncio.run(_ask(context, node, request))
    except PortalError as e:
        if e.reason == "refused":
            raise DirectoryError(e.message) from None
        if e.reason == "failed":
            raise AuthFailed from None
        if e.reason == "elsewhere":
            raise DirectoryError(f"{user.address} is moving to another node; try again") from None
        raise NoAnswer(node.name) from None


def _user(app: App, address: str) -> User:
    user = app.directory.user(address)
    if user is None:
        raise DirectoryError(f"no such user: {address}")
    return user


def change_password(app: App, address: str, current: str, new: str) -> None:
    """``postvern user passwd`` on a front (blocking): the user's mailbox node unlocks and
    rewraps; nothing here runs Argon2id or holds the key."""
    check_password(new)  # said at once; the node checks again
    request = {"op": "passwd", "address": address, "current": current, "new": new}
    try:
        _on_owner(app, _user(app, address), request)
    except NoAnswer as e:
        raise DirectoryError(
            f"mailbox node {e.node} did not answer: nothing was changed unless the new"
            " password works now; try again"
        ) from None


def recover(app: App, address: str, recovery_key: str, new: str) -> str:
    """``postvern user recover`` on a front (blocking): done on the user's mailbox node;
    the new recovery key, to be shown once."""
    check_password(new)
    request = {"op": "recover", "address": address, "recovery": recovery_key, "new": new}
    try:
        _, answer = _on_owner(app, _user(app, address), request)
    except NoAnswer as e:
        raise DirectoryError(
            f"mailbox node {e.node} did not answer: if the new password works now, the old"
            " recovery key no longer does and the new one was lost (make one in the account"
            " portal); otherwise try again"
        ) from None
    return str(answer["recovery"])


def check_removable_here(app: App, address: str) -> None:
    """``postvern user remove`` on a mailbox node: only for a user placed on this node; the
    files of another node's user are on that node, which a front's ``user remove`` asks."""
    placement = Placement(app.directory, load_nodes(app.settings.path(CLUSTER_DIR)))
    try:
        node = placement.node_for(_user(app, address).id).name
    except ClusterError as e:
        raise DirectoryError(f"where {address} lives is not known: {e}") from None
    if node != app.settings.cluster.node:
        raise DirectoryError(
            f"{address} lives on {node}: remove it with `postvern user remove` on a front,"
            " which has that node remove its files (here they would stay behind there)"
        )


@dataclass(frozen=True)
class Removed:
    """What ``user remove`` on a front did: the node, the aliases it changed, and what was
    left behind on the node (each with why), for the administrator to see to."""

    node: str
    aliases: list[AliasChange]
    left: list[str]


def remove_user(app: App, address: str) -> Removed:
    """``postvern user remove`` on a front (blocking): the user's mailbox node evicts the
    user, deletes the directory row, then the mailbox files and spool (``remove``)."""
    user = _user(app, address)
    request = {"op": "remove", "user": user.id, "address": user.address}
    try:
        node, answer = _on_owner(app, user, request)
    except NoAnswer as e:
        if app.directory.user_by_id(user.id) is not None:
            raise DirectoryError(
                f"mailbox node {e.node} did not answer and {user.address} is still in the"
                " directory; try again"
            ) from None
        # The row went, then the node stopped answering: its files may be left there.
        where = f"{MAILBOX_DIR}/{user.id}.sqlite* and {SPOOL_DIR}/{user.id}/"
        return Removed(e.node, [], [f"{where} (the node stopped answering; look there)"])
    aliases = [AliasChange(str(a), tuple(map(str, d)), bool(r)) for a, d, r in answer["aliases"]]
    return Removed(node.name, aliases, [str(x) for x in answer["left"]])


@dataclass(frozen=True)
class Verified:
    """A login the user's node checked: who it is (all SMTP AUTH needs; no key)."""

    user: User


class PortalClient:
    """The front's calls to a user's mailbox node, and the portal's face for them."""

    def __init__(self, front: Front, identity: pki.NodeIdentity) -> None:
        # The proxies' directory, placement, abuse gate and failure delay (proxy.py).
        self.front = front
        self.placement = front.placement
        self.directory = front.directory
        self.gate = front.gate
        self._thread = front._thread
        self.context = identity.client_context(ALPN)

    async def _open(
        self, node: Node, request: dict[str, Any]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]]:
        return await _open(self.context, node, request)

    async def _ask(self, node: Node, request: dict[str, Any]) -> dict[str, Any]:
        _, writer, answer = await self._open(node, request)
        writer.close()
        return answer

    async def _node_of(self, user_id: str) -> Node:
        try:
            node: Node = await self._thread(self.placement.node_for, user_id)
        except ClusterError:
            raise PortalError("unavailable") from None
        return node

    # -- logging in ----------------------------------------------------------------------

    async def login(self, address: str, secret: str, ip: str) -> tuple[User, str]:
        """The user and their node's grant; LoginRefused as the login service would."""
        request = {"op": "login", "address": address, "secret": secret, "ip": ip}
        answer = await self._checked(address, ip, request)
        found = await self._thread(self.directory.user_by_id, str(answer["user"]))
        if found is None:
            raise LoginRefused("failed", "authentication failed")
        return found, str(answer["grant"])

    async def verify(self, address: str, secret: str, ip: str, protocol: str) -> Verified:
        """A mail login checked by the user's node (SMTP submission AUTH on a front), under
        the front's abuse gate; LoginRefused as LoginService.verify would refuse it, or with
        the reason ``unavailable`` when the node cannot answer."""
        request = {"op": "verify", "address": address, "secret": secret, "ip": ip,
                   "protocol": protocol}  # fmt: skip
        answer = await self._checked(address, ip, request, protocol)
        found = await self._thread(self.directory.user_by_id, str(answer["user"]))
        if found is None:
            raise LoginRefused("failed", "authentication failed")
        return Verified(found)

    async def create_user(self, address: str, password: str | None, quota: int) -> NewUser:
        """An accepted invitation on a front: made on the mailbox node that rendezvous
        hashing of a fresh id picks (as ``create_user`` above); DirectoryError if refused."""
        user_id = self.directory.new_user_id()
        node = rendezvous(user_id, mailbox_nodes(self.placement.nodes))
        answer = await _create_on(self.context, node, user_id, address, password, quota)
        found = await self._thread(self.directory.user_by_id, str(answer["user"]))
        return _new_user(found, answer, password)

    async def change_password(self, address: str, current: str, new: str, ip: str) -> None:
        """The node checks the current password and rewraps the slot with the key it
        unlocks; a refusal of the new one is a PortalError("refused") with its reason."""
        request = {"op": "password", "address": address, "current": current, "new": new}
        await self._checked(address, ip, {**request, "ip": ip})

    async def _checked(
        self, address: str, ip: str, request: dict[str, Any], protocol: str = policy.WEB
    ) -> dict[str, Any]:
        """A request that carries the user's secret, under the front's abuse gate: refused
        at once while the client is banned; a wrong secret counted and answered late."""
        refusal = await self.gate.login_allowed(ip, address)
        if refusal is not None:
            raise LoginRefused("banned", refusal)
        user = await self._thread(self.directory.user, address)
        if user is not None:
            node = await self._node_of(user.id)
        else:  # no such user: a node still runs Argon2id, so the answer takes as long
            node = rendezvous(address.lower(), mailbox_nodes(self.placement.nodes))
        try:
            answer = await self._ask(node, request)
        except PortalError as e:
            if e.reason in ("unavailable", "elsewhere"):
                raise LoginRefused("unavailable", UNAVAILABLE) from None
            if e.reason == "refused":
                raise
            await self.gate.login_failed(ip, address, protocol)
            await asyncio.sleep(self.front.failure_delay)
            if e.reason == "banned" or self.gate.is_banned(ip) is not None:
                raise LoginRefused("banned", "too many failed logins") from None
            if e.reason == "app-password":  # 2FA on: any failure says so (login.py)
                raise LoginRefused("app-password", policy.APP_PASSWORD_REQUIRED) from None
            raise LoginRefused("failed", "authentication failed") from None
        await self.gate.login_succeeded(ip, address, protocol)
        return answer

    async def passkey_login(self, user_id: str, passkey_id: int, prf: bytes) -> str | None:
        """The node's grant for a passkey's PRF output; None if it unlocks nothing. (The
        front has checked the assertion and counts failures as for any passkey.)"""
        request = {"op": "passkey-login", "user": user_id, "passkey": passkey_id,
                   "prf": base64.b64encode(prf).decode()}  # fmt: skip
        try:
            answer = await self._ask(await self._node_of(user_id), request)
        except PortalError as e:
            if e.reason in ("unavailable", "elsewhere"):
                raise LoginRefused("unavailable", UNAVAILABLE) from None
            return None
        return str(answer["grant"])

    async def passkey_slot(self, session: Session, passkey_id: int, prf: bytes) -> bool:
        """Make the passkey a key slot with the key the node holds; False without a grant."""
        try:
            await self._granted(session, "passkey-slot", passkey=passkey_id,
                                prf=base64.b64encode(prf).decode())  # fmt: skip
        except PortalError:
            return False
        return True

    async def revoke(self, session: Session) -> None:
        """Forget the session's grant on its node (logout); best effort, it expires anyway."""
        if session.mailbox_grant is None or session.user_id is None:
            return
        try:
            await self._ask(await self._node_of(session.user_id), {
                "op": "revoke", "grant": session.mailbox_grant})  # fmt: skip
        except PortalError:
            pass

    async def _granted(self, session: Session, op: str, **more: Any) -> dict[str, Any]:
        if session.mailbox_grant is None or session.user_id is None:
            raise PortalError("grant")
        node = await self._node_of(session.user_id)
        request = {"op": op, "user": session.user_id, "grant": session.mailbox_grant, **more}
        try:
            return await self._ask(node, request)
        except PortalError as e:
            if e.reason in ("grant", "elsewhere"):
                session.mailbox_grant = None  # the portal asks for the password again
            raise

    async def app_password(self, session: Session, label: str) -> str:
        answer = await self._granted(session, "app-password", label=label)
        return str(answer["secret"])

    async def recovery_key(self, session: Session) -> str:
        return str((await self._granted(session, "recovery-key"))["secret"])

    # -- the pages that read the mailbox (export.MailboxAccess) --------------------------

    def can_read(self, session: Session) -> bool:
        return session.mailbox_grant is not None

    async def junk(self, session: Session, user: User) -> list[export.JunkItem] | None:
        try:
            answer = await self._granted(session, "junk")
        except PortalError:
            return None
        return [export.JunkItem(*map(str, item)) for item in answer["junk"]]

    async def mbox(
        self, session: Session, user: User, request: web.Request
    ) -> web.StreamResponse | None:
        """The mailbox node's mbox, frame by frame into the response; None: no grant."""
        if session.mailbox_grant is None or session.user_id is None:
            return None
        node = await self._node_of(session.user_id)
        ask = {"op": "mbox", "user": session.user_id, "grant": session.mailbox_grant}
        try:
            reader, writer, _ = await self._open(node, ask)
        except PortalError as e:
            if e.reason in ("grant", "elsewhere"):
                session.mailbox_grant = None
                return None
            raise web.HTTPServiceUnavailable(text=UNAVAILABLE) from None
        try:
            response = export.mbox_response(user)
            await response.prepare(request)
            while True:
                async with asyncio.timeout(ANSWER_TIMEOUT):
                    (size,) = FRAME.unpack(await reader.readexactly(FRAME.size))
                    if size == 0:
                        break
                    if size > MAX_FRAME:
                        raise ValueError("frame too large")
                    data = await reader.readexactly(size)
                await response.write(data)
            await response.write_eof()
            return response
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as e:
            # Headers are out: all that can be done is to cut the response short, so the
            # browser reports a failed download rather than a complete one.
            log.warning("portal: mbox from %s cut short (%s)", node.name, type(e).__name__)
            raise ConnectionResetError("mailbox node stopped") from None
        finally:
            writer.close()
