"""Modified UTF-7 (RFC 3501 §5.1.3): how IMAP4rev1 clients spell non-ASCII mailbox names.

Printable US-ASCII stands for itself, "&" is written "&-", and everything else is UTF-16BE in
base64 with "," for "/" between "&" and "-". IMAP4rev2 and UTF8=ACCEPT clients use UTF-8
instead; this module is only for the rev1 wire form, and it refuses every non-canonical spelling
so that one mailbox has exactly one name on the wire.
"""

from __future__ import annotations

import base64
import binascii

SHIFT = "&"
UNSHIFT = "-"
_B64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,")


class MUTF7Error(ValueError):
    """The text is not valid modified UTF-7 (or a name cannot be written in it)."""


def _is_direct(char: str) -> bool:
    """RFC 3501 §5.1.3: printable US-ASCII (0x20-0x7e) represents itself."""
    return 0x20 <= ord(char) <= 0x7E


def _shifted(run: list[str]) -> str:
    try:
        raw = "".join(run).encode("utf-16-be")
    except UnicodeEncodeError:
        raise MUTF7Error("name holds a lone surrogate") from None
    text = base64.b64encode(raw).rstrip(b"=").replace(b"/", b",").decode("ascii")
    return SHIFT + text + UNSHIFT


def encode(name: str) -> str:
    """Spell a mailbox name in modified UTF-7."""
    out: list[str] = []
    run: list[str] = []
    for char in name:
        if _is_direct(char):
            if run:
                out.append(_shifted(run))
                run = []
            out.append("&-" if char == SHIFT else char)
        else:
            run.append(char)
    if run:
        out.append(_shifted(run))
    return "".join(out)


def _decode_run(b64: str) -> str:
    if not set(b64) <= _B64_ALPHABET:
        raise MUTF7Error("invalid character in a base64 run")
    padded = b64.replace(",", "/") + "=" * (-len(b64) % 4)
    try:
        raw = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise MUTF7Error("malformed base64 run") from None
    # Re-encoding must give back the same run: that rejects a length that leaves a partial
    # 16-bit unit and non-zero padding bits, which RFC 2152 forbids and which would make two
    # spellings of one name.
    if len(raw) % 2 or base64.b64encode(raw).rstrip(b"=").decode("ascii") != b64.replace(",", "/"):
        raise MUTF7Error("base64 run does not end on a UTF-16 boundary")
    try:
        text = raw.decode("utf-16-be")
    except UnicodeDecodeError:
        raise MUTF7Error("base64 run is not valid UTF-16") from None
    if any(_is_direct(char) for char in text):
        # RFC 3501 §5.1.3: printable US-ASCII MUST NOT be encoded in base64.
        raise MUTF7Error("printable US-ASCII encoded in base64")
    return text


def decode(text: str) -> str:
    """Read a modified UTF-7 mailbox name; raise :class:`MUTF7Error` if it is not canonical."""
    out: list[str] = []
    i = 0
    last_run_end = -1
    while i < len(text):
        char = text[i]
        if not _is_direct(char):
            raise MUTF7Error("8-bit or control character in a modified UTF-7 name")
        if char != SHIFT:
            out.append(char)
            i += 1
            continue
        end = text.find(UNSHIFT, i + 1)
        if end < 0:
            raise MUTF7Error("unterminated base64 run")
        if end == i + 1:
            out.append(SHIFT)
        else:
            if last_run_end == i:
                # RFC 3501 §5.1.3: two adjacent runs must be one run.
                raise MUTF7Error("adjacent base64 runs")
            out.append(_decode_run(text[i + 1 : end]))
            last_run_end = end + 1
        i = end + 1
    return "".join(out)
