"""Port-scan and garbage detection at the application edge, feeding the ban logic.

A mail client or server always says something in the listener's protocol. A scanner
touches ports and leaves: it connects and sends nothing, sends an HTTP request or a TLS
ClientHello to a plaintext mail port, fails the STARTTLS handshake it started, or sends
plaintext, HTTP or a broken ClientHello to an implicit-TLS port (465, 993, 995). Each such
ended connection is an *offence*; a client with ``[abuse] scan_offences`` of them within
``scan_window`` seconds, or offences on ``scan_listeners`` different listeners (one
address sweeping our ports), is banned through :meth:`Abuse.on_scan` — the same escalating
bans, shared through Redis and mirrored into nftables, as for password guessing.

The implicit-TLS listeners accept plain TCP and run the handshake themselves
(net.ChannelServer), so a failed handshake ends a session like any other: the raw bytes the
client sent instead say which offence it was (nothing: silent; an HTTP request: wrong
protocol; anything else: a failed handshake). A connection that completes the handshake and
then says nothing is silent, as on a plaintext port. The web server's HTTPS port is aiohttp's
and is not watched.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import time
from collections.abc import Callable
from typing import Protocol

from postvern.abuse.bans import Ban
from postvern.abuse.network import AddressError, client_key, parse_ip

log = logging.getLogger(__name__)

# What HTTP requests (RFC 9110 §9 methods, the HTTP/2 preface) and a TLS record carrying a
# handshake (RFC 8446 §5.1: content type 22, legacy version 3.x) start with.
HTTP_STARTS = (b"GET ", b"POST ", b"HEAD ", b"PUT ", b"OPTIONS ", b"CONNECT ", b"PRI * ")
TLS_HANDSHAKE_START = b"\x16\x03"
# Clients tracked at once; past this the oldest are forgotten (a spoofed flood cannot grow
# memory without bound; real scanners complete TCP handshakes and are few).
MAX_TRACKED = 65536


class Offence(enum.StrEnum):
    SILENT = "silent"  # connected and sent nothing
    WRONG_PROTOCOL = "wrong_protocol"  # HTTP or TLS where a mail protocol was expected
    TLS_FAILED = "tls_failed"  # a TLS handshake (STARTTLS or implicit) that did not complete


class Gate(Protocol):
    def is_banned(self, ip: str) -> object: ...

    async def on_scan(self, ip: str, reason: str) -> Ban | None: ...


def classify(first_bytes: bytes, tls_failed: bool) -> Offence | None:
    """What an ended connection did wrong: ``first_bytes`` are the first it sent (the raw
    ones when an implicit-TLS handshake failed), ``tls_failed`` whether a handshake failed."""
    if not first_bytes:
        return Offence.SILENT
    if first_bytes.startswith(HTTP_STARTS):
        return Offence.WRONG_PROTOCOL
    if tls_failed:
        return Offence.TLS_FAILED
    if first_bytes.startswith(TLS_HANDSHAKE_START):
        return Offence.WRONG_PROTOCOL
    return None


class ScanDetector:
    def __init__(
        self,
        gate: Gate,
        *,
        offences: int,
        listeners: int,
        window: float,
        on_offence: Callable[[Offence], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gate = gate
        self.offences = offences
        self.listeners = listeners
        self.window = window
        self.on_offence = on_offence
        self.clock = clock
        self._seen: collections.OrderedDict[str, list[tuple[float, str]]] = (
            collections.OrderedDict()
        )
        self._tasks: set[asyncio.Task[object]] = set()

    def observe(self, listener: str, ip: str, first_bytes: bytes, tls_failed: bool) -> None:
        """net.ChannelServer.observer: one session ended."""
        offence = classify(first_bytes, tls_failed)
        if offence is None or self.offences <= 0 or self.gate.is_banned(ip) is not None:
            return
        try:
            key = client_key(parse_ip(ip))
        except AddressError:
            return
        if self.on_offence is not None:
            self.on_offence(offence)
        now = self.clock()
        recent = [(t, n) for t, n in self._seen.pop(key, []) if t > now - self.window]
        recent.append((now, listener))
        self._seen[key] = recent
        while len(self._seen) > MAX_TRACKED:
            self._seen.popitem(last=False)
        if len(recent) >= self.offences:
            reason = f"port scan: {len(recent)} connections without a mail exchange"
        elif len({n for _, n in recent}) >= self.listeners:
            reason = f"port scan: {len({n for _, n in recent})} listeners touched"
        else:
            return
        del self._seen[key]
        task = asyncio.get_running_loop().create_task(self.gate.on_scan(ip, reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
