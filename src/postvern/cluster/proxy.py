"""The front's IMAP and POP3 proxies: log the client in on its mailbox node, then copy bytes.

Until login the front speaks the protocol itself, with the single server's own cores
(greeting, CAPABILITY, STARTTLS/STLS, ID, NOOP, LOGOUT), so the client sees the same server.
At LOGIN / AUTHENTICATE PLAIN (IMAP) or USER+PASS / AUTH PLAIN (POP3) the front:

1. applies the abuse gate for the client's address — the front is the one that sees it;
2. finds the user's mailbox node (placement.py) and opens mutual TLS to it (ALPN names the
   service, the node's name is pinned);
3. sends the PROXY line with the client's address, then relays the login as AUTHENTICATE
   PLAIN (SASL-IR) or AUTH PLAIN, under the client's own tag;
4. on success writes the node's reply to the client verbatim, hands over what the client
   pipelined after its login, and from then on copies bytes both ways until either side
   closes. On failure it counts the failure, waits the failure delay and answers as a
   single server would, and the client may try again.

The front never sees the mailbox key: Argon2id and the unlock run on the mailbox node.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from postvern.cluster import pki, proxyline
from postvern.cluster.nodes import ClusterError, Node
from postvern.cluster.placement import Placement
from postvern.config import Limits
from postvern.directory.addresses import AddressError, normalise_address
from postvern.directory.db import Directory
from postvern.imap.grammar import commands as c
from postvern.imap.protocol import (
    NEED_DATA,
    PAUSED,
    CommandReceived,
    ConnectionClosed,
    ImapConnection,
    LocalProtocolError,
    ProtocolConfig,
    StartTLSRequested,
)
from postvern.imap.serialize import Code, Completion, Condition, ResponseCode, Status
from postvern.imap.session import CAPABILITIES, PREAUTH_TIMEOUT
from postvern.login import AbuseGate
from postvern.net import Channel, ConnectionCaps, converse_and_close, serve_channels
from postvern.pop3 import protocol as pop3
from postvern.pop3.protocol import POP3Connection

log = logging.getLogger(__name__)

# Connecting to the node and its greeting; the login itself may wait for Argon2id there.
CONNECT_TIMEOUT = 10.0
LOGIN_TIMEOUT = 60.0
# Bytes copied per read: one TLS record's worth of plaintext (RFC 8446 §5.1).
PIPE_CHUNK = 16 * 1024
UNAVAILABLE = "mailbox temporarily unavailable, try again"


@dataclass
class Backend:
    """An open, logged-in connection to the mailbox node."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


class Front:
    """What both proxies share: the directory, the placement, the gate, the node TLS."""

    def __init__(
        self,
        *,
        directory: Directory,
        placement: Placement,
        identity: pki.NodeIdentity,
        gate: AbuseGate,
        failure_delay: float,
        executor: Any,
    ) -> None:
        self.directory = directory
        self.placement = placement
        self.gate = gate
        self.failure_delay = failure_delay
        self.executor = executor
        self.contexts = {s: identity.client_context(s) for s in ("imap", "pop3")}
        self.proxied = 0  # sessions handed to a mailbox node (metrics, tests)

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def node_of(self, address: str) -> Node | None:
        """The mailbox node of the user who logs in as ``address``; None: no such user."""
        try:
            account = normalise_address(address)
        except AddressError:
            return None
        user = await self._thread(self.directory.user, account)
        if user is None:
            return None
        node: Node = await self._thread(self.placement.node_for, user.id)
        return node

    async def connect(
        self, service: str, node: Node, client: tuple[str, int], local: tuple[str, int]
    ) -> tuple[Backend, bytes]:
        """Open the node's ``service``, send the PROXY line; returns it and the greeting."""
        host, port = node.hostport
        async with asyncio.timeout(CONNECT_TIMEOUT):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=self.contexts[service], server_hostname=node.name
            )
            writer.write(proxyline.build(client, local))
            greeting = await reader.readline()
        return Backend(reader, writer), greeting

    async def refuse(self, ip: str, account: str, protocol: str) -> bool:
        """Count a failed login and wait; True if the address is banned now."""
        await self.gate.login_failed(ip, account, protocol)
        await asyncio.sleep(self.failure_delay)
        return self.gate.is_banned(ip) is not None


