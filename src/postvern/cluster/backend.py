"""A mailbox node's internal listener: IMAP, POP3 and LMTP for fronts, moves for the admin.

One port per node, mutual TLS only; the service is the TLS ALPN protocol the peer asked for
("imap", "pop3", "lmtp", "postvern-admin"), so a node has one address in nodes.toml and no
service can be mistaken for another. The handshake already required a certificate from the
cluster's CA; here the peer must also have the right role: a *front* (the only role that
proxies clients and delivers mail), or the *admin* for move requests (move.py). An IMAP or POP3
connection starts with a PROXY v1 line carrying the real client address (proxyline.py), which
the session then uses as its peer (logs, login records). After that the sessions are the
single server's (with a hook a move uses to end them): the login runs Argon2id here, once,
and opens the mailbox here.
Bans and rate limits are the front's (it sees the client); this side adds no delay of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from postvern.cluster import move, pki, portal, proxyline
from postvern.cluster.lmtp import LMTPSession, Replicated
from postvern.cluster.nodes import ClusterError, Node
from postvern.cluster.placement import Placement
from postvern.config import Limits
from postvern.crypto.serverkey import ServerKey
from postvern.directory.db import User
from postvern.imap.session import SessionCounter
from postvern.login import LoggedIn, LoginRefused, LoginService
from postvern.net import Channel, ChannelServer, ConnectionCaps, converse_and_close
from postvern.smtp.replies import Reply
from postvern.store.service import MailboxRegistry
from postvern.store.spool import SpoolItem

log = logging.getLogger(__name__)

# "imap", "pop3": IANA's ALPN ids
ALPN = ["imap", "pop3", "lmtp", move.ALPN, move.FAILOVER_ALPN, portal.ALPN]
# A front sends the PROXY line at once; one that does not within this is not a front.
PROXY_LINE_TIMEOUT = 10.0
BUSY = b"* BYE too many internal connections\r\n"
NOT_HERE = "this mailbox is on another node; try again"
FENCED = "this node has lost its liveness lease; try again"


class BackendLogin(LoginService):
    """The single-server login, refusing users this node does not own (moved, failed over):
    their mailbox file is elsewhere, so opening one here would start an empty mailbox."""

    def __init__(self, *args: Any, owns: Callable[[str], bool], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._owns = owns

    async def login(self, address: str, secret: str, peer_ip: str, protocol: str) -> LoggedIn:
        unlocked = await self.verify(address, secret, peer_ip, protocol)
        if not await self._thread(self._owns, unlocked.user.id):
            raise LoginRefused("elsewhere", NOT_HERE)
        handle = await self.registry.unlock(unlocked.user, unlocked.mailbox_key)
        return LoggedIn(unlocked.user, handle)


class Backend:
    """Everything the internal listener serves with."""

    def __init__(
        self,
        *,
        node: Node,
        identity: pki.NodeIdentity,
        placement: Placement,
        login: LoginService,
        registry: MailboxRegistry,
        limits: Limits,
        server_key: ServerKey,
        replicated: Replicated,
        serving: Callable[[], bool] | None = None,
    ) -> None:
        self.node = node
        # False while the node has no valid liveness lease (liveness.py): it serves nobody.
        self.serving = serving or (lambda: True)
        self.identity = identity
        self.placement = placement
        self.login = BackendLogin(
            login.accounts,
            registry,
            failure_delay=0.0,  # the front delays failures; it faces the client
            cache_seconds=login.cache.idle_seconds,
            owns=self.owns,
        )
        self.registry = registry
        self.limits = limits
        self.counter = SessionCounter(limits.imap_sessions_per_user)
        self.sessions = move.Sessions()
        self.replicated = replicated
        self.moves = move.MoveService(
            login.accounts.data_dir, registry, self.sessions, server_key=server_key
        )
        self.moves.serving = self.sessions.serving = self.serving
        self._settling: asyncio.Task[None] | None = None
        self.listener: ChannelServer | None = None
        self.tls = identity.server_context(ALPN)
        self.portal = portal.PortalService(
            login=self.login,
            accounts=login.accounts,
            registry=registry,
            owns=self.owns,
            node=node.name,
            moves=self.moves,  # removing a user first ends its sessions, as a move does
        )

    def owns(self, user_id: str) -> bool:
        """Blocking (the directory): is ``user_id`` placed on this node?"""
        if not self.serving() or user_id in self.moves.evicted:
            return False
        try:
            return self.placement.node_for(user_id).name == self.node.name
        except ClusterError:
            log.exception("placement lookup failed")
            return False

    async def start(self) -> ChannelServer:
        host, port = self.node.hostport
        caps = ConnectionCaps(self.limits.connections, self.limits.connections)
        self.listener = ChannelServer("internal", self._serve, caps=caps, busy=BUSY)
        await self.listener.listen(host, port, self.tls)
        return self.listener

    async def _serve(self, channel: Channel) -> None:
        assert channel.transport is not None
        tls = channel.transport.get_extra_info("ssl_object")
        peer = pki.peer_node(tls)
        service = tls.selected_alpn_protocol() if tls is not None else None
        wanted = "admin" if service == move.ALPN else "front"
        if peer is None or peer[1] != wanted or service not in ALPN:
            log.warning("internal connection refused: wrong role, or no known service")
            channel.close()
            return
        if service == move.ALPN:
            await converse_and_close("admin", lambda: self.moves.serve(channel), _closer(channel))
            return
        if service == move.FAILOVER_ALPN:  # a front's watcher (liveness.py)

            async def serve() -> str:
                verbs, check = move.FAILOVER_VERBS, self._other_replica
                return await self.moves.serve(channel, verbs=verbs, replica_ok=check)

            await converse_and_close("failover", serve, _closer(channel))
            return
        if service == "lmtp":
            await self._lmtp(channel)
            return
        if service == portal.ALPN:  # the account portal of a front (portal.py)
            await converse_and_close("portal", lambda: self.portal.serve(channel), _closer(channel))
            return
        client_ip = await self._proxy_line(channel)
        if client_ip is None:
            channel.close()
            return
        session: move.EvictableImap | move.EvictablePop3
        if service == "imap":
            session = move.EvictableImap(
                channel,
                sessions=self.sessions,
                login=self.login,
                limits=self.limits,
                ssl_context=None,  # already TLS: nothing to STARTTLS into
                tls_active=True,
                hostname=self.node.name,
                counter=self.counter,
            )
        else:
            # tls_active: STLS is not offered, so the context is never used again.
            session = move.EvictablePop3(
                channel,
                sessions=self.sessions,
                login=self.login,
                limits=self.limits,
                ssl_context=self.tls,
                tls_active=True,
            )
        session.peer_ip = client_ip
        await session.run()

    def _other_replica(self, url: str) -> bool:
        """A front may only have this node restore from another mailbox node's replica."""
        return any(
            n.replica == url and n.role == "mailbox" and n.name != self.node.name
            for n in self.placement.nodes.values()
        )

    def fence(self) -> None:
        """The liveness lease is gone: every IMAP/POP3 session is interrupted now, in the
        caller's callback, so none reads another command; they end and the mailboxes close
        in the background (new logins, LMTP recipients and deliveries are refused already:
        :meth:`owns`)."""
        users = self.sessions.users()
        for user_id in users:
            for session in self.sessions.of(user_id):
                session.evicted = True
                session.channel.interrupt()
        self._settling = asyncio.get_running_loop().create_task(self._settle(users))

    async def _settle(self, users: list[str]) -> None:
        for user_id in users:
            with contextlib.suppress(TimeoutError):
                await self.sessions.end(user_id, move.EVICT_GRACE)
        for user_id in users:
            await move.close_mailbox(self.registry, user_id)

    async def _proxy_line(self, channel: Channel) -> str | None:
        """The client address from the PROXY line; None (and logged) if there is none."""
        data = b""
        try:
            async with asyncio.timeout(PROXY_LINE_TIMEOUT):
                while b"\r\n" not in data and len(data) <= proxyline.MAX_LINE:
                    chunk = await channel.read()
                    if not chunk:
                        return None
                    data += chunk
            if not data.endswith(b"\r\n"):
                raise proxyline.ProxyLineError("bytes after the PROXY line, before the greeting")
            return proxyline.parse(data) or channel.peer_ip
        except (TimeoutError, proxyline.ProxyLineError) as e:
            log.warning("internal connection without a valid PROXY line: %s", e)
            return None

    async def _lmtp(self, channel: Channel) -> None:
        session = LMTPSession(
            channel,
            hostname=self.node.name,
            recipient=self._recipient,
            deliver=self._deliver,
            max_size=self.limits.message_size,
            replicated=self.replicated,
        )
        await session.run()

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.registry.executor, fn, *args)

    async def _recipient(self, address: str) -> tuple[Reply, object | None]:
        directory = self.login.accounts.directory
        try:
            user = await self._thread(directory.user, address)
            if user is None:
                return Reply(550, "5.1.1", "no such user"), None
            if not await self._thread(self.owns, user.id):
                return Reply(451, "4.3.0", NOT_HERE), None
        except Exception:
            log.exception("lmtp recipient lookup failed")
            return Reply(451, "4.3.0", "lookup failed, try again"), None
        return Reply(250, "2.1.5", "recipient OK"), user

    async def _deliver(
        self, target: object, junk: bool, raw: bytes, delivery_id: str | None
    ) -> Reply:
        assert isinstance(target, User)
        if not self.serving():  # fenced between RCPT and the end of DATA
            return Reply(451, "4.3.0", FENCED)
        item = SpoolItem(raw, "\\Junk" if junk else None, delivery_id=delivery_id)
        try:
            where = await self.registry.deliver(target, item)
        except Exception:
            log.exception("lmtp delivery failed")
            return Reply(451, "4.3.0", "temporary failure storing the message")
        # Durable now (WAL commit or fsynced spool). The time is taken after that, so a
        # replication that started later holds the copy (the front waits for one: relay.py).
        return Reply(250, "2.0.0", f"stored ({where}) at={time.time():.6f}")


def _closer(channel: Channel) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        channel.close()

    return close
