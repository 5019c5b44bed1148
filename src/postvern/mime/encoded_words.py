"""RFC 2047 encoded words (``=?charset?B?...?=``) in header text, decoded for display and search.

IMAP returns header values undecoded, so this serves only search, filters and display.
Adjacent encoded words in the same charset are joined before decoding, because senders
split multi-byte characters across words; the whitespace between encoded words is dropped
(RFC 2047 §6.2). Decoding never raises.
"""

from __future__ import annotations

import re

from .charset import decode
from .cte import decode_base64

# RFC 2047 §2 caps an encoded word at 75 characters; real senders exceed it, so the pattern
# allows long words but stays linear (no nested quantifiers).
_ENCODED_WORD = re.compile(rb"=\?([^?\s]{1,64})\?([BbQq])\?([^?]*)\?=")
_BETWEEN_WORDS = re.compile(rb"[ \t\r\n]*")
_Q_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")


def _q_decode(text: bytes) -> bytes:
    # RFC 2047 §4.2: "_" is a space, "=XX" an octet.
    return _Q_ESCAPE.sub(lambda m: bytes((int(m.group(1), 16),)), text.replace(b"_", b" "))


def _payload(kind: bytes, text: bytes) -> bytes:
    return decode_base64(text) if kind in b"Bb" else _q_decode(text)


def _charset_only(label: bytes) -> str:
    # RFC 2231 §5 allows "charset*language" inside an encoded word.
    return label.split(b"*", 1)[0].decode("ascii", "replace")


def decode_header_value(value: bytes) -> str:
    """Decode one (unfolded) header value: raw UTF-8 (RFC 6532) and encoded words."""
    out: list[str] = []
    pos = 0
    pending: bytes = b""
    pending_charset = ""
    for m in _ENCODED_WORD.finditer(value):
        gap = value[pos : m.start()]
        charset = _charset_only(m.group(1))
        adjacent = pending and _BETWEEN_WORDS.fullmatch(gap) is not None
        if not adjacent or charset.lower() != pending_charset.lower():
            if pending:
                out.append(decode(pending, pending_charset))
                pending = b""
            if not adjacent:
                out.append(decode(gap, None))
        pending += _payload(m.group(2), m.group(3))
        pending_charset = charset
        pos = m.end()
    if pending:
        out.append(decode(pending, pending_charset))
    tail = value[pos:]
    out.append(decode(tail, None))
    return "".join(out)
