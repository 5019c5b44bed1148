"""Header protection for a message the server encrypts (RFC 9788), and what not to wrap.

A message is split into the *cryptographic payload* (everything that gets encrypted) and the
*outer header section* (what stays readable for IMAP: the list, the threads, SEARCH):

    outer:  trace fields · From · To · Cc · Date · Message-ID · In-Reply-To · References
            · Subject (kept, or "[...]") · MIME-Version · Content-Type: multipart/encrypted …
    inner:  every original header field, Content-Type with ``hp="cipher"`` (RFC 9788 §2.1.1),
            one ``HP-Outer`` field per non-structural outer field (§2.2), then the body as-is

The body bytes are never touched, so a ``multipart/signed`` message's signed part is the same
octets after decryption and its signature still verifies. Line ends are kept as they came.

Mail that already is encrypted (PGP/MIME, inline PGP, S/MIME enveloped data) is left alone:
wrapping it again would only make it harder to read (:func:`already_encrypted`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from postvern.mime.headers import Field, header_end, iter_fields
from postvern.mime.params import param, parse_media_type


class SubjectPolicy(Enum):
    """What the outer Subject shows (RFC 9788 §3.2's header confidentiality policies)."""

    # hcp_no_confidentiality: the Subject stays readable outside (and in SEARCH).
    KEPT = "kept"
    # hcp_baseline: the Subject is replaced by "[...]" outside; the client shows the inner one.
    HIDDEN = "hidden"


# RFC 9788 §3.2 hcp_baseline: the obscured Subject's fixed value.
OBSCURED_SUBJECT = b"[...]"
# The header fields that stay outside for IMAP (issue #17: From, To, Subject by policy, Date,
# Message-ID; Cc and the threading fields In-Reply-To/References so lists and threads work).
OUTER_FIELDS = frozenset(
    {b"from", b"to", b"cc", b"date", b"message-id", b"in-reply-to", b"references", b"subject"}
)
# Trace fields the MTA wrote (RFC 5321 §4.4, RFC 9057, RFC 8601) and our spam verdict:
# they describe the delivery, not the author's message, and stay outside as they came.
TRACE_FIELDS = frozenset(
    {b"return-path", b"delivered-to", b"received", b"authentication-results", b"x-postvern-spam"}
)
# RFC 9788 §2.2: HP-Outer lists non-structural outer fields; MIME's own fields are structure.
STRUCTURAL_PREFIX = b"content-"
HP_OUTER = b"HP-Outer"
# RFC 9788 §2.1.1: the parameter that marks the cryptographic payload's root part.
HP_PARAMETER = b'hp="cipher"'
# RFC 2045 §5.2: a part without Content-Type is text/plain in US-ASCII.
DEFAULT_CONTENT_TYPE = b"text/plain; charset=us-ascii"

# RFC 4880 §6.2: the armor header line of an encrypted message; inline PGP puts it in a
# text body at the start of a line.
_INLINE_PGP = re.compile(rb"(?m)^-----BEGIN PGP MESSAGE-----\r?$")
# How far into a text body inline PGP is looked for: a reply quoting an encrypted message
# lower down is still plaintext, and a real inline message starts near the top.
INLINE_PGP_WINDOW = 4096
# S/MIME types that are encrypted (RFC 8551 §3.2.2; authEnveloped-data is RFC 5083's).
_SMIME_ENCRYPTED = frozenset({"enveloped-data", "authenveloped-data"})


@dataclass(frozen=True, slots=True)
class Split:
    """The two halves of a message to protect."""

    outer: bytes  # the outer header fields, each ending with the message's line end
    inner: bytes  # the cryptographic payload: protected header section, blank line, body
    eol: bytes


def _eol(raw: bytes) -> bytes:
    nl = raw.find(b"\n")
    return b"\r\n" if nl > 0 and raw[nl - 1 : nl] == b"\r" else b"\n"


def _fields(raw: bytes) -> tuple[list[Field], int, int]:
    fields_end, body_start = header_end(raw, 0, len(raw))
    return list(iter_fields(raw, 0, fields_end)), fields_end, body_start


def _content_type(fields: list[Field]) -> bytes | None:
    for f in fields:
        if f.lname == b"content-type":
            return f.value
    return None


def already_encrypted(raw: bytes) -> bool:
    """Whether ``raw`` is encrypted already: PGP/MIME (RFC 3156 §4), S/MIME enveloped or
    auth-enveloped data (RFC 8551 §3.2.2), or inline PGP in a text body."""
    fields, _, body_start = _fields(raw)
    value = _content_type(fields)
    media = parse_media_type(value if value is not None else DEFAULT_CONTENT_TYPE)
    mtype, subtype = media.type or "TEXT", media.subtype or "PLAIN"
    if (mtype, subtype) == ("MULTIPART", "ENCRYPTED"):
        return True
    if mtype == "APPLICATION" and subtype in ("PKCS7-MIME", "X-PKCS7-MIME"):
        smime_type = (param(media.params, "smime-type") or "").lower()
        # RFC 8551 §3.2.2: without smime-type, the .p7m name is what older agents send.
        return smime_type in _SMIME_ENCRYPTED or (
            not smime_type and (param(media.params, "name") or "").lower().endswith(".p7m")
        )
    if mtype == "TEXT":
        return _INLINE_PGP.search(raw, body_start, body_start + INLINE_PGP_WINDOW) is not None
    if mtype == "MULTIPART":
        return _first_text_is_inline_pgp(raw, body_start, param(media.params, "boundary"))
    return False


def _first_text_is_inline_pgp(raw: bytes, body_start: int, boundary: str | None) -> bool:
    """Inline PGP in the first part of a multipart body (a client that attached files)."""
    if not boundary:
        return False
    delimiter = b"--" + boundary.encode("ascii", "replace")
    first = raw.find(delimiter, body_start)
    if first < 0:
        return False
    part_start = raw.find(b"\n", first) + 1
    part_end = raw.find(delimiter, part_start)
    part = raw[part_start : part_end if part_end > 0 else len(raw)]
    if part_start <= 0:
        return False
    fields, _, part_body = _fields(part)
    value = _content_type(fields)
    media = parse_media_type(value if value is not None else DEFAULT_CONTENT_TYPE)
    if (media.type or "TEXT") != "TEXT":
        return False
    return _INLINE_PGP.search(part, part_body, part_body + INLINE_PGP_WINDOW) is not None


def split(raw: bytes, subject: SubjectPolicy) -> Split:
    """Make the outer header section and the cryptographic payload of ``raw``."""
    eol = _eol(raw)
    fields, fields_end, body_start = _fields(raw)
    outer: list[bytes] = []
    hp_outer: list[bytes] = []
    for f in fields:
        lname = f.lname
        if lname in TRACE_FIELDS:
            outer.append(raw[f.start : f.end])
        elif lname in OUTER_FIELDS:
            value = f.value
            if lname == b"subject" and subject is SubjectPolicy.HIDDEN:
                value = b" " + OBSCURED_SUBJECT
            outer.append(f.name + b":" + value + eol)
            if not lname.startswith(STRUCTURAL_PREFIX):
                hp_outer.append(HP_OUTER + b": " + f.name + b":" + value + eol)
    protected = _protected_header(raw, fields, fields_end, eol)
    inner = b"".join(hp_outer) + protected + eol + raw[body_start:]
    return Split(b"".join(outer), inner, eol)


def _protected_header(raw: bytes, fields: list[Field], fields_end: int, eol: bytes) -> bytes:
    """The original header section with ``hp="cipher"`` on its Content-Type (added when
    the message had none, as the RFC 2045 default it stood for)."""
    out: list[bytes] = []
    typed = False
    for f in fields:
        if f.lname == b"content-type" and not typed:
            typed = True
            out.append(f.name + b":" + f.value.rstrip(b"; \t") + b"; " + HP_PARAMETER + eol)
        else:
            out.append(raw[f.start : f.end])
    if not typed:
        out.append(b"Content-Type: " + DEFAULT_CONTENT_TYPE + b"; " + HP_PARAMETER + eol)
        if not any(f.lname == b"mime-version" for f in fields):
            out.append(b"MIME-Version: 1.0" + eol)
    text = b"".join(out)
    # A last field without a line end (a header with no body at all) gets one.
    return text if text.endswith(b"\n") or not text else text + eol


def wrap(parts: Split, fields: list[bytes], lines: list[bytes]) -> bytes:
    """The stored message: the outer fields, MIME-Version, the wrapper's MIME ``fields``
    (``Content-Type: …`` first), then the body ``lines``, with the message's own line end."""
    eol = parts.eol
    head = parts.outer + b"MIME-Version: 1.0" + eol + b"".join(f + eol for f in fields)
    return head + eol + eol.join(lines)
