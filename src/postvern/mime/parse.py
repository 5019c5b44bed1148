"""Parsing a raw message into the IMAP description of it: ENVELOPE and BODYSTRUCTURE.

:func:`describe` walks the message once, finding MIME boundaries by scanning bytes (RFC 2046
§5.1.1) rather than building objects, so it runs in time linear in the message and records
the byte offsets of every part for later BODY[section] fetches. It follows Dovecot's reading
of malformed mail, never raises, and bounds its work: parts nested deeper than
:data:`MAX_DEPTH` or beyond :data:`MAX_PARTS` are kept as opaque leaves.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from .envelope import ENVELOPE_FIELDS, build_envelope
from .headers import header_end, iter_fields, unfold, wire_text
from .model import BodyPart, Envelope
from .params import param, parse_disposition, parse_media_type

# Dovecot's defaults (message_max_nested_mime_parts, message_max_total_mime_parts): deeper
# or more parts only serve to make every FETCH of the message expensive.
MAX_DEPTH = 100
MAX_PARTS = 10000
# RFC 2046 §5.1.1 caps boundaries at 70 characters. Like Dovecot, longer ones are compared
# on their first 80 octets only, which also bounds the cost of testing each line.
BOUNDARY_MATCH_LEN = 80
# Content-Language lists beyond this are noise (and would bloat the cached description).
MAX_LANGUAGES = 32

OPAQUE_TYPE = ("APPLICATION", "OCTET-STREAM")  # what a part beyond the limits becomes
MESSAGE_SUBTYPES = frozenset({"RFC822", "GLOBAL"})  # RFC 9051 body-type-msg
# RFC 2046 §5.2.1: an encapsulated message is only ever sent as-is.
_IDENTITY_CTE = frozenset({"7BIT", "8BIT", "BINARY"})

_CTE_TOKEN = re.compile(rb"[ \t]*([!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+)[ \t]*(?:\([^)]*\)[ \t]*)?")

_MIME_FIELDS = frozenset(
    {
        b"content-type",
        b"content-transfer-encoding",
        b"content-id",
        b"content-description",
        b"content-disposition",
        b"content-language",
        b"content-location",
        b"content-md5",
        b"mime-version",
    }
)


@dataclass(slots=True, frozen=True)
class _Delimiter:
    """A boundary delimiter line found in the message (RFC 2046 §5.1.1)."""

    start: int  # offset of the "--" that opens the line
    level: int  # index of the matching boundary on the stack (0 = outermost)
    close: bool  # the close delimiter "--boundary--"
    after: int  # offset just past the line


def describe(raw: bytes) -> tuple[Envelope, BodyPart]:
    """Parse ``raw`` into its ENVELOPE and BODYSTRUCTURE, with offsets; never raises."""
    try:
        return parse_message(raw)
    except Exception:
        return fallback_description(raw)


def parse_message(raw: bytes) -> tuple[Envelope, BodyPart]:
    """:func:`describe` without its safety net (tests fuzz this to show it is not needed)."""
    return _Parser(raw).message()


def fallback_description(raw: bytes) -> tuple[Envelope, BodyPart]:
    """The description of a message that could not be parsed: one opaque body."""
    body = BodyPart(*OPAQUE_TYPE, size=len(raw), end=len(raw))
    return Envelope(), body


class _Parser:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.n = len(raw)
        self.stack: list[bytes] = []  # "--" + boundary of each open multipart, outermost first
        self.lines: list[int] | None = None  # offsets of lines that start with "--"
        self.parts = 0
        self.last_header = (0, -1, -1)  # (searched from, fields end, body start)

    def message(self) -> tuple[Envelope, BodyPart]:
        part, _, envelope, _ = self.entity(0, 0, default_digest=False, is_message=True)
        return envelope or Envelope(), part

    # --- boundaries -----------------------------------------------------------------------

    def dash_lines(self) -> list[int]:
        if self.lines is None:
            raw, lines = self.raw, []
            if raw.startswith(b"--"):
                lines.append(0)
            pos = raw.find(b"\n--")
            while pos >= 0:
                lines.append(pos + 1)
                pos = raw.find(b"\n--", pos + 3)
            self.lines = lines
        return self.lines

    def next_delimiter(self, pos: int, stop: int | None = None) -> _Delimiter | None:
        """The first delimiter line of an open multipart at or after ``pos``."""
        if not self.stack:
            return None
        lines = self.dash_lines()
        stop = self.n if stop is None else stop
        i = bisect.bisect_left(lines, pos)
        while i < len(lines) and lines[i] < stop:
            found = self.match(lines[i])
            if found is not None:
                return found
            i += 1
        return None

    def match(self, start: int) -> _Delimiter | None:
        # RFC 2046 §5.1.1: the boundary need only begin the line. As in Dovecot, the longest
        # matching boundary wins, and the innermost among equals, so nested parts reusing a
        # boundary or sharing a prefix still split correctly.
        raw = self.raw
        best = -1
        best_len = 0
        for level in range(len(self.stack) - 1, -1, -1):
            b = self.stack[level]
            if len(b) > best_len and raw.startswith(b, start):
                best, best_len = level, len(b)
        if best < 0:
            return None
        tail = start + best_len
        close = raw.startswith(b"--", tail)
        nl = raw.find(b"\n", tail)
        return _Delimiter(start, best, close, self.n if nl < 0 else nl + 1)

    def delimiter_after_header(self, part: BodyPart, body_start: int) -> _Delimiter | None:
        """An enclosing delimiter right after the empty line ending ``part``'s header.

        A multipart's own first delimiter there is not one: its boundary is tried too, and
        wins when it matches at least as long (the innermost boundary wins, as always).
        """
        if body_start == 0 or self.raw[body_start - 1] != 0x0A:
            return None
        found = self.match(body_start)
        if found is None or not part.is_multipart:
            return found
        own = param(part.params, "boundary")
        if own is not None:
            prefix = _delimiter_prefix(own)
            if self.raw.startswith(prefix, body_start) and len(prefix) >= len(
                self.stack[found.level]
            ):
                return None
        return found

    def body_end(self, delim: _Delimiter | None, body_start: int) -> int:
        """Where a body ends: before the line break that belongs to the delimiter."""
        if delim is None:
            return self.n
        end = delim.start
        if end > body_start and self.raw[end - 1] == 0x0A:
            end -= 2 if end - 1 > body_start and self.raw[end - 2] == 0x0D else 1
        return max(end, body_start)

    # --- entities -------------------------------------------------------------------------

    def entity(
        self, start: int, depth: int, default_digest: bool, is_message: bool
    ) -> tuple[BodyPart, _Delimiter | None, Envelope | None, int]:
        """Parse the entity whose header starts at ``start``.

        Returns the part, the delimiter that ended it (None at end of input), the envelope
        of a message header, and the offset up to which the input was consumed: past the
        part's end when its header's empty line went to the delimiter that follows.
        """
        self.parts += 1
        raw = self.raw
        fields_end, body_start = self.header_end(start)
        cut = self.next_delimiter(start, body_start) if self.stack else None
        consumed = 0
        if cut is not None:
            # A delimiter inside the header ends the part there, with an empty body and
            # (as in Dovecot) the line break before the delimiter left outside the header,
            # though the enclosing part still holds it.
            fields_end = body_start = self.body_end(cut, start)
            consumed = cut.start
        mime: dict[bytes, bytes] = {}
        env: dict[bytes, list[bytes]] = {}
        for f in iter_fields(raw, start, fields_end):
            lname = f.lname
            if lname in _MIME_FIELDS:
                mime.setdefault(lname, f.value)
            if is_message and lname in ENVELOPE_FIELDS:
                env.setdefault(lname, []).append(f.value)
        envelope = build_envelope(env) if is_message else None
        # Dovecot reads the other Content-* fields of a message header only when the
        # message says it is MIME (RFC 2045 §4) through MIME-Version or Content-Type.
        is_mime = not is_message or b"mime-version" in mime or b"content-type" in mime
        part = self.describe_fields(mime, is_mime, default_digest)
        if cut is None and self.stack:
            cut = self.delimiter_after_header(part, body_start)
            consumed = body_start
            if cut is not None:
                # The empty line is also the line break before a delimiter: like Dovecot,
                # give it to the delimiter (RFC 2046 §5.1.1); the header ends before it.
                body_start = fields_end
        part.header_start, part.body_start = start, body_start

        delim: _Delimiter | None
        if cut is not None:
            delim = cut
            part.end = body_start
            self.fill_empty_children(part)
            if part.type == "MESSAGE" and part.subtype in MESSAGE_SUBTYPES:
                self.empty_message(part)
        elif part.type == "MULTIPART" and self.within_limits(depth):
            delim = self.multipart(part, depth)
        elif part.type == "MESSAGE" and part.subtype in MESSAGE_SUBTYPES:
            delim = self.encapsulated(part, depth)
        else:
            if part.type == "MULTIPART":
                part.type, part.subtype = OPAQUE_TYPE
            delim = self.next_delimiter(body_start)
            part.end = self.body_end(delim, body_start)
        part.size = part.end - body_start
        if part.type == "TEXT" or part.is_message:
            part.lines = raw.count(b"\n", body_start, part.end)
        return part, delim, envelope, max(part.end, consumed)

    def header_end(self, start: int) -> tuple[int, int]:
        """:func:`header_end`, remembering the last answer: parts whose headers never end
        (no empty line) would otherwise each search the rest of the message, which is
        quadratic in the number of such parts."""
        raw = self.raw
        if raw.startswith((b"\n", b"\r\n"), start):
            return header_end(raw, start, self.n)
        searched_from, fields_end, body_start = self.last_header
        if searched_from <= start < fields_end:
            return fields_end, body_start
        fields_end, body_start = header_end(raw, start, self.n)
        self.last_header = (start, fields_end, body_start)
        return fields_end, body_start

    def within_limits(self, depth: int) -> bool:
        return depth < MAX_DEPTH and self.parts < MAX_PARTS

    def describe_fields(self, mime: dict[bytes, bytes], is_mime: bool, digest: bool) -> BodyPart:
        ctype = mime.get(b"content-type")
        if ctype is not None:
            media = parse_media_type(unfold(ctype))
            params = media.params
            # RFC 2045 §5.2: an invalid Content-Type is read as the default, text/plain.
            mtype, subtype = (media.type, media.subtype) if media.type else ("TEXT", "PLAIN")
        elif digest:
            mtype, subtype, params = "MESSAGE", "RFC822", []  # RFC 2046 §5.1.5
        else:
            mtype, subtype, params = "TEXT", "PLAIN", []
        if mtype == "TEXT" and param(params, "charset") is None:
            params = [*params, ("charset", "us-ascii")]  # RFC 2045 §5.2, as Dovecot shows it
        part = BodyPart(mtype, subtype or "", params)
        if not is_mime:
            return part
        part.encoding = _encoding(mime.get(b"content-transfer-encoding"))
        part.id = _nstring(mime.get(b"content-id"))
        part.description = _nstring(mime.get(b"content-description"))
        part.md5 = _nstring(mime.get(b"content-md5"))
        part.location = _nstring(mime.get(b"content-location"))
        disposition = mime.get(b"content-disposition")
        part.disposition = parse_disposition(unfold(disposition)) if disposition else None
        language = mime.get(b"content-language")
        part.language = _languages(unfold(language)) if language else None
        return part

    def multipart(self, part: BodyPart, depth: int) -> _Delimiter | None:
        boundary = param(part.params, "boundary")
        if boundary is None:  # an empty boundary is absurd, but Dovecot honours it too
            delim = self.next_delimiter(part.body_start)
            part.end = self.body_end(delim, part.body_start)
            self.fill_empty_children(part)
            return delim
        self.stack.append(_delimiter_prefix(boundary))
        level = len(self.stack) - 1
        digest = part.subtype == "DIGEST"
        delim = self.next_delimiter(part.body_start)  # the preamble ends here
        consumed = 0
        while delim is not None and delim.level == level and not delim.close:
            if self.parts >= MAX_PARTS:
                delim = self.skip_parts(delim, level)
                break
            child, delim, _, consumed = self.entity(delim.after, depth + 1, digest, False)
            part.parts.append(child)
        self.stack.pop()
        floor = part.body_start
        if delim is not None and delim.level == level:
            # The epilogue runs to the next delimiter; the close delimiter line keeps its
            # own line break even when that delimiter follows at once (as in Dovecot).
            floor = delim.after
            delim = self.next_delimiter(delim.after)
        part.end = self.body_end(delim, floor)
        if part.parts and floor == part.body_start:
            # A last part whose header ran into the delimiter consumed the line break
            # that otherwise precedes it; the container still holds it (as in Dovecot).
            part.end = max(part.end, consumed)
        self.fill_empty_children(part)
        return delim

    def skip_parts(self, delim: _Delimiter, level: int) -> _Delimiter | None:
        """Past the part limit: step over this multipart's remaining delimiters unparsed."""
        found: _Delimiter | None = delim
        while found is not None and found.level == level and not found.close:
            found = self.next_delimiter(found.after)
        return found

    def fill_empty_children(self, part: BodyPart) -> None:
        # RFC 9051 body-type-mpart needs at least one part; Dovecot shows an empty
        # text/plain for a multipart without any, and so do we.
        if part.type == "MULTIPART" and not part.parts:
            at = part.body_start
            part.parts.append(
                BodyPart(
                    "TEXT",
                    "PLAIN",
                    [("charset", "us-ascii")],
                    lines=0,
                    header_start=at,
                    body_start=at,
                    end=at,
                )
            )

    def encapsulated(self, part: BodyPart, depth: int) -> _Delimiter | None:
        """MESSAGE/RFC822 (and GLOBAL): the body is a whole message, described in turn."""
        if part.encoding in _IDENTITY_CTE and self.within_limits(depth):
            inner, delim, envelope, consumed = self.entity(part.body_start, depth + 1, False, True)
            part.message_body, part.message_envelope = inner, envelope
            part.end = consumed
            return delim
        # An encoded (RFC 2046 §5.2.1 forbids it) or too deep message is opaque.
        delim = self.next_delimiter(part.body_start)
        part.end = self.body_end(delim, part.body_start)
        self.empty_message(part)
        return delim

    def empty_message(self, part: BodyPart) -> None:
        # IMAP's body-type-msg still needs an envelope and a body: both empty, as in
        # Dovecot, which also takes the undecodable octets for the message's header.
        at = part.end
        part.message_envelope = Envelope()
        part.message_body = BodyPart(
            "TEXT",
            "PLAIN",
            [("charset", "us-ascii")],
            lines=0,
            header_start=part.body_start,
            body_start=at,
            end=at,
        )


