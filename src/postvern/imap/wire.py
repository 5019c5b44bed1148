"""The value syntax of IMAP responses (RFC 9051 §4): atoms, numbers, strings, literals, lists.

Python values map onto it: ``None`` is NIL, ``int`` a number, ``str``/``bytes`` a string
(quoted when it can be, a literal otherwise), :class:`Atom` an atom written as is, lists and
tuples parenthesized lists. The quoting rule lives here so that no response can smuggle a CR,
LF or NUL into a quoted string.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from postvern.imap import utf7

CRLF = b"\r\n"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class Atom(str):
    """Written verbatim: flags, capability names, keywords. The caller vouches for its syntax."""


class Mailbox(str):
    """A mailbox name: UTF-8 for IMAP4rev2/UTF8=ACCEPT sessions, modified UTF-7 otherwise."""


@dataclass(frozen=True, slots=True)
class Binary:
    """BINARY[...] content (RFC 3516): a literal8 ``~{n}`` when it holds NUL."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Joined:
    """Items written with no separator: the parts of a multipart body (RFC 9051 §9)."""

    items: Sequence[object]


@dataclass(frozen=True, slots=True)
class WireContext:
    """How the peer reads strings: ``utf8`` once IMAP4rev2 or UTF8=ACCEPT is enabled."""

    utf8: bool = False


def to_bytes(text: str) -> bytes:
    """Header text back to its octets (the MIME parser keeps raw 8-bit as surrogate escapes)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


# RFC 9051 §4.3: a literal is "any octet except NUL", yet a stored message may hold NUL
# (SMTP without BINARYMIME does not keep it out in practice), and a client that stops reading
# at a NUL would not see what follows. NUL is sent as 0x80 instead, as Dovecot does
# (lib-imap-storage/imap-msgpart.c: "IMAP literals must not contain NULs. change them to 0x80
# characters"): one octet for one, so the literal's length, RFC822.SIZE and BODYSTRUCTURE's
# sizes stay those of the stored message. The exact octets remain available as BINARY[]
# (RFC 3516), whose literal8 may carry NUL.
NUL = b"\x00"
NUL_SUBSTITUTE = b"\x80"
_PRINTABLE = bytes(range(0x20, 0x7F))
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


def _quotable(data: bytes, ctx: WireContext) -> bool:
    if not data.translate(None, _PRINTABLE):  # only printable US-ASCII (checked in C)
        return True
    # RFC 9051 §4.3 / RFC 6855 §3: UTF-8 may be quoted once the client accepts it, but
    # control characters never may.
    if not ctx.utf8 or _CONTROL.search(data):
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def write_string(data: bytes, out: bytearray, ctx: WireContext) -> None:
    if _quotable(data, ctx):
        out += b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    else:
        out += b"{%d}\r\n" % len(data)
        out += data.replace(NUL, NUL_SUBSTITUTE)


def write_binary(data: bytes, out: bytearray, ctx: WireContext) -> None:
    if NUL in data:
        out += b"~{%d}\r\n" % len(data)
        out += data
    else:
        write_string(data, out, ctx)


def format_date_time(value: datetime) -> str:
    """RFC 9051 date-time: "dd-Mon-yyyy hh:mm:ss +zzzz" (naive times are taken as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    offset = value.utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset is not None else 0
    sign = "-" if minutes < 0 else "+"
    hours, mins = divmod(abs(minutes), 60)
    return (
        f"{value.day:02d}-{_MONTHS[value.month - 1]}-{value.year:04d} "
        f"{value.hour:02d}:{value.minute:02d}:{value.second:02d} {sign}{hours:02d}{mins:02d}"
    )


def write(value: object, out: bytearray, ctx: WireContext) -> None:
    """Append the wire form of ``value``."""
    if value is None:
        out += b"NIL"
    elif isinstance(value, Atom):
        out += value.encode("ascii")
    elif isinstance(value, Mailbox):
        name = str(value) if ctx.utf8 else utf7.encode(value)
        write_string(to_bytes(name), out, ctx)
    elif isinstance(value, bool):
        raise TypeError("booleans have no IMAP form")
    elif isinstance(value, int):
        out += b"%d" % value
    elif isinstance(value, str):
        write_string(to_bytes(value), out, ctx)
    elif isinstance(value, bytes | bytearray | memoryview):
        write_string(bytes(value), out, ctx)
    elif isinstance(value, Binary):
        write_binary(value.data, out, ctx)
    elif isinstance(value, datetime):
        write_string(format_date_time(value).encode("ascii"), out, ctx)
    elif isinstance(value, Joined):
        for item in value.items:
            write(item, out, ctx)
    elif isinstance(value, list | tuple):
        out += b"("
        write_spaced(value, out, ctx)
        out += b")"
    else:
        raise TypeError(f"no IMAP form for {type(value).__name__}")


def write_spaced(values: Sequence[object], out: bytearray, ctx: WireContext) -> None:
    for i, item in enumerate(values):
        if i:
            out += b" "
        write(item, out, ctx)


def render(value: object, ctx: WireContext | None = None) -> bytes:
    out = bytearray()
    write(value, out, ctx or WireContext())
    return bytes(out)