def _addresses(channel: Channel) -> tuple[tuple[str, int], tuple[str, int]]:
    """(client address, port) and (our address, port) of a connection, for the PROXY line."""
    assert channel.transport is not None
    peer = channel.transport.get_extra_info("peername")
    local = channel.transport.get_extra_info("sockname")
    if not isinstance(peer, tuple) or not isinstance(local, tuple):
        raise ConnectionError("a connection without addresses")
    return (str(peer[0]), int(peer[1])), (str(local[0]), int(local[1]))


async def pipe(channel: Channel, backend: Backend, idle: float) -> str:
    """Copy bytes both ways until one side closes; the reason it ended."""

    async def upstream() -> str:
        while True:
            data = await channel.read()
            if data is None:
                return "front shutting down"
            if not data:
                return "client closed"
            backend.writer.write(data)
            await backend.writer.drain()

    async def downstream() -> str:
        while True:
            data = await backend.reader.read(PIPE_CHUNK)
            if not data:
                return "mailbox node closed"
            channel.write(data)
            async with asyncio.timeout(idle):
                await channel.drain()
            if channel.lost:
                return "client gone"

    tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return next(iter(done)).result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        backend.writer.close()


def _code_of(line: str) -> str | None:
    """The response code of a status reply (``[NAME ...]`` after the status word)."""
    _, _, rest = line.partition(" NO ")
    if not rest.startswith("["):
        return None
    return rest[1:].split("]", 1)[0].split(" ", 1)[0].upper()


class _ProxySession:
    """What both proxies share: the client channel, the core's output, STARTTLS, closing.
    :meth:`run` never raises."""

    protocol = ""
    conn: ImapConnection | POP3Connection

    def __init__(
        self, channel: Channel, *, front: Front, ssl_context: ssl.SSLContext, idle: float
    ) -> None:
        self.channel = channel
        self.front = front
        self.ssl_context = ssl_context
        self.idle = idle
        self.peer, self.local = _addresses(channel)

    async def run(self) -> None:
        await converse_and_close(self.protocol, self._converse, self._finish)

    async def _converse(self) -> str:
        raise NotImplementedError

    async def _finish(self) -> None:
        self.channel.close()

    async def _flush(self) -> bool:
        data = self.conn.data_to_send()
        if data:
            self.channel.write(data)
        async with asyncio.timeout(self.idle):
            await self.channel.drain()
        return not self.channel.lost

    async def _start_tls(self) -> None:
        self.channel.discard_input()  # CVE-2011-0411: nothing pipelined survives
        await self._flush()
        await self.channel.start_tls(self.ssl_context)

    def _hand_over(self, backend: Backend, reply: bytes) -> Backend:
        """Logged in: the node's reply to the client, what it pipelined to the node."""
        self.channel.write(self.conn.data_to_send() + reply)
        pending = self.conn.take_pending_input()
        if pending:
            backend.writer.write(pending)
        self.front.proxied += 1
        return backend


