"""Envelope paths of SMTP (RFC 5321 §4.1.2), with the UTF-8 addresses of RFC 6531.

``MAIL FROM`` and ``RCPT TO`` carry a path: a mailbox in angle brackets, the null path
``<>`` of bounces, or a mailbox behind an obsolete source route, which §3.6.1 lets a server
ignore. Parsing follows the ABNF so that the handler sees exactly the mailbox the client
named, and anything else becomes a syntax error the client is told about.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

# RFC 5321 §4.5.3.1.3: a reverse- or forward-path is at most 256 octets including the
# angle brackets. Local parts over the 64 octets of §4.5.3.1.1 are allowed (SRS, VERP and
# BATV addresses exceed it in the wild); the path bound keeps every address small anyway.
MAX_PATH = 256
MAX_DOMAIN = 255  # RFC 5321 §4.5.3.1.2
MAX_LABEL = 63  # RFC 1035 §2.3.4

# UTF8-non-ascii of RFC 6531 §3.3, less the C1 controls (U+0080..U+009F) that no address needs.
_UTF8 = "\u00a0-\U0010ffff"
_ATEXT = "A-Za-z0-9!#$%&'*+/=?^_`{|}~\\-" + _UTF8
_DOT_STRING = rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*"
# qtextSMTP = %d32-33 / %d35-91 / %d93-126, quoted-pairSMTP = "\" %d32-126 (§4.1.2).
_QUOTED_STRING = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"'
_MAILBOX = re.compile(rf"(?P<local>{_DOT_STRING}|{_QUOTED_STRING})@(?P<domain>[^@]+)")
_DOT_ATOM = re.compile(_DOT_STRING)
_LABEL = re.compile(rf"[A-Za-z0-9{_UTF8}][A-Za-z0-9\-{_UTF8}]*")
# dcontent = %d33-90 / %d94-126 (§4.1.3): no brackets, no backslash.
_LITERAL = re.compile(r"\[(?P<body>[\x21-\x5a\x5e-\x7e]*)\]")
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_IPV6_TAG = "ipv6:"


class AddressError(ValueError):
    """The path does not follow RFC 5321 §4.1.2; the message is safe to show the client."""


class NonASCIIAddressError(AddressError):
    """A UTF-8 address without SMTPUTF8 having been requested (RFC 6531 §3.5)."""


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox as the envelope names it.

    ``local_part`` is the unquoted value (``"a b"@x`` gives ``a b``); ``domain`` is as
    written, so a domain name, an address literal like ``[192.0.2.1]`` or ``[IPv6:::1]``,
    or ``""`` for the bare ``<Postmaster>`` recipient that RFC 5321 §4.1.1.3 requires.
    Domain case is preserved; compare with :attr:`domain_lower`.
    """

    local_part: str
    domain: str

    def __str__(self) -> str:
        local = self.local_part
        if not _DOT_ATOM.fullmatch(local):
            local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{local}@{self.domain}" if self.domain else local

    @property
    def domain_lower(self) -> str:
        return self.domain.lower()

    @property
    def is_postmaster(self) -> bool:
        return self.domain == "" and self.local_part.lower() == "postmaster"

    @property
    def literal_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The IP address of an address-literal domain (RFC 5321 §4.1.3); None for a name."""
        if not self.domain.startswith("["):
            return None
        return parse_address_literal(self.domain)

    @property
    def is_utf8(self) -> bool:
        return not (self.local_part.isascii() and self.domain.isascii())


def split_path(text: str) -> tuple[str, str]:
    """Split ``<...>`` off the front of ``text``: (inside the brackets, what follows).

    A quoted local part may hold ``>``, so the closing bracket is found by scanning, and the
    scan stops at :data:`MAX_PATH` so that a 4 KB argument costs no more than a short one.
    """
    if not text.startswith("<"):
        raise AddressError("Path must be enclosed in angle brackets")
    quoted = escaped = False
    for i in range(1, min(len(text), MAX_PATH)):
        ch = text[i]
        if escaped:
            escaped = False
        elif quoted:
            escaped = ch == "\\"
            quoted = ch != '"'
        elif ch == '"':
            quoted = True
        elif ch == ">":
            if len(text[: i + 1].encode()) > MAX_PATH:
                raise AddressError("Path too long")
            return text[1:i], text[i + 1 :]
    if len(text) >= MAX_PATH:
        raise AddressError("Path too long")
    raise AddressError("Missing closing angle bracket")


def parse_reverse_path(inside: str, *, utf8: bool) -> Address | None:
    """The reverse-path of MAIL FROM (§4.1.2): ``None`` for the null path ``<>``."""
    if inside == "":
        return None
    return parse_mailbox(_strip_source_route(inside), utf8=utf8)


def parse_forward_path(inside: str, *, utf8: bool) -> Address:
    """The forward-path of RCPT TO (§4.1.2), including the bare ``<Postmaster>``."""
    if inside.isascii() and inside.lower() == "postmaster":
        return Address(inside, "")
    if inside == "":
        raise AddressError("Empty recipient address")
    return parse_mailbox(_strip_source_route(inside), utf8=utf8)


def parse_mailbox(text: str, *, utf8: bool) -> Address:
    """Mailbox = Local-part "@" ( Domain / address-literal ), RFC 5321 §4.1.2."""
    if not utf8 and not text.isascii():
        raise NonASCIIAddressError("Non-ASCII address without SMTPUTF8")
    match = _MAILBOX.fullmatch(text)
    if match is None:
        raise AddressError("Invalid mailbox syntax")
    local = match["local"]
    if local.startswith('"'):
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    domain = match["domain"]
    if domain.startswith("["):
        parse_address_literal(domain)
    else:
        parse_domain(domain)
    return Address(local, domain)


def parse_domain(text: str) -> str:
    """Domain = sub-domain *("." sub-domain); sub-domain may be a U-label (RFC 6531 §3.3).

    U-labels are checked for shape only; turning them into A-labels is the resolver's job.
    """
    if len(text.encode()) > MAX_DOMAIN:
        raise AddressError("Domain name too long")
    for label in text.split("."):
        # Let-dig [Ldh-str]: no leading or trailing hyphen (§4.1.2).
        if not _LABEL.fullmatch(label) or label.endswith("-"):
            raise AddressError("Invalid domain name")
        if label.isascii() and len(label) > MAX_LABEL:
            raise AddressError("Domain label too long")
    return text


def parse_address_literal(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """address-literal = "[" ( IPv4 / "IPv6:" IPv6 / General ) "]" (RFC 5321 §4.1.3).

    General-address-literals need an IANA-registered tag and none is registered but IPv6,
    so they are refused rather than passed to a handler that could not route them.
    """
    match = _LITERAL.fullmatch(text)
    if match is None:
        raise AddressError("Invalid address literal")
    body = match["body"]
    try:
        if body[: len(_IPV6_TAG)].lower() == _IPV6_TAG:
            address = body[len(_IPV6_TAG) :]
            if "%" in address:  # zone indices are host-local and not in the ABNF
                raise ValueError(address)
            return ipaddress.IPv6Address(address)
        if _IPV4.fullmatch(body):
            return ipaddress.IPv4Address(body)
    except ValueError:
        raise AddressError("Invalid IP address in address literal") from None
    raise AddressError("Unsupported address literal")


def _strip_source_route(text: str) -> str:
    """Drop an A-d-l source route, which servers MUST accept (RFC 5321 §4.1.2) and MAY
    ignore (§3.6.1)."""
    if not text.startswith("@"):
        return text
    route, colon, mailbox = text.partition(":")
    if not colon:
        raise AddressError("Invalid source route")
    for hop in route.split(","):
        if not hop.startswith("@"):
            raise AddressError("Invalid source route")
        parse_domain(hop[1:])
    return mailbox
