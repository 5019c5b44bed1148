"""Connection plumbing shared by the IMAP and POP3 listeners.

:class:`Channel` is an ``asyncio.Protocol`` with flow control both ways and no buffer the
session cannot see — needed because asyncio's StreamReader would keep plaintext read before
a STARTTLS/STLS upgrade and hand it back afterwards, as if it had come through TLS
(CVE-2011-0411, the STARTTLS command-injection class). :class:`ConnectionCaps` bounds a
listener's open connections in all and per client address.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Awaitable, Callable

# Bytes read from the socket but not yet handed to the core. Past this we stop reading, so a
# client that pipelines faster than we answer is held back by TCP rather than by our memory.
READ_HIGH_WATER = 64 * 1024
# A TLS handshake (implicit or after STARTTLS) that has not finished by then never will;
# without a bound, half-open handshakes would hold connection slots for ever.
TLS_HANDSHAKE_TIMEOUT = 30.0


class Channel(asyncio.Protocol):
    """One connection's bytes, with flow control both ways and no buffer the session cannot see.

    asyncio's StreamReader keeps bytes it has read in a buffer that survives a TLS upgrade,
    so plaintext pipelined after STLS would be read back as if it came through TLS. Here the
    session drops such bytes itself (:meth:`discard_input`) before the handshake starts.
    """

    def __init__(self, on_open: Callable[[Channel], None]) -> None:
        self._on_open = on_open
        self.transport: asyncio.Transport | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._reading_paused = False
        self._eof = False
        self.lost = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    @property
    def peer_ip(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer[0]) if isinstance(peer, tuple) else "unknown"

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._on_open(self)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._queued += len(data)
        if self._queued >= READ_HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._readable.set()

    def eof_received(self) -> bool:
        self._eof = True
        self._readable.set()
        # Keep the write side open to answer what came before the half-close; TLS
        # transports close on EOF whatever we return (and warn if we ask otherwise).
        return self.transport is not None and self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self.lost = True
        self._readable.set()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- what the session uses ---------------------------------------------------------

    async def read(self) -> bytes:
        """The next chunk from the client; ``b""`` once it has closed."""
        while not self._chunks:
            if self._eof:
                return b""
            self._readable.clear()
            await self._readable.wait()
        data = self._chunks.popleft()
        self._queued -= len(data)
        self._resume_if_drained()
        return data

    def discard_input(self) -> None:
        self._chunks.clear()
        self._queued = 0
        self._resume_if_drained()

    def _resume_if_drained(self) -> None:
        if self._reading_paused and self._queued < READ_HIGH_WATER and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    async def drain(self) -> None:
        await self._writable.wait()

    async def start_tls(self, context: ssl.SSLContext) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        upgraded = await loop.start_tls(
            self.transport,
            self,
            context,
            server_side=True,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
        )
        if upgraded is None:
            raise ConnectionError("connection closed during the TLS handshake")
        self.transport = upgraded

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


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


async def serve_channels(
    host: str,
    port: int,
    *,
    run: Callable[[Channel], Awaitable[None]],
    caps: ConnectionCaps,
    busy: bytes,
    refusal: Callable[[str], bytes],
    admission: Admission | None,
    ssl_context: ssl.SSLContext,
    implicit_tls: bool,
) -> asyncio.Server:
    """Listen, cap connections, ask ``admission``, then ``run`` one session per channel.

    A connection over the caps gets ``busy`` and is closed before any session state
    exists; one refused by ``admission`` gets ``refusal(reason)`` and is closed before the
    greeting, so a banned client never reaches a password check.
    """
    loop = asyncio.get_running_loop()
    sessions: set[asyncio.Task[None]] = set()

    async def serve(channel: Channel) -> None:
        if admission is not None:
            reason = await admission(channel.peer_ip)
            if reason is not None:
                channel.write(refusal(reason))
                channel.close()
                return
        await run(channel)

    def opened(channel: Channel) -> None:
        ip = channel.peer_ip
        if not caps.admit(ip):
            channel.write(busy)
            channel.close()
            return
        task = loop.create_task(serve(channel))
        sessions.add(task)  # a strong reference, or the task could be collected mid-session

        def ended(task: asyncio.Task[None]) -> None:
            sessions.discard(task)
            caps.leave(ip)

        task.add_done_callback(ended)

    return await loop.create_server(
        lambda: Channel(opened),
        host,
        port,
        ssl=ssl_context if implicit_tls else None,
        ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if implicit_tls else None,
        reuse_address=True,
    )
