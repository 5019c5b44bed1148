"""Content-Transfer-Encoding (RFC 2045 §6): undoing base64 and quoted-printable.

Decoders here are lenient in the way mail readers are: characters outside the alphabet are
skipped, broken escapes are kept literally, and missing padding is tolerated. They never
raise; an encoding this module does not know raises :class:`UnknownTransferEncoding`, which
IMAP reports as ``[UNKNOWN-CTE]`` (RFC 3516 §4.2).
"""

from __future__ import annotations

import binascii
import re

# RFC 2045 §6.1 identity encodings; RFC 3516 §4.2 says BINARY returns them unchanged.
IDENTITY_ENCODINGS = frozenset({"7BIT", "8BIT", "BINARY", ""})
DECODED_ENCODINGS = frozenset({"BASE64", "QUOTED-PRINTABLE"})


class UnknownTransferEncoding(ValueError):
    """The part's Content-Transfer-Encoding is neither an identity nor base64/QP."""


_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]+")
_QP_TRAILING_SPACE = re.compile(rb"[ \t]+(?=\r?\n)")


def decode_base64(data: bytes) -> bytes:
    """Decode base64, skipping non-alphabet bytes and stopping at padding (RFC 2045 §6.8)."""
    try:
        # The C decoder already skips line breaks and other non-alphabet bytes.
        return binascii.a2b_base64(data)
    except binascii.Error:
        pass
    pad = data.find(b"=")
    clean = _NOT_BASE64.sub(b"", data if pad < 0 else data[:pad])
    usable = len(clean) - len(clean) % 4
    out = binascii.a2b_base64(clean[:usable]) if usable else b""
    tail = clean[usable:]
    # A final group of 2 or 3 characters still carries 1 or 2 whole octets; 1 carries none.
    if len(tail) >= 2:
        out += binascii.a2b_base64(tail + b"=" * (4 - len(tail)))
    return out


def decode_quoted_printable(data: bytes) -> bytes:
    """Decode quoted-printable (RFC 2045 §6.7); malformed ``=`` sequences stay as they are."""
    # §6.7 rule 3: trailing whitespace was added in transport and must be deleted, which
    # also turns "=" followed by blanks at the end of a line into a soft line break.
    # The end of the body ends a line too (its line break belongs to a MIME delimiter).
    data = data.rstrip(b" \t")
    if b" \n" in data or b"\t\n" in data or b" \r\n" in data or b"\t\r\n" in data:
        data = _QP_TRAILING_SPACE.sub(b"", data)
    return binascii.a2b_qp(data)


def decode_body(data: bytes, encoding: str) -> bytes:
    """Undo ``encoding`` (an upper-case Content-Transfer-Encoding) on ``data``."""
    if encoding in IDENTITY_ENCODINGS:
        return data
    if encoding == "BASE64":
        return decode_base64(data)
    if encoding == "QUOTED-PRINTABLE":
        return decode_quoted_printable(data)
    raise UnknownTransferEncoding(encoding)
