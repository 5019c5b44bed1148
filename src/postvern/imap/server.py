"""The IMAP listeners: port 143 style (STARTTLS, LOGINDISABLED until then) and imaps (implicit
TLS, RFC 8314 §3.3).

Each accepted connection becomes an :class:`~postvern.imap.session.ImapSession` task. A
connection over the listener's caps is told so in one line and closed before any session
state exists. Both listeners of one server count sessions per user together.
"""

from __future__ import annotations

import ssl
import weakref

from postvern.config import Limits
from postvern.imap.session import ImapSession, SessionCounter
from postvern.login import LoginService
from postvern.net import Admission, Channel, ChannelServer, ConnectionCaps, serve_channels
from postvern.store.service import MailboxRegistry

# RFC 9051 §7.1.5: a BYE may be sent instead of the greeting when the server refuses.
BUSY = b"* BYE too many connections, try again later\r\n"
# One session counter per login service: the imap and imaps listeners of one server share it.
_COUNTERS: weakref.WeakKeyDictionary[LoginService, SessionCounter] = weakref.WeakKeyDictionary()


def _counter(login: LoginService, limits: Limits) -> SessionCounter:
    counter = _COUNTERS.get(login)
    if counter is None:
        counter = _COUNTERS[login] = SessionCounter(limits.imap_sessions_per_user)
    return counter


async def start_imap_server(
    host: str,
    port: int,
    *,
    login: LoginService,
    registry: MailboxRegistry,
    ssl_context: ssl.SSLContext,
    implicit_tls: bool,
    limits: Limits,
    hostname: str,
    plaintext_auth: bool = False,
    admission: Admission | None = None,
) -> ChannelServer:
    """Listen on ``host:port``; with ``implicit_tls`` TLS starts at connect, else by STARTTLS.

    ``registry`` is the one ``login`` unlocks mailboxes in (sessions reach the store only
    through the handle a login returns). ``plaintext_auth`` allows LOGIN before TLS: only
    for loopback benchmarks, never for a listener others can reach.
    """
    if login.registry is not registry:
        raise ValueError("the login service must unlock mailboxes in the given registry")
    counter = _counter(login, limits)

    async def run(channel: Channel) -> None:
        session = ImapSession(
            channel,
            login=login,
            limits=limits,
            ssl_context=ssl_context,
            tls_active=implicit_tls,
            hostname=hostname,
            counter=counter,
            plaintext_auth=plaintext_auth,
        )
        await session.run()

    return await serve_channels(
        "imap",
        host,
        port,
        run=run,
        caps=ConnectionCaps(limits.connections, limits.connections_per_ip),
        busy=BUSY,
        refusal=lambda reason: f"* BYE [UNAVAILABLE] {reason}\r\n".encode(),
        admission=admission,
        ssl_context=ssl_context,
        implicit_tls=implicit_tls,
    )
