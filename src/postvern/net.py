"""Connection plumbing shared by the SMTP, IMAP and POP3 listeners.

:class:`Channel` is an ``asyncio.Protocol`` with flow control both ways and no buffer the
session cannot see — needed because asyncio's StreamReader would keep plaintext read before
a STARTTLS/STLS upgrade and hand it back afterwards, as if it had come through TLS
(CVE-2011-0411, the STARTTLS command-injection class). :func:`serve_channels` listens, bounds
open connections in all and per client address (:class:`ConnectionCaps`), and runs one
session per channel until :meth:`ChannelServer.shutdown`.
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import asyncio.sslproto
import collections
import logging
import ssl
import threading
import typing
from collections.abc import Awaitable, Callable
from typing import ClassVar

from postvern import handoff

log = logging.getLogger(__name__)

# asyncio's TLS transport reads the socket into a buffer of SSLProtocol.max_size that every
# connection allocates for itself (256 KiB by default, zero-filled, so resident). One TLS record
# carries at most 16 KiB of plaintext (RFC 8446 §5.1), so a read of 16 KiB takes a whole
# record. Our listeners go further (:class:`SharedBufferTLS`): the bytes read are copied into
# OpenSSL's input at once, so all connections of an event loop's thread share one buffer and
# an idle TLS connection holds none. The class-wide size still bounds other TLS users (the web
# server, outbound SMTP). uvloop has its own TLS code and buffers.
TLS_READ_BUFFER = 16 * 1024
asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER

# [server] event_loop: asyncio's own loop, or uvloop's (libuv), which costs less CPU per
# connection event; the same code runs on both.
EVENT_LOOPS = ("asyncio", "uvloop")


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for ``asyncio.Runner`` (None: asyncio's default loop)."""
    if name == "asyncio":
        return None
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    raise ValueError(f"[server] event_loop must be one of {', '.join(EVENT_LOOPS)}, not {name!r}")


EdgeObserver = Callable[[str, str, bytes, bool], None]

# Bytes read from the socket but not yet handed to the session. Past this we stop reading, so a
# client that sends faster than we answer is held back by TCP rather than by our memory: a
# channel holds at most this plus one transport read (asyncio reads up to 256 KiB at a time).
READ_HIGH_WATER = 64 * 1024
# Enough of a connection's first bytes to tell HTTP or a TLS ClientHello from a mail protocol.
FIRST_BYTES_KEPT = 8
# A TLS handshake (implicit or after STARTTLS) that has not finished by then never will;
# without a bound, half-open handshakes would hold connection slots for ever (asyncio's
# default is 60 s; a real client needs well under one).
TLS_HANDSHAKE_TIMEOUT = 30.0
# On shutdown, sessions busy with a request (a delivery being made durable) get this long to
# finish and say goodbye before they are cancelled.
SHUTDOWN_GRACE = 10.0


class _ThreadBuffer(threading.local):
    """The read buffer of one thread's event loop (a loop runs in one thread only)."""

    def __init__(self) -> None:
        self.buffer = bytearray(TLS_READ_BUFFER)
        self.view = memoryview(self.buffer)


_READ_BUFFER = _ThreadBuffer()


class SharedBufferTLS(asyncio.sslproto.SSLProtocol):
    """asyncio's TLS protocol reading through its thread's one buffer, and noting the first
    bytes a client sent (what a failed handshake is classified by, abuse/portscan.py).

    Sharing is safe on the selector event loop: it calls ``get_buffer``, ``recv_into`` and
    ``buffer_updated`` in one go, and ``buffer_updated`` copies the bytes into OpenSSL's
    input before it returns. Only used there (:func:`start_server_tls`).
    """

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        # asyncio's __init__ allocates a buffer of max_size: shadowed by 0 while it runs.
        vars(self)["max_size"] = 0
        super().__init__(*args, **kwargs)
        del vars(self)["max_size"]
        self._ssl_buffer = _READ_BUFFER.buffer
        self._ssl_buffer_view = _READ_BUFFER.view
        # A list does all asyncio asks of its write backlog (append, [0], del [0], clear);
        # an empty deque costs a 0.5 KiB block per connection, an empty list 56 bytes.
        self._write_backlog = []  # type: ignore[assignment]
        self.first_bytes = b""

    def buffer_updated(self, nbytes: int) -> None:
        if not self.first_bytes:
            self.first_bytes = bytes(self._ssl_buffer_view[: min(nbytes, FIRST_BYTES_KEPT)])
        super().buffer_updated(nbytes)


