"""Structured MIME header values: Content-Type and Content-Disposition with parameters.

RFC 2045 §5.1 gives the syntax (type/subtype, ``; name=value`` with tokens, quoted strings
and comments) and RFC 2231 §3-4 splits long or non-ASCII values into numbered, optionally
percent-encoded segments. Parameters are presented the way Dovecot presents them in
BODYSTRUCTURE: names as written, quoted values unquoted, continuations merged into one
parameter, and an encoded value kept encoded under the name ``name*``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .headers import wire_text

# A hostile header can carry thousands of parameters; IMAP clients need a handful.
MAX_PARAMS = 64
# Parameters as written, before RFC 2231 §3 segments are merged: a long file name takes a
# few dozen segments; more is a hostile header, and is cut here before any merging work.
MAX_RAW_PARAMS = 1024
# RFC 2231 §3 continuation numbers; beyond this a segment is dropped.
MAX_SEGMENTS = 1000

# RFC 2045 §5.1 token: printable ASCII except SPACE and tspecials.
_TOKEN = re.compile(rb"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")
# Parameter values in real mail use characters outside the token set without quoting
# ("name=a@b.c", "filename=report[1].pdf"); they are accepted up to ";" or blank.
_LOOSE_VALUE = re.compile(rb"[^;\s\"]+")
_BLANKS = re.compile(rb"[ \t\r\n]*")
_SEGMENT_NAME = re.compile(r"(.*?)\*(\d{1,4})?(\*)?\Z", re.S)


@dataclass(slots=True, frozen=True)
class MediaType:
    """A parsed Content-Type: ``type``/``subtype`` upper-case, or None when invalid."""

    type: str | None
    subtype: str | None
    params: list[tuple[str, str]]


def _skip_cfws(value: bytes, pos: int) -> int:
    """Skip blanks and (nested) comments (RFC 5322 §3.2.2)."""
    n = len(value)
    while pos < n:
        pos = _BLANKS.match(value, pos).end()  # type: ignore[union-attr]
        if value[pos : pos + 1] != b"(":
            return pos
        depth = 0
        while pos < n:
            c = value[pos]
            if c == 0x5C:  # backslash quotes the next character
                pos += 2
                continue
            pos += 1
            if c == 0x28:
                depth += 1
            elif c == 0x29:
                depth -= 1
                if depth == 0:
                    break
    return min(pos, n)


def _quoted(value: bytes, pos: int) -> tuple[bytes | None, int]:
    """Read a quoted string at ``pos`` (which holds the opening quote)."""
    out = bytearray()
    pos += 1
    n = len(value)
    while pos < n:
        c = value[pos]
        if c == 0x5C and pos + 1 < n:
            out.append(value[pos + 1])
            pos += 2
        elif c == 0x22:
            return bytes(out), pos + 1
        else:
            out.append(c)
            pos += 1
    return None, pos  # unterminated: Dovecot drops such a parameter, and so do we


def parse_params(value: bytes, pos: int) -> list[tuple[str, str]]:
    """Parse ``; name=value`` pairs from ``pos`` on, then merge RFC 2231 segments."""
    raw_params: list[tuple[str, str]] = []
    n = len(value)
    while pos < n and len(raw_params) < MAX_RAW_PARAMS:
        semi = value.find(b";", pos)
        if semi < 0:
            break
        pos = _skip_cfws(value, semi + 1)
        m = _TOKEN.match(value, pos)
        if m is None:
            continue
        name = m.group().decode("ascii")
        pos = _skip_cfws(value, m.end())
        if value[pos : pos + 1] != b"=":
            continue  # "; foo" without a value: not a parameter
        pos = _skip_cfws(value, pos + 1)
        if value[pos : pos + 1] == b'"':
            text, pos = _quoted(value, pos)
            if text is None:
                break
        else:
            vm = _LOOSE_VALUE.match(value, pos)
            text = vm.group() if vm else b""
            pos = vm.end() if vm else pos
        raw_params.append((name, wire_text(text)))
    return merge_rfc2231(raw_params)[:MAX_PARAMS]


def merge_rfc2231(params: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Merge ``name*0``, ``name*1*``... into one parameter, as Dovecot presents them.

    Plain parameters keep their order and come first; merged ones follow, sorted by name
    (Dovecot sorts them to put segments in order). The merged name is ``name*`` when the
    first segment is extended (``charset'language'`` prefix, percent-encoded), and the
    value is the segments joined as written. Segments after a gap in the numbering are
    kept apart under their own names, since what is missing is unknown.
    """
    plain: list[tuple[str, str]] = []
    segments: dict[str, dict[int, tuple[bool, str]]] = {}
    spelling: dict[str, str] = {}  # the base name as first written
    for name, value in params:
        m = _SEGMENT_NAME.match(name)
        if m is None:
            plain.append((name, value))
            continue
        base, number, star = m.group(1), m.group(2), m.group(3)
        extended = star is not None or number is None  # "name*=" is one extended segment
        key = base.lower()
        spelling.setdefault(key, base)
        index = int(number) if number is not None else 0
        if index < MAX_SEGMENTS:
            segments.setdefault(key, {}).setdefault(index, (extended, value))
    merged = [p for key in sorted(segments) for p in _join(spelling[key], segments[key])]
    return plain + merged


def _join(base: str, parts: dict[int, tuple[bool, str]]) -> list[tuple[str, str]]:
    index = 0
    pieces: list[str] = []
    while index in parts:
        pieces.append(parts[index][1])
        index += 1
    out: list[tuple[str, str]] = []
    if pieces:
        out.append((base + "*" if parts[0][0] else base, "".join(pieces)))
    for i in sorted(k for k in parts if k > index):
        extended, text = parts[i]
        out.append((f"{base}*{i}{'*' if extended else ''}", text))
    return out


def parse_media_type(value: bytes) -> MediaType:
    """Parse a Content-Type value (RFC 2045 §5.1); ``type`` is None when it is invalid."""
    pos = _skip_cfws(value, 0)
    t = _TOKEN.match(value, pos)
    mtype = subtype = None
    if t is not None:
        pos = _skip_cfws(value, t.end())
        if value[pos : pos + 1] == b"/":
            pos = _skip_cfws(value, pos + 1)
            s = _TOKEN.match(value, pos)
            if s is not None:
                mtype, subtype = t.group().decode().upper(), s.group().decode().upper()
                pos = s.end()
    return MediaType(mtype, subtype, parse_params(value, pos))


def parse_disposition(value: bytes) -> tuple[str, list[tuple[str, str]]] | None:
    """Parse a Content-Disposition value (RFC 2183 §2); None when it has no type."""
    pos = _skip_cfws(value, 0)
    t = _TOKEN.match(value, pos)
    if t is None:
        return None
    return t.group().decode().upper(), parse_params(value, t.end())


def param(params: list[tuple[str, str]], name: str) -> str | None:
    """The first value of parameter ``name`` (case-insensitive), or None."""
    lname = name.lower()
    for key, value in params:
        if key.lower() == lname:
            return value
    return None
