"""The POP3 listeners: port 110 style (STLS) and pop3s (implicit TLS, RFC 8314 §3.3).

Each accepted connection becomes a :class:`~postvern.pop3.session.POP3Session` task. A
connection over the listener's caps is told so in one line and closed before any session
state exists.
"""

from __future__ import annotations

import ssl

from postvern.config import Limits
from postvern.login import LoginService
from postvern.net import Admission, Channel, ChannelServer, ConnectionCaps, serve_channels
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
    admission: Admission | None = None,
) -> ChannelServer:
    """Listen on ``host:port``; with ``implicit_tls`` TLS starts at connect, else by STLS."""

    async def run(channel: Channel) -> None:
        session = POP3Session(
            channel, login=login, limits=limits, ssl_context=ssl_context, tls_active=implicit_tls
        )
        await session.run()

    return await serve_channels(
        "pop3",
        host,
        port,
        run=run,
        caps=ConnectionCaps(limits.connections, limits.connections_per_ip),
        busy=BUSY,
        refusal=lambda reason: f"-ERR [LOGIN-DELAY] {reason}\r\n".encode(),
        admission=admission,
        ssl_context=ssl_context,
        implicit_tls=implicit_tls,
    )
