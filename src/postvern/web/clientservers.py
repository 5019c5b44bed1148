"""The servers a mail client is told to use: one table behind every client-facing document.

Thunderbird's autoconfig, Microsoft's Autodiscover, Apple's configuration profile and the SRV
records ``postvern dns`` prints (RFC 6186, RFC 8314 §5.1) all describe the same thing: which
host and port to reach for IMAP, POP3 and submission, and whether TLS starts at once or after
STARTTLS. They read it from here, so they cannot disagree. Only the listeners actually
configured are offered, implicit TLS before STARTTLS, as RFC 8314 §3 recommends.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from postvern.config import Settings, parse_hostport


class Security(enum.Enum):
    """How a connection is protected; every server we list requires TLS one way or the other."""

    IMPLICIT_TLS = "implicit"  # TLS from the first byte (RFC 8314 §3)
    STARTTLS = "starttls"  # a plain greeting, then STARTTLS (RFC 2595, RFC 3207) before AUTH


class Protocol(enum.Enum):
    IMAP = "imap"
    POP3 = "pop3"
    SMTP = "smtp"  # submission (RFC 6409), never the MX port


@dataclass(frozen=True)
class ClientServer:
    listener: str  # the [listen] key, which is also the SRV service name
    protocol: Protocol
    security: Security
    host: str
    port: int

    @property
    def incoming(self) -> bool:
        return self.protocol is not Protocol.SMTP

    @property
    def srv_name(self) -> str:
        """``_imaps._tcp`` and so on: RFC 6186 §3 names them, RFC 8314 §5.1 adds _submissions."""
        return f"_{self.listener}._tcp"


# Every client-facing listener, in order of preference: incoming before outgoing, IMAP before
# POP3, implicit TLS before STARTTLS (RFC 8314 §3).
OFFERS: tuple[tuple[str, Protocol, Security], ...] = (
    ("imaps", Protocol.IMAP, Security.IMPLICIT_TLS),
    ("imap", Protocol.IMAP, Security.STARTTLS),
    ("pop3s", Protocol.POP3, Security.IMPLICIT_TLS),
    ("pop3", Protocol.POP3, Security.STARTTLS),
    ("submissions", Protocol.SMTP, Security.IMPLICIT_TLS),
    ("submission", Protocol.SMTP, Security.STARTTLS),
)


def client_servers(settings: Settings) -> list[ClientServer]:
    """The configured client listeners, best first, all on this server's public host name."""
    servers = []
    for listener, protocol, security in OFFERS:
        address = getattr(settings.listen, listener)
        if address is None:
            continue
        _, port = parse_hostport(address)
        servers.append(ClientServer(listener, protocol, security, settings.hostname, port))
    return servers


def preferred(servers: list[ClientServer], *protocols: Protocol) -> ClientServer | None:
    """The first server speaking the first of ``protocols`` that has one, for documents that
    can name only one incoming and one outgoing server (Apple's profile)."""
    for protocol in protocols:
        for server in servers:
            if server.protocol is protocol:
                return server
    return None
