"""The asyncio side of the SMTP server: sockets, TLS and timeouts around the sans-I/O core.

:func:`serve_smtp` listens through :func:`postvern.net.serve_channels` (connection caps,
shutdown); each connection runs an :class:`SMTPSession` over a :class:`~postvern.net.Channel`,
feeding a :class:`~postvern.smtp.protocol.ServerConnection` and asking a :class:`Handler` (MX
delivery, submission) for every policy decision. SMTP's rules live in the core; this module
only moves bytes, keeps time, and speaks TLS.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from postvern.config import Limits
from postvern.net import (
    TLS_HANDSHAKE_TIMEOUT,
    Channel,
    ChannelServer,
    ConnectionCaps,
    serve_channels,
)
from postvern.smtp import replies, sasl
from postvern.smtp.address import Address
from postvern.smtp.commands import MailParams, RcptParams
from postvern.smtp.events import (
    Auth,
    AuthResponse,
    Bdat,
    ConnectionClosed,
    Data,
    Ehlo,
    Event,
    Helo,
    Help,
    Mail,
    MessageBody,
    MessageRejected,
    NeedData,
    Noop,
    ProtocolError,
    Quit,
    Rcpt,
    Refused,
    Rset,
    StartTLS,
    Unsynchronized,
    Vrfy,
)
from postvern.smtp.protocol import ServerConnection
from postvern.smtp.replies import Reply

logger = logging.getLogger("postvern.smtp")

_R = TypeVar("_R")


class InsecureTLSContextError(ValueError):
    """The SSLContext allows protocol versions older than TLS 1.2."""


# --- What the handler sees ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TLSInfo:
    """The negotiated TLS parameters, as a Received header wants them (RFC 8314 §4.3)."""

    version: str  # "TLSv1.3"
    cipher: str  # "TLS_AES_256_GCM_SHA384"
    bits: int | None


@dataclass(slots=True)
class Recipient:
    address: Address
    params: RcptParams


@dataclass(slots=True)
class Transaction:
    """The envelope being built: MAIL accepted, and the RCPTs accepted so far."""

    sender: Address | None  # None is the null reverse-path <>
    params: MailParams
    recipients: list[Recipient] = field(default_factory=list)


@dataclass(slots=True)
class SessionState:
    """One connection as the handler sees it. The session keeps it current; a handler may
    read everything and set ``user`` during ``on_auth`` (see :meth:`Handler.on_auth`)."""

    session_id: str
    peer_ip: str
    peer_port: int
    local_ip: str
    local_port: int
    hostname: str  # ours, as greeted
    implicit_tls: bool = False
    helo: str | None = None  # the client's EHLO/HELO name, once accepted
    esmtp: bool = False
    tls: TLSInfo | None = None
    user: str | None = None  # the authenticated identity after a 235
    authzid: str | None = None  # the authorization identity the client asked for, if any
    transaction: Transaction | None = None
    messages: int = 0  # messages accepted (2xx after the text) in this session

    @property
    def sender(self) -> Address | None:
        return self.transaction.sender if self.transaction else None

    @property
    def recipients(self) -> list[Address]:
        return [r.address for r in self.transaction.recipients] if self.transaction else []

    @property
    def received_protocol(self) -> str:
        """The "with" keyword of a Received header: ESMTP, ESMTPS, ESMTPSA... (RFC 3848), or
        UTF8SMTP... for an SMTPUTF8 transaction (RFC 6531 §3.7.3)."""
        if not self.esmtp:
            return "SMTP"
        utf8 = self.transaction is not None and self.transaction.params.smtputf8
        return ("UTF8SMTP" if utf8 else "ESMTP") + "S" * bool(self.tls) + "A" * bool(self.user)


class Handler(Protocol):
    """The policy of one listener; one instance per connection (see ``handler_factory``).

    Every method may return any reply with a matching enhanced code; :mod:`replies` has the
    usual ones. A method that raises is answered with 451 4.3.0 (454 for AUTH) and logged,
    and the session goes on. A 421 reply closes the connection.
    """

    @property
    def auth_mechanisms(self) -> Sequence[str]:
        """SASL mechanisms to offer ("PLAIN", "LOGIN"); empty: AUTH is not offered."""
        ...

    @property
    def auth_requires_tls(self) -> bool:
        """Offer AUTH only under TLS; AUTH before STARTTLS gets 538 5.7.11."""
        ...

    async def on_connect(self, state: SessionState) -> Reply | None:
        """Before the greeting. ``None``: the standard 220. 421 refuses and closes; 554
        refuses but waits for QUIT (RFC 5321 §3.1)."""
        ...

    async def on_helo(self, state: SessionState, domain: str, extended: bool) -> Reply | None:
        """EHLO (``extended``) or HELO. ``None``: the standard reply with the extensions."""
        ...

    async def on_mail(
        self, state: SessionState, sender: Address | None, params: MailParams
    ) -> Reply:
        """MAIL FROM; ``sender`` None is the null path. 250 2.1.0 accepts."""
        ...

    async def on_rcpt(self, state: SessionState, recipient: Address, params: RcptParams) -> Reply:
        """RCPT TO; ``state.transaction`` holds the sender and the recipients so far."""
        ...

    async def on_message(self, state: SessionState, message: bytes) -> Reply:
        """The complete message (dot-unstuffed, or the BDAT chunks joined). 250 only once it
        is durable; one reply covers all recipients (RFC 5321 §4.1.1.4)."""
        ...

    async def on_auth(
        self, state: SessionState, mechanism: str, authzid: str, authcid: str, password: str
    ) -> Reply:
        """Check credentials: 235 2.7.0 accepts, 535 5.7.8 refuses. ``authzid`` is "" unless
        the client asked to act as someone else; refuse it unless that is allowed. On 235
        ``state.user`` becomes ``authcid`` unless the handler set it to something else."""
        ...

    async def on_disconnect(self, state: SessionState) -> None:
        """After the connection closed, whatever the reason."""
        ...


class BaseHandler:
    """A handler that accepts nothing: subclass it and override what the listener needs."""

    auth_mechanisms: Sequence[str] = ()
    auth_requires_tls: bool = True

    async def on_connect(self, state: SessionState) -> Reply | None:
        return None

    async def on_helo(self, state: SessionState, domain: str, extended: bool) -> Reply | None:
        return None

    async def on_mail(
        self, state: SessionState, sender: Address | None, params: MailParams
    ) -> Reply:
        return replies.sender_ok()

    async def on_rcpt(self, state: SessionState, recipient: Address, params: RcptParams) -> Reply:
        return Reply(550, "5.7.1", "Relaying denied")

    async def on_message(self, state: SessionState, message: bytes) -> Reply:
        return replies.local_error()

    async def on_auth(
        self, state: SessionState, mechanism: str, authzid: str, authcid: str, password: str
    ) -> Reply:
        return replies.auth_failed()

    async def on_disconnect(self, state: SessionState) -> None:
        return None


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """How a listener runs its sessions. Timeouts and limits come from ``limits``."""

    hostname: str = "localhost"
    limits: Limits = field(default_factory=Limits)
    ssl_context: ssl.SSLContext | None = None
    implicit_tls: bool = False  # port 465 (RFC 8314): TLS from the first byte
    smtputf8: bool = True
    chunking: bool = True
    dsn: bool = False  # advertise only if the MTA honours NOTIFY/RET (RFC 3461)
    tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT


def check_tls_context(context: ssl.SSLContext) -> None:
    """Refuse a context that would negotiate below TLS 1.2 (RFC 8996 deprecates 1.0 and 1.1)."""
    minimum = context.minimum_version
    if minimum != ssl.TLSVersion.MAXIMUM_SUPPORTED and minimum < ssl.TLSVersion.TLSv1_2:
        raise InsecureTLSContextError("SSLContext.minimum_version must be TLS 1.2 or later")


def tls_info(transport: asyncio.BaseTransport | None) -> TLSInfo | None:
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    return TLSInfo(
        version=ssl_object.version() or "",
        cipher=cipher[0] if cipher else "",
        bits=cipher[2] if cipher else None,
    )


# --- One session ----------------------------------------------------------------------------


class SMTPSession:
    """Drives one connection: reads into the core, asks the handler, writes the replies."""

    def __init__(self, channel: Channel, handler: Handler, settings: SessionSettings) -> None:
        unknown = {m.upper() for m in handler.auth_mechanisms} - set(sasl.MECHANISMS)
        if unknown:
            raise ValueError(f"SASL mechanisms not implemented: {sorted(unknown)}")
        if settings.ssl_context is not None:
            check_tls_context(settings.ssl_context)
        self._channel = channel
        self._handler = handler
        self._settings = settings
        limits = settings.limits
        transport = channel.transport
        tls = tls_info(transport)
        self.conn = ServerConnection(
            limits,
            tls_available=settings.ssl_context is not None,
            tls_active=tls is not None,
            auth_mechanisms=handler.auth_mechanisms,
            auth_requires_tls=handler.auth_requires_tls,
            smtputf8=settings.smtputf8,
            chunking=settings.chunking,
            dsn=settings.dsn,
        )
        peer = _address(transport, "peername")
        local = _address(transport, "sockname")
        self.state = SessionState(
            session_id=secrets.token_hex(6),
            peer_ip=peer[0],
            peer_port=peer[1],
            local_ip=local[0],
            local_port=local[1],
            hostname=settings.hostname,
            implicit_tls=settings.implicit_tls,
            tls=tls,
        )
        self._out: list[bytes] = []
        self._sasl: sasl.Mechanism | None = None
        self._deadline = 0.0

    async def run(self) -> None:
        try:
            await self._converse()
        except Exception:
            # One client's session must never take the listener down.
            logger.exception("smtp session %s failed", self.state.session_id)
        finally:
            self._channel.close()
            await self._call(self._handler.on_disconnect(self.state), None)
            logger.debug("smtp session %s closed", self.state.session_id)

    async def _converse(self) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self._settings.limits.smtp_session_timeout
        greeting = await self._call(
            self._handler.on_connect(self.state), replies.service_unavailable()
        )
        self._out.append(self.conn.send(greeting or replies.greeting(self._settings.hostname)))
        while not self.conn.closed:
            event = self.conn.next_event()
            if isinstance(event, NeedData):
                data = await self._flush_and_read()
                if data is None:
                    break
                self.conn.receive_data(data)
            elif isinstance(event, ConnectionClosed):
                break
            elif isinstance(event, StartTLS):
                if not await self._start_tls(event):
                    break
            else:
                reply = await self._answer(event)
                if self.conn.refusing_data:
                    reply = self._synchronized(event, reply)
                self._out.append(self.conn.send(reply))
                self._record(event, reply)
        await self._flush()

    async def _flush_and_read(self) -> bytes | None:
        """Write the batched replies (RFC 2920 §3.2: before blocking on input), then read.

        Returns ``None`` when the session must end: timed out, shut down or unwritable.
        """
        if not await self._flush():
            return None
        remaining = self._deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            # Checked here as well: a client that never lets the stream run dry would
            # otherwise never be made to wait, and never time out.
            await self._goodbye(replies.session_time_exceeded())
            return None
        idle = self._settings.limits.smtp_idle_timeout
        timeout, goodbye = (
            (idle, replies.idle_timeout())
            if idle <= remaining
            else (remaining, replies.session_time_exceeded())
        )
        try:
            async with asyncio.timeout(timeout):
                data = await self._channel.read()
        except TimeoutError:
            await self._goodbye(goodbye)
            return None
        if data is None:
            await self._goodbye(replies.shutting_down())
        return data

    async def _flush(self) -> bool:
        if self._out:
            self._channel.write(b"".join(self._out))
            self._out.clear()
        try:
            # A client that stops reading must not hold the session forever.
            async with asyncio.timeout(self._settings.limits.smtp_idle_timeout):
                await self._channel.drain()
        except TimeoutError:
            self._channel.abort()
            return False
        return True

    async def _goodbye(self, reply: Reply) -> None:
        if not self.conn.closed:
            self._out.append(self.conn.send(reply))
            await self._flush()

    async def _start_tls(self, event: StartTLS) -> bool:
        # Stop reading before the 220 goes out: the ClientHello that answers it belongs to the
        # TLS layer, and anything already received in plaintext must not survive the switch.
        self._discard_pipelined("STARTTLS", event.discarded)
        context = self._settings.ssl_context
        reply = replies.ready_to_start_tls() if context else replies.tls_not_available()
        self._out.append(self.conn.send(reply))
        if not await self._flush():
            return False
        if context is None:  # the core offers STARTTLS only with a context; read on
            return True
        try:
            await self._channel.start_tls(context, self._settings.tls_handshake_timeout)
        except Exception as e:  # handshake failures come as several exception types
            logger.info("smtp session %s: TLS handshake failed: %s", self.state.session_id, e)
            return False
        self.conn.tls_started()
        state = self.state
        state.tls = tls_info(self._channel.transport)
        state.helo, state.esmtp, state.user, state.authzid = None, False, None, None
        state.transaction = None
        return True

    def _discard_pipelined(self, command: str, discarded: int) -> int:
        """Drop what the client sent behind a command it must wait on (RFC 2920 §3.1): the
        ``discarded`` bytes the core threw away, and what the channel holds besides, which
        was received before the reply went out. Logged by count, never by content."""
        discarded += self._channel.discard_input()
        if discarded:
            logger.warning(
                "smtp session %s: discarded %d bytes pipelined after %s",
                self.state.session_id,
                discarded,
                command,
            )
        return discarded

    def _synchronized(self, event: Event, reply: Reply) -> Reply:
        """The reply to a refused DATA, or 421 (which closes) if the message text came
        behind it without waiting: as commands, its lines would join the transaction."""
        in_core = event.discarded if isinstance(event, Unsynchronized) else 0
        if not self._discard_pipelined("DATA", in_core):
            return reply
        return replies.improper_pipelining("DATA")

    async def _answer(self, event: Event) -> Reply:
        """The reply to one request: the core's own, a standard one, or the handler's."""
        state, handler, hostname = self.state, self._handler, self._settings.hostname
        if isinstance(event, ProtocolError | Refused | MessageRejected | Unsynchronized):
            return event.reply
        if isinstance(event, Ehlo | Helo):
            extended = isinstance(event, Ehlo)
            reply = await self._call(
                handler.on_helo(state, event.domain, extended), replies.local_error()
            )
            if reply is not None:
                return reply
            if extended:
                return replies.ehlo(hostname, event.domain, self.conn.extensions())
            return replies.helo(hostname)
        if isinstance(event, Mail):
            return await self._ask(handler.on_mail(state, event.address, event.params))
        if isinstance(event, Rcpt):
            return await self._ask(handler.on_rcpt(state, event.address, event.params))
        if isinstance(event, MessageBody):
            return await self._ask(handler.on_message(state, event.data))
        if isinstance(event, Auth):
            self._sasl = sasl.server_mechanism(event.mechanism)
            return await self._sasl_step(event.initial_response)
        if isinstance(event, AuthResponse):
            return await self._sasl_step(event.response)
        return _standard_reply(event, hostname)

    async def _sasl_step(self, response: bytes | None) -> Reply:
        mechanism = self._sasl
        if mechanism is None:
            return replies.bad_sequence()
        try:
            result = mechanism.step(response)
        except sasl.SASLError:
            return replies.auth_malformed()
        if isinstance(result, bytes):
            return replies.auth_challenge(result)
        state = self.state
        state.user = None
        reply = await self._call(
            self._handler.on_auth(
                state, mechanism.name, result.authzid, result.authcid, result.password
            ),
            replies.auth_temporary_failure(),
        )
        if reply.code == 235:
            state.user = state.user or result.authcid
            state.authzid = result.authzid or None
        else:
            state.user = None
            if reply.code == 535 and self._settings.limits.auth_failure_delay > 0:
                # Slow password guessing down without holding anything but this session.
                await asyncio.sleep(self._settings.limits.auth_failure_delay)
        return reply

    def _record(self, event: Event, reply: Reply) -> None:
        """Mirror into SessionState what the core just did with the reply."""
        state = self.state
        positive = reply.is_positive
        if isinstance(event, Auth | AuthResponse) and reply.code != 334:
            self._sasl = None
        if isinstance(event, Ehlo | Helo) and positive:
            state.helo, state.esmtp = event.domain, isinstance(event, Ehlo)
            state.transaction = None
        elif isinstance(event, Mail) and positive:
            state.transaction = Transaction(event.address, event.params)
        elif isinstance(event, Rcpt) and positive and state.transaction is not None:
            state.transaction.recipients.append(Recipient(event.address, event.params))
        elif isinstance(event, MessageBody):
            state.messages += 1 if positive else 0
            state.transaction = None
        elif isinstance(event, MessageRejected | Rset):
            state.transaction = None
        elif isinstance(event, Bdat) and not positive:
            state.transaction = None

    async def _ask(self, call: Awaitable[Reply]) -> Reply:
        return await self._call(call, replies.local_error())

    async def _call(self, call: Awaitable[_R], fallback: _R) -> _R:
        try:
            return await call
        except Exception:
            logger.exception("smtp session %s: handler failed", self.state.session_id)
            return fallback


def _standard_reply(event: Event, hostname: str) -> Reply:
    """Replies that need no policy: the same for every listener."""
    if isinstance(event, Data):
        return replies.start_data()
    if isinstance(event, Bdat):
        return replies.chunk_received(event.size)
    if isinstance(event, Quit):
        return replies.closing(hostname)
    if isinstance(event, Vrfy):
        return replies.cannot_vrfy()
    if isinstance(event, Help):
        return replies.help_text()
    if isinstance(event, Rset | Noop):
        return replies.ok()
    raise TypeError(f"no standard reply to {type(event).__name__}")


def _address(transport: asyncio.BaseTransport | None, name: str) -> tuple[str, int]:
    address = transport.get_extra_info(name) if transport else None
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return "", 0


# --- The listener ---------------------------------------------------------------------------

# What serve_smtp returns: the listener and its sessions; shutdown() makes each session
# answer 421 4.3.2 the next time it waits for input.
SMTPServer = ChannelServer


async def serve_smtp(
    host: str,
    port: int,
    handler_factory: Callable[[], Handler],
    *,
    hostname: str = "localhost",
    ssl_context: ssl.SSLContext | None = None,
    implicit_tls: bool = False,
    limits: Limits | None = None,
    smtputf8: bool = True,
    chunking: bool = True,
    dsn: bool = False,
    tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT,
) -> SMTPServer:
    """Listen for SMTP on ``host:port``; one ``handler_factory()`` per connection.

    Port 25 and 587: ``ssl_context`` enables STARTTLS. Port 465: ``implicit_tls=True``.
    ``limits`` (``config.Limits``) bounds lines, messages, recipients, errors, time, and
    connections in total and per client IP (over which a client gets 421 4.7.0).
    ``tls_handshake_timeout`` bounds the handshake, implicit or after STARTTLS.
    """
    if ssl_context is not None:
        check_tls_context(ssl_context)
    settings = SessionSettings(
        hostname=hostname,
        limits=limits or Limits(),
        ssl_context=ssl_context,
        implicit_tls=implicit_tls,
        smtputf8=smtputf8,
        chunking=chunking,
        dsn=dsn,
        tls_handshake_timeout=tls_handshake_timeout,
    )

    async def run(channel: Channel) -> None:
        try:
            session = SMTPSession(channel, handler_factory(), settings)
        except Exception:
            logger.exception("smtp: cannot start a session")
            channel.write(replies.local_error().to_bytes())
            channel.close()
            return
        await session.run()

    return await serve_channels(
        "smtp",
        host,
        port,
        run=run,
        caps=ConnectionCaps(settings.limits.connections, settings.limits.connections_per_ip),
        # RFC 5321 §3.1: a 421 greeting, then close, before any handler runs.
        busy=replies.too_many_connections().to_bytes(),
        ssl_context=ssl_context,
        implicit_tls=implicit_tls,
        handshake_timeout=tls_handshake_timeout,
    )