async def start_server_tls(
    transport: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    handshake_timeout: float,
) -> asyncio.Transport:
    """The server side of a TLS handshake on ``transport``, as ``loop.start_tls`` runs it but
    with :class:`SharedBufferTLS`; returns the TLS transport.

    On failure the connection is closed and :class:`TLSHandshakeFailed` says what the client
    had sent. Other loops (uvloop) run their own ``start_tls``.
    """
    loop = asyncio.get_running_loop()
    if not _selector_loop(loop):
        try:
            upgraded = await loop.start_tls(
                transport,
                protocol,
                context,
                server_side=True,
                ssl_handshake_timeout=handshake_timeout,
            )
        except (OSError, ssl.SSLError) as e:
            raise TLSHandshakeFailed(b"?", e) from e
        if upgraded is None:
            raise TLSHandshakeFailed(b"?", None)
        return upgraded
    waiter = loop.create_future()
    tls = SharedBufferTLS(
        loop,
        protocol,
        context,
        waiter,
        server_side=True,
        ssl_handshake_timeout=handshake_timeout,
        call_connection_made=False,
    )
    # Paused first, so no byte reaches the TLS protocol before its connection_made.
    transport.pause_reading()
    transport.set_protocol(tls)
    made = loop.call_soon(tls.connection_made, transport)
    resume = loop.call_soon(transport.resume_reading)
    try:
        await waiter
    except (OSError, ssl.SSLError) as e:
        transport.close()
        made.cancel()
        resume.cancel()
        raise TLSHandshakeFailed(tls.first_bytes, e) from e
    except BaseException:
        transport.close()
        made.cancel()
        resume.cancel()
        raise
    upgraded = tls._app_transport
    if upgraded is None:  # the connection was lost as the handshake ended
        raise TLSHandshakeFailed(tls.first_bytes, None)
    return typing.cast(asyncio.Transport, upgraded)


def _selector_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """asyncio's own loop on Unix, whose transports :class:`SharedBufferTLS` is written for."""
    return isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)


class TLSHandshakeFailed(ConnectionError):
    """A server-side TLS handshake did not complete; ``first_bytes``: what the client sent
    first (empty if nothing, ``b"?"`` when the event loop does not tell)."""

    def __init__(self, first_bytes: bytes, cause: BaseException | None) -> None:
        super().__init__(f"TLS handshake failed: {type(cause).__name__ if cause else 'closed'}")
        self.first_bytes = first_bytes


async def converse_and_close(
    protocol: str, converse: Callable[[], Awaitable[str]], finish: Callable[[], Awaitable[None]]
) -> None:
    """Run one session's conversation, then ``finish`` it whatever happened, and log why it
    ended: the reason ``converse`` returns, a failed connection, or (logged with its trace) a
    bug. One client's session must never take the listener down."""
    reason = "error"
    try:
        reason = await converse()
    except (OSError, ssl.SSLError, TimeoutError) as e:
        reason = f"connection failed ({type(e).__name__})"
    except Exception:
        log.exception("%s session failed", protocol)
    finally:
        await finish()
        log.info("%s session closed: %s", protocol, reason)