def _delimiter_prefix(boundary: str) -> bytes:
    """What a delimiter line starts with (RFC 2046 §5.1.1), cut to the compared length."""
    return (b"--" + boundary.encode("utf-8", "replace"))[: BOUNDARY_MATCH_LEN + 2]


def _nstring(value: bytes | None) -> str | None:
    return None if value is None else wire_text(unfold(value))


def _encoding(value: bytes | None) -> str:
    # RFC 2045 §6.1: one token. Like Dovecot, anything else ("quoted printable",
    # "text/html", "base64;") is not an encoding, and the default 7BIT stands.
    if value is None:
        return "7BIT"
    token = _CTE_TOKEN.fullmatch(unfold(value))
    return token.group(1).decode("ascii").upper() if token else "7BIT"


def _languages(value: bytes) -> list[str] | None:
    # RFC 3282: a comma-separated list of language tags, possibly with comments.
    out: list[str] = []
    depth = 0
    word = bytearray()
    for c in value + b",":
        if c == 0x28:
            depth += 1
        elif c == 0x29 and depth:
            depth -= 1
        elif depth:
            continue
        elif c in b', \t"':
            if word:
                out.append(wire_text(bytes(word)))
                word.clear()
        else:
            word.append(c)
        if len(out) >= MAX_LANGUAGES:
            break
    return out or None
