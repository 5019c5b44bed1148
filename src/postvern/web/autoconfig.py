"""Client autoconfiguration: the Thunderbird/K-9/FairEmail format (config-v1.1.xml).

A client that knows only the user's address asks ``autoconfig.<domain>`` for the servers to
use. We answer with the listeners actually configured — implicit TLS first (RFC 8314), then
STARTTLS — and the full address as the user name.
"""

from __future__ import annotations

from xml.sax.saxutils import escape

from postvern.config import Settings, parse_hostport

# (listener, protocol element, type attribute, socketType) in order of preference.
_SERVERS = (
    ("imaps", "incomingServer", "imap", "SSL"),
    ("imap", "incomingServer", "imap", "STARTTLS"),
    ("pop3s", "incomingServer", "pop3", "SSL"),
    ("pop3", "incomingServer", "pop3", "STARTTLS"),
    ("submissions", "outgoingServer", "smtp", "SSL"),
    ("submission", "outgoingServer", "smtp", "STARTTLS"),
)


def config_xml(settings: Settings, domain: str) -> str:
    host = escape(settings.hostname)
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<clientConfig version="1.1">',
        f'  <emailProvider id="{escape(domain)}">',
        f"    <domain>{escape(domain)}</domain>",
        f"    <displayName>{escape(domain)} mail</displayName>",
    ]
    for listener, element, kind, socket_type in _SERVERS:
        address = getattr(settings.listen, listener)
        if address is None:
            continue
        _, port = parse_hostport(address)
        lines += [
            f'    <{element} type="{kind}">',
            f"      <hostname>{host}</hostname>",
            f"      <port>{port}</port>",
            f"      <socketType>{socket_type}</socketType>",
            "      <authentication>password-cleartext</authentication>",
            "      <username>%EMAILADDRESS%</username>",
            f"    </{element}>",
        ]
    lines += ["  </emailProvider>", "</clientConfig>"]
    return "\n".join(lines) + "\n"