class Channel(asyncio.Protocol):
    """One connection's bytes, with flow control both ways and no buffer the session cannot see.

    asyncio's StreamReader keeps bytes it has read in a buffer that survives a TLS upgrade,
    so plaintext pipelined after STARTTLS would be read back as if it came through TLS. Here
    :meth:`discard_input` drops such bytes and stops reading before the session answers the
    command, and :meth:`start_tls` drops anything left, so nothing from before the handshake
    is ever returned after it. One task reads at a time.
    """

    def __init__(self, on_open: Callable[[Channel], None]) -> None:
        self._on_open = on_open
        self.transport: asyncio.Transport | None = None
        self._received: list[bytes] = []
        self._buffered = 0
        self._reading_paused = False
        self._eof = False
        self._interrupted = False
        self.lost = False  # the connection is gone: writes go nowhere, reads end
        # Made only while something waits: an idle connection holds neither (thousands of
        # IDLE sessions sit here; bench/imap_idle.py).
        self._input_waiter: asyncio.Future[None] | None = None
        self._on_input: Callable[[], None] | None = None
        self._writable: asyncio.Event | None = None  # exists while writing is paused
        # What the edge's scan detection looks at when the connection ends (abuse/portscan.py).
        self.first_bytes = b""
        self.tls_failed = False

    @property
    def peer_ip(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer[0]) if isinstance(peer, tuple) else "unknown"

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's is not a subclass of asyncio.Transport, so no isinstance.
        self.transport = typing.cast(asyncio.Transport, transport)
        self._on_open(self)

    def data_received(self, data: bytes) -> None:
        if not self.first_bytes:
            self.first_bytes = data[:FIRST_BYTES_KEPT]
        self._received.append(data)
        self._buffered += len(data)
        if self._buffered >= READ_HIGH_WATER:
            self._pause_reading()
        self._input_arrived()

    def eof_received(self) -> bool:
        self._eof = True
        self._input_arrived()
        # Keep the write side open to answer what came before the half-close; TLS
        # transports close on EOF whatever we return (and warn if we ask otherwise).
        return self.transport is not None and self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self.lost = True
        self._input_arrived()
        self.resume_writing()

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.Event()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None:
            writable.set()

    def _input_arrived(self) -> None:
        waiter = self._input_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._on_input is not None:
            self._on_input()

    # -- what the session uses ---------------------------------------------------------

    async def read(self) -> bytes | None:
        """Everything received so far, waiting for some; ``b""`` once the client has closed,
        ``None`` once :meth:`interrupt` was called. Cancelling it loses nothing."""
        while not self.readable:
            self._resume_reading()  # after discard_input with no handshake to follow
            self._input_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._input_waiter
            finally:
                self._input_waiter = None
        if self._interrupted:
            return None
        data = b"".join(self._received)
        self._received.clear()
        self._buffered = 0
        self._resume_reading()
        return data

    @property
    def readable(self) -> bool:
        """Whether :meth:`read` would return at once: input, its end, or an interrupt."""
        return bool(self._received) or self._eof or self._interrupted

    def notify_input(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` whenever :attr:`readable` may have become true (None: stop).
        For waiting on input and something else at once without a reading task (IDLE)."""
        self._on_input = callback
        if callback is not None:
            self._resume_reading()

    def interrupt(self) -> None:
        """Make the pending and every later :meth:`read` return ``None`` (shutdown)."""
        self._interrupted = True
        self._input_arrived()

    def discard_input(self) -> int:
        """Drop what was received but not yet read and stop reading until the next
        :meth:`read` or :meth:`start_tls`; returns how many bytes were dropped."""
        self._pause_reading()
        discarded = self._buffered
        self._received.clear()
        self._buffered = 0
        return discarded

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    @property
    def write_paused(self) -> bool:
        """Whether :meth:`drain` would wait (the transport's buffer is over its high mark)."""
        return self._writable is not None

    async def drain(self) -> None:
        """Wait until the transport takes writes again, or the connection is lost."""
        if self._writable is not None:
            await self._writable.wait()

    async def start_tls(
        self, context: ssl.SSLContext, handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT
    ) -> None:
        """Run the server side of a TLS handshake on this connection (STARTTLS, STLS, or
        implicit TLS at connect).

        Raises :class:`TLSHandshakeFailed` when the handshake fails or times out; the
        connection is closed then.
        """
        assert self.transport is not None
        # Synchronously before the handshake starts: nothing can arrive in between.
        self.discard_input()
        self.tls_failed = True  # until the handshake is done
        try:
            upgraded = await start_server_tls(self.transport, self, context, handshake_timeout)
        except TLSHandshakeFailed as e:
            if not self.first_bytes:  # implicit TLS: what the client sent instead
                self.first_bytes = e.first_bytes
            raise
        self.tls_failed = False
        self.transport = upgraded
        self._reading_paused = False  # the TLS transport reads on its own

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping unsent output (a client that stopped reading)."""
        if self.transport is not None:
            self.transport.abort()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.lost:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.lost:
            self._reading_paused = False
            self.transport.resume_reading()


class ConnectionCaps:
    """Open connections of one listener, in all and per client address."""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self._open = 0
        self._by_ip: collections.Counter[str] = collections.Counter()

    def admit(self, ip: str) -> bool:
        if self._open >= self.total or self._by_ip[ip] >= self.per_ip:
            return False
        self._open += 1
        self._by_ip[ip] += 1
        return True

    def leave(self, ip: str) -> None:
        self._open -= 1
        self._by_ip[ip] -= 1
        if self._by_ip[ip] <= 0:
            del self._by_ip[ip]


# Decides at connect whether a client may go on (bans, connection rate): None to admit,
# else a short reason the listener puts into its own protocol's refusal.
Admission = Callable[[str], Awaitable[str | None]]


class ChannelServer:
    """A listening socket and the sessions it runs; end it with :meth:`shutdown`."""

    # Told of every session that ended: (listener, client address, the first bytes it sent,
    # whether its TLS handshake failed: STARTTLS or implicit; on a failed implicit handshake
    # the first bytes are the raw ones). The server sets it (abuse/portscan.py).
    observer: ClassVar[EdgeObserver | None] = None

    def __init__(
        self,
        name: str,
        run: Callable[[Channel], Awaitable[None]],
        *,
        caps: ConnectionCaps,
        busy: bytes,
        refusal: Callable[[str], bytes] | None = None,
        admission: Admission | None = None,
    ) -> None:
        if admission is not None and refusal is None:
            raise ValueError("an admission check needs a refusal to send")
        self.name = name  # the service, for logs: "smtp", "imap"...
        self._run = run
        self._caps = caps
        self._busy = busy
        self._refusal = refusal
        self._admission = admission
        self._sessions: dict[asyncio.Task[None], Channel] = {}
        self._server: asyncio.Server | None = None
        self._tls: ssl.SSLContext | None = None  # implicit TLS: the handshake at connect
        self._handshake_timeout = TLS_HANDSHAKE_TIMEOUT

    @property
    def server(self) -> asyncio.Server:
        assert self._server is not None, "not listening yet"
        return self._server

    @property
    def sockets(self) -> tuple[object, ...]:
        return tuple(self._server.sockets) if self._server else ()

    @property
    def port(self) -> int:
        """The port of the first listening socket (useful after binding port 0)."""
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    async def listen(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT,
    ) -> None:
        """Accept on ``host:port``; with ``ssl_context`` TLS starts at connect. A socket
        inherited for that address (systemd, a predecessor: handoff.py) is used as it is.

        The listener accepts plain TCP and runs the TLS handshake itself (:meth:`_serve`), so a
        failed handshake ends a session like any other and the scan detection sees it; asyncio's
        own ``create_server(ssl=...)`` would drop it before any of our code ran.
        """
        loop = asyncio.get_running_loop()
        inherited = handoff.take(host, port)
        where: dict[str, typing.Any] = (
            {"sock": inherited}
            if inherited is not None
            else {"host": host, "port": port, "reuse_address": True}
        )
        if ssl_context is not None and not _selector_loop(loop):
            # uvloop starts reading after connection_made, so bytes could reach the channel
            # before a handshake of ours took over: there, its own TLS runs at accept (and
            # failed handshakes go unseen).
            where.update(ssl=ssl_context, ssl_handshake_timeout=handshake_timeout)
            ssl_context = None
        self._tls = ssl_context
        self._handshake_timeout = handshake_timeout
        self._server = await loop.create_server(lambda: Channel(self._opened), **where)

    def _opened(self, channel: Channel) -> None:
        if self._tls is not None:
            # Nothing is read before the handshake takes the connection over.
            channel.discard_input()
        ip = channel.peer_ip
        if not self._caps.admit(ip):
            # Before any session state exists, in the listener's own protocol; over implicit
            # TLS there is no protocol before a handshake, which is what the caps save.
            log.info("%s: connection refused, too many connections", self.name)
            if self._tls is None:
                channel.write(self._busy)
            channel.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve(channel))
        self._sessions[task] = channel  # a strong reference, or it could be collected mid-session

        def ended(task: asyncio.Task[None]) -> None:
            self._sessions.pop(task, None)
            self._caps.leave(ip)
            if ChannelServer.observer is not None:
                ChannelServer.observer(self.name, ip, channel.first_bytes, channel.tls_failed)

        task.add_done_callback(ended)

    async def _serve(self, channel: Channel) -> None:
        if self._tls is not None:
            try:
                await channel.start_tls(self._tls, self._handshake_timeout)
            except TLSHandshakeFailed as e:
                log.info("%s: TLS handshake failed (%s)", self.name, e)
                return
        if self._admission is not None and self._refusal is not None:
            reason = await self._admission(channel.peer_ip)
            if reason is not None:
                # Before the greeting, so a banned client never reaches a password check.
                channel.write(self._refusal(reason))
                channel.close()
                return
        await self._run(channel)

    async def shutdown(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop listening, interrupt every session's read (each then says goodbye in its own
        protocol), and cancel those still running after ``grace`` seconds."""
        if self._server is not None:
            self._server.close()
        for channel in self._sessions.values():
            channel.interrupt()
        tasks = list(self._sessions)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


async def serve_channels(
    name: str,
    host: str,
    port: int,
    *,
    run: Callable[[Channel], Awaitable[None]],
    caps: ConnectionCaps,
    busy: bytes,
    refusal: Callable[[str], bytes] | None = None,
    admission: Admission | None = None,
    ssl_context: ssl.SSLContext | None = None,
    implicit_tls: bool = False,
    handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT,
) -> ChannelServer:
    """Listen, cap connections, ask ``admission``, then ``run`` one session per channel.

    A connection over the caps gets ``busy`` and is closed before any session state
    exists; one refused by ``admission`` gets ``refusal(reason)`` and is closed before the
    greeting. With ``implicit_tls`` the handshake (bounded by ``handshake_timeout``) comes
    first; otherwise ``ssl_context`` is the session's to use for STARTTLS.
    """
    if implicit_tls and ssl_context is None:
        raise ValueError("implicit TLS needs an ssl_context")
    listener = ChannelServer(name, run, caps=caps, busy=busy, refusal=refusal, admission=admission)
    await listener.listen(host, port, ssl_context if implicit_tls else None, handshake_timeout)
    return listener
