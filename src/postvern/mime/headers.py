"""Header sections (RFC 5322 §2.2): where they end, their fields, and unfolded values.

Works on byte offsets into the raw message so that parsing never copies a body. A header
section ends at the first empty line; a line without a colon is kept in the section but is
not a field (as Dovecot does), so one broken line does not turn the rest of the header into
body text. Both CRLF and bare LF end lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

# RFC 5322 §2.2: a field name is printable ASCII except colon; real mail adds stray blanks
# before the colon ("Subject : x"), which RFC 5322 §4.5.3 (obsolete syntax) allows.
_FIELD_NAME = re.compile(rb"[!-9;-~]+[ \t]*\Z")
_FOLD = re.compile(rb"\r?\n(?=[ \t])")


@dataclass(slots=True, frozen=True)
class Field:
    """One header field: its name, raw (folded) value, and the offsets of its lines."""

    name: bytes  # as written, without the colon
    value: bytes  # raw value after the colon, folding kept, trailing line end removed
    start: int  # offset of the field's first line
    end: int  # offset just past the field's last line end

    @property
    def lname(self) -> bytes:
        return self.name.lower()


def header_end(raw: bytes, start: int, stop: int) -> tuple[int, int]:
    """Find the empty line ending the header section in ``raw[start:stop]``.

    Returns ``(fields_end, body_start)``: the fields lie in ``raw[start:fields_end]`` and the
    body begins at ``body_start`` (just past the empty line). With no empty line the whole
    range is header and the body is empty: ``fields_end == body_start == stop``.
    """
    if raw.startswith(b"\r\n", start) and start + 2 <= stop:
        return start, start + 2
    if raw.startswith(b"\n", start) and start + 1 <= stop:
        return start, start + 1
    pos = raw.find(b"\n", start, stop)
    while pos >= 0:
        nxt = pos + 1
        if raw.startswith(b"\r\n", nxt) and nxt + 2 <= stop:
            return nxt, nxt + 2
        if raw.startswith(b"\n", nxt) and nxt + 1 <= stop:
            return nxt, nxt + 1
        pos = raw.find(b"\n", nxt, stop)
    return stop, stop


def iter_fields(raw: bytes, start: int, end: int, junk: bool = False) -> Iterator[Field]:
    """Yield the fields of the header section ``raw[start:end]``, in order.

    With ``junk``, lines that are not fields (no colon, or not a field name before it)
    are yielded too, with their continuation lines, as fields with an empty name: Dovecot
    returns them in BODY[HEADER.FIELDS.NOT ...].
    """
    pos = start
    field_start = -1
    name = b""
    colon = 0
    while pos < end:
        nl = raw.find(b"\n", pos, end)
        line_end = end if nl < 0 else nl + 1
        first = raw[pos : pos + 1]
        if first in (b" ", b"\t") and field_start >= 0:
            pos = line_end  # continuation line (RFC 5322 §2.2.3)
            continue
        if field_start >= 0:
            value = _strip_eol(raw[colon + 1 : pos]) if name else b""
            yield Field(name, value, field_start, pos)
            field_start = -1
        c = raw.find(b":", pos, line_end)
        if c > pos and _FIELD_NAME.match(raw, pos, c):
            field_start, colon = pos, c
            name = raw[pos:c].rstrip(b" \t")
        elif junk and raw[pos:line_end].strip(b"\r\n"):
            field_start, name = pos, b""
        pos = line_end
    if field_start >= 0:
        yield Field(name, _strip_eol(raw[colon + 1 : end]) if name else b"", field_start, end)


def _strip_eol(value: bytes) -> bytes:
    if value.endswith(b"\n"):
        value = value[:-2] if value.endswith(b"\r\n") else value[:-1]
    return value


def unfold(value: bytes) -> bytes:
    """Remove folding (RFC 5322 §2.2.3) and the leading blanks after the colon."""
    if b"\n" in value:
        value = _FOLD.sub(b"", value)
    return value.strip(b" \t\r\n")


def first_values(raw: bytes, start: int, end: int, names: frozenset[bytes]) -> dict[bytes, bytes]:
    """The raw value of the first field of each lower-case name in ``names``."""
    found: dict[bytes, bytes] = {}
    for f in iter_fields(raw, start, end):
        lname = f.lname
        if lname in names and lname not in found:
            found[lname] = f.value
    return found


def wire_text(value: bytes) -> str:
    """A header value as IMAP returns it: the octets as written, read as UTF-8 (RFC 6532).

    RFC 9051 strings are UTF-8, so octets that are not (legacy 8-bit headers) become U+FFFD
    rather than making the stored description unencodable.
    """
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("utf-8", "replace")