class ImapProxySession(_ProxySession):
    """One client connection of the front's IMAP listener."""

    protocol = "imap"

    def __init__(
        self,
        channel: Channel,
        *,
        front: Front,
        limits: Limits,
        ssl_context: ssl.SSLContext,
        tls_active: bool,
        hostname: str,
    ) -> None:
        super().__init__(
            channel, front=front, ssl_context=ssl_context, idle=limits.imap_idle_timeout
        )
        self.hostname = hostname
        config = ProtocolConfig(capabilities=CAPABILITIES, tls_available=True, limits=limits)
        self.conn: ImapConnection = ImapConnection(config, tls_active=tls_active)

    async def _converse(self) -> str:
        self.conn.greeting(f"{self.hostname} Postvern IMAP ready")
        while True:
            event = self.conn.next_event()
            if isinstance(event, StartTLSRequested):
                await self._start_tls()
                self.conn.tls_established()
                continue
            if not await self._flush():
                return "client stopped reading"
            if event is NEED_DATA:
                await self._read()
            elif isinstance(event, CommandReceived):
                command = event.command
                if isinstance(command, c.Login | c.Authenticate):
                    backend = await self._login(command)
                    if backend is not None:
                        return await pipe(self.channel, backend, self.idle)
                elif isinstance(command, c.Noop):
                    self.conn.send(Completion.ok(command.tag, "NOOP completed"))
                else:  # the core passes nothing else on before login
                    self.conn.send(Completion.no(command.tag, "log in first"))
            elif isinstance(event, ConnectionClosed):
                await self._flush()
                return event.reason
            elif event is PAUSED:
                raise LocalProtocolError("the core waits for a completion that was never sent")

    async def _read(self) -> None:
        try:
            async with asyncio.timeout(PREAUTH_TIMEOUT):
                data = await self.channel.read()
        except TimeoutError:
            self.conn.send(Condition(Status.BYE, "autologout: idle for too long"))
            return
        if data is None:
            self.conn.send(Condition(Status.BYE, "server shutting down"))
            return
        self.conn.receive_data(data)

    async def _login(self, command: c.Login | c.Authenticate) -> Backend | None:
        """Log in on the user's node; the connection, or None with a completion sent."""
        tag = command.tag
        if isinstance(command, c.Login):
            user, secret = command.username, command.password
        else:
            credentials = command.credentials
            if credentials is None:
                self.conn.send(Completion.no(tag, "unsupported authentication mechanism"))
                return None
            if credentials.authzid and credentials.authzid != credentials.authcid:
                code = ResponseCode(Code.AUTHORIZATIONFAILED)
                self.conn.send(Completion.no(tag, "cannot act as another user", code))
                return None
            user, secret = credentials.authcid, credentials.password
        refusal = await self.front.gate.login_allowed(self.peer[0], user)
        if refusal is not None:
            self.conn.send(Completion.no(tag, refusal, ResponseCode(Code.UNAVAILABLE)))
            return None
        try:
            return await self._relay_login(tag, user, secret)
        except (OSError, ssl.SSLError, TimeoutError, ClusterError, ValueError) as e:
            log.warning("imap proxy: mailbox node unreachable (%s)", type(e).__name__)
            self.conn.send(Completion.no(tag, UNAVAILABLE, ResponseCode(Code.UNAVAILABLE)))
            return None

    async def _relay_login(self, tag: str, user: str, secret: str) -> Backend | None:
        node = await self.front.node_of(user)
        if node is None:
            await self._failed(tag, user, "authentication failed", Code.AUTHENTICATIONFAILED)
            return None
        backend, greeting = await self.front.connect("imap", node, self.peer, self.local)
        try:
            if not greeting.startswith(b"* OK"):
                raise ConnectionError("the mailbox node did not greet")
            plain = base64.b64encode(f"\0{user}\0{secret}".encode()).decode()
            backend.writer.write(f"{tag} AUTHENTICATE PLAIN {plain}\r\n".encode())
            async with asyncio.timeout(LOGIN_TIMEOUT):
                lines = [await backend.reader.readline()]
                while not lines[-1].startswith(tag.encode() + b" "):
                    if not lines[-1].endswith(b"\n"):
                        raise ConnectionError("the mailbox node closed during login")
                    lines.append(await backend.reader.readline())
        except BaseException:
            backend.writer.close()
            raise
        final = lines[-1].decode("utf-8", "replace").rstrip("\r\n")
        if final.startswith(f"{tag} OK"):
            await self.front.gate.login_succeeded(self.peer[0], user, "imap")
            return self._hand_over(backend, b"".join(lines))
        backend.writer.close()
        name = _code_of(final)
        text = final.split("] ", 1)[1] if "] " in final else "authentication failed"
        if name == Code.AUTHENTICATIONFAILED:
            await self._failed(tag, user, text, Code.AUTHENTICATIONFAILED)
        else:
            code = (
                ResponseCode(Code(name)) if name is not None and name in Code.__members__ else None
            )
            self.conn.send(Completion.no(tag, text, code))
        return None

    async def _failed(self, tag: str, user: str, text: str, code: Code) -> None:
        if await self.front.refuse(self.peer[0], user, "imap"):
            text, code = "too many failed logins; try again later", Code.UNAVAILABLE
        self.conn.send(Completion.no(tag, text, ResponseCode(code)))


