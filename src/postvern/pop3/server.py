"""The POP3 listeners: port 110 style (STLS) and pop3s (implicit TLS, RFC 8314 §3.3).

Each accepted connection becomes a :class:`~postvern.pop3.session.POP3Session` task. A
connection over the listener's caps is told so in one line and closed before any session
state exists.
"""

from __future__ import annotations

import asyncio
import ssl

from postvern.config import Limits
from postvern.login import LoginService
from postvern.net import TLS_HANDSHAKE_TIMEOUT, Channel, ConnectionCaps
from postvern.pop3.protocol import BUSY
from postvern.pop3.session import POP3Session


async def start_pop3_server(
    host: str,
    port: int,
    *,
    login: LoginService,
    ssl_context: ssl.SSLContext,
    implicit_tls: bool,
    limits: Limits,
) -> asyncio.Server:
    """Listen on ``host:port``; with ``implicit_tls`` TLS starts at connect, else by STLS."""
    loop = asyncio.get_running_loop()
    caps = ConnectionCaps(limits.connections, limits.connections_per_ip)
    sessions: set[asyncio.Task[None]] = set()

    def opened(channel: Channel) -> None:
        ip = channel.peer_ip
        if not caps.admit(ip):
            channel.write(BUSY)
            channel.close()
            return
        session = POP3Session(
            channel, login=login, limits=limits, ssl_context=ssl_context, tls_active=implicit_tls
        )
        task = loop.create_task(session.run())
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
