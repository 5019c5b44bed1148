"""The HAProxy PROXY protocol, version 1: who the client really is, in one line.

A front opens the internal connection on the client's behalf, so the mailbox node would see
the front's address; the first line says the client's instead, as HAProxy, Dovecot and Postfix
do it (haproxy.org/download/2.9/doc/proxy-protocol.txt, §2.1). The mailbox node believes it
only from a peer holding a front's certificate (backend.py). Sans-I/O: build and parse only.
"""

from __future__ import annotations

import ipaddress

# §2.1: "a receiver may safely ... read at most 107 bytes" (the longest TCP6 line + CRLF).
MAX_LINE = 107
SIGNATURE = b"PROXY "


class ProxyLineError(ValueError):
    """Not a well-formed PROXY v1 line."""


def build(client: tuple[str, int], local: tuple[str, int]) -> bytes:
    """``PROXY TCP4|TCP6 <client> <local> <cport> <lport>\\r\\n`` (UNKNOWN if mixed)."""
    src, dst = ipaddress.ip_address(client[0]), ipaddress.ip_address(local[0])
    if src.version != dst.version:
        return b"PROXY UNKNOWN\r\n"
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {client[1]} {local[1]}\r\n".encode()


def parse(line: bytes) -> str | None:
    """The client address of a complete line (CRLF included); None for ``UNKNOWN``."""
    if len(line) > MAX_LINE or not line.startswith(SIGNATURE) or not line.endswith(b"\r\n"):
        raise ProxyLineError("not a PROXY v1 line")
    fields = line[:-2].decode("ascii", "replace").split(" ")
    if fields[1:2] == ["UNKNOWN"]:
        return None  # §2.1: the receiver uses the connection's own addresses
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyLineError("malformed PROXY v1 line")
    try:
        src = ipaddress.ip_address(fields[2])
        ipaddress.ip_address(fields[3])
        ports = [int(fields[4]), int(fields[5])]
    except ValueError:
        raise ProxyLineError("malformed address in the PROXY line") from None
    if src.version != (4 if fields[1] == "TCP4" else 6) or not all(0 <= p <= 65535 for p in ports):
        raise ProxyLineError("inconsistent PROXY line")
    return str(src)