class Pop3ProxySession(_ProxySession):
    """One client connection of the front's POP3 listener."""

    protocol = "pop3"

    def __init__(
        self,
        channel: Channel,
        *,
        front: Front,
        limits: Limits,
        ssl_context: ssl.SSLContext,
        tls_active: bool,
    ) -> None:
        super().__init__(
            channel, front=front, ssl_context=ssl_context, idle=limits.pop3_idle_timeout
        )
        self.conn: POP3Connection = POP3Connection(
            tls_active=tls_active, tls_available=not tls_active
        )

    async def _converse(self) -> str:
        while True:
            event = self.conn.next_event()
            if isinstance(event, pop3.NeedData):
                if not await self._flush():
                    return "client stopped reading"
                await self._read()
            elif isinstance(event, pop3.Closed):
                await self._flush()
                return event.reason
            elif isinstance(event, pop3.StartTLS):
                await self._start_tls()
                self.conn.tls_started()
            elif isinstance(event, pop3.Authenticate):
                backend = await self._login(event)
                if backend is not None:
                    return await pipe(self.channel, backend, self.idle)
            if not await self._flush():
                return "client stopped reading"

    async def _read(self) -> None:
        try:
            async with asyncio.timeout(self.idle):
                data = await self.channel.read()
        except TimeoutError:
            self.conn.idle_timeout()
            return
        if data is None:
            self.conn.shutdown()
            return
        self.conn.receive_data(data)

    async def _login(self, event: pop3.Authenticate) -> Backend | None:
        user = event.username
        if await self.front.gate.login_allowed(self.peer[0], user) is not None:
            self.conn.refuse_login(pop3.ResponseCode.LOGIN_DELAY)
            return None
        try:
            node = await self.front.node_of(user)
            if node is None:
                await self._failed(user, None)
                return None
            backend, greeting = await self.front.connect("pop3", node, self.peer, self.local)
        except (OSError, ssl.SSLError, TimeoutError, ClusterError) as e:
            log.warning("pop3 proxy: mailbox node unreachable (%s)", type(e).__name__)
            self.conn.refuse_login(pop3.ResponseCode.SYS_TEMP)
            return None
        try:
            if not greeting.startswith(b"+OK"):
                raise ConnectionError("the mailbox node did not greet")
            plain = base64.b64encode(f"\0{user}\0{event.password}".encode()).decode()
            backend.writer.write(f"AUTH PLAIN {plain}\r\n".encode())
            async with asyncio.timeout(LOGIN_TIMEOUT):
                reply = await backend.reader.readline()
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
            backend.writer.close()
            log.warning("pop3 proxy: login on the mailbox node failed (%s)", type(e).__name__)
            self.conn.refuse_login(pop3.ResponseCode.SYS_TEMP)
            return None
        if reply.startswith(b"+OK"):
            await self.front.gate.login_succeeded(self.peer[0], user, "pop3")
            return self._hand_over(backend, reply)
        backend.writer.close()
        text = reply.decode("utf-8", "replace").rstrip("\r\n")
        if "[AUTH]" in text:
            await self._failed(user, text.split("] ", 1)[-1])
        else:
            self.conn.refuse_login(pop3.ResponseCode.SYS_TEMP)
        return None

    async def _failed(self, user: str, text: str | None) -> None:
        if await self.front.refuse(self.peer[0], user, "pop3"):
            self.conn.refuse_login(pop3.ResponseCode.LOGIN_DELAY)
        else:
            self.conn.refuse_login(pop3.ResponseCode.AUTH, text)


IMAP_BUSY = b"* BYE too many connections, try again later\r\n"
SessionFactory = Callable[[Channel, Any], _ProxySession]


def _starter(service: str, implicit_tls: bool, busy: bytes, factory: SessionFactory) -> Any:
    """A listener starter (server.STARTERS' shape): the single server's caps, admission
    (bans, connection rate) and TLS, with a proxy session per connection."""
    refusals = {
        "imap": lambda reason: f"* BYE [UNAVAILABLE] {reason}\r\n".encode(),
        "pop3": lambda reason: f"-ERR [LOGIN-DELAY] {reason}\r\n".encode(),
    }

    async def start(server: Any, host: str, port: int) -> Any:
        limits: Limits = server.settings.limits

        async def run(channel: Channel) -> None:
            await factory(channel, server).run()

        return await serve_channels(
            service,
            host,
            port,
            run=run,
            caps=ConnectionCaps(limits.connections, limits.connections_per_ip),
            busy=busy,
            refusal=refusals[service],
            admission=server.admission(service),
            ssl_context=server.tls_context,
            implicit_tls=implicit_tls,
        )

    return start


def imap_starter(front: Front, implicit_tls: bool) -> Any:
    def session(channel: Channel, server: Any) -> _ProxySession:
        return ImapProxySession(
            channel,
            front=front,
            limits=server.settings.limits,
            ssl_context=server.tls_context,
            tls_active=implicit_tls,
            hostname=server.settings.hostname,
        )

    return _starter("imap", implicit_tls, IMAP_BUSY, session)


def pop3_starter(front: Front, implicit_tls: bool) -> Any:
    def session(channel: Channel, server: Any) -> _ProxySession:
        return Pop3ProxySession(
            channel,
            front=front,
            limits=server.settings.limits,
            ssl_context=server.tls_context,
            tls_active=implicit_tls,
        )

    return _starter("pop3", implicit_tls, pop3.BUSY, session)
