"""Client autoconfiguration: the Thunderbird/K-9/FairEmail format (config-v1.1.xml).

A client that knows only the user's address asks ``autoconfig.<domain>`` for the servers to
use. We answer with the listeners actually configured — implicit TLS first (RFC 8314), then
STARTTLS — and the full address as the user name.
"""

from __future__ import annotations

from xml.sax.saxutils import escape

from postvern.config import Settings
from postvern.web.clientservers import Security, client_servers

# The format's socketType for each way a listener starts TLS.
SOCKET_TYPES = {Security.IMPLICIT_TLS: "SSL", Security.STARTTLS: "STARTTLS"}


def config_xml(settings: Settings, domain: str) -> str:
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<clientConfig version="1.1">',
        f'  <emailProvider id="{escape(domain)}">',
        f"    <domain>{escape(domain)}</domain>",
        f"    <displayName>{escape(domain)} mail</displayName>",
    ]
    for server in client_servers(settings):
        element = "incomingServer" if server.incoming else "outgoingServer"
        lines += [
            f'    <{element} type="{server.protocol.value}">',
            f"      <hostname>{escape(server.host)}</hostname>",
            f"      <port>{server.port}</port>",
            f"      <socketType>{SOCKET_TYPES[server.security]}</socketType>",
            "      <authentication>password-cleartext</authentication>",
            "      <username>%EMAILADDRESS%</username>",
            f"    </{element}>",
        ]
    lines += ["  </emailProvider>", "</clientConfig>"]
    return "\n".join(lines) + "\n"
