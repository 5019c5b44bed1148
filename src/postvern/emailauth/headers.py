"""The header block of a message as email authentication needs it: fields with their offsets.

Only the header block is scanned (up to the first empty line), never the body, and every
field keeps its exact bytes and position, so callers can read a field, unfold it, or cut it
out of the message without touching anything else (RFC 5322 §2.2, §2.2.3).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass

from postvern.emailauth import canon
from postvern.mime.headers import header_end, iter_fields

# A header block with more fields than this is not mail any MTA would send; scanning stops
# there so a hostile message cannot make every check walk millions of lines.
MAX_HEADER_FIELDS = 2000

_FOLD = re.compile(rb"\r?\n(?=[ \t])")


@dataclass(frozen=True)
class Field:
    name: str  # as written (compare with .lower())
    value: bytes  # everything after the colon, folding and final line break included
    start: int  # offset of the field's first byte in the message
    end: int  # offset just past its final line break

    @property
    def unfolded(self) -> bytes:
        """RFC 5322 §2.2.3: the value with folding line breaks removed, ends stripped."""
        return _FOLD.sub(b"", self.value).strip()

    def text(self) -> str:
        """The unfolded value as text (RFC 6532 allows UTF-8; anything else is replaced)."""
        return self.unfolded.decode("utf-8", "replace")


@dataclass(frozen=True)
class HeaderBlock:
    fields: list[Field]
    body_start: int  # offset of the body (len(message) when there is none)
    malformed: bool  # a line was neither a field, a continuation nor an mbox "From " line

    def get_all(self, name: str) -> list[Field]:
        wanted = name.lower()
        return [f for f in self.fields if f.name.lower() == wanted]


def parse_header_block(message: bytes) -> HeaderBlock:
    """Split the header block into fields; malformed lines are noted, never raised.

    The scanning is :mod:`postvern.mime.headers`' (one header splitter for the whole
    server); this adds what authentication needs: each value with its final line break,
    a bound on the number of fields, and whether anything was not a field.
    """
    fields_end, body_start = header_end(message, 0, len(message))
    fields: list[Field] = []
    malformed = False
    for field in iter_fields(message, 0, fields_end, junk=True):
        if not field.name:
            # A line that is not a field; an mbox "From " separator first is tolerated.
            if not (field.start == 0 and message.startswith(b"From ")):
                malformed = True
            continue
        if len(fields) >= MAX_HEADER_FIELDS:
            return HeaderBlock(fields, len(message), True)
        colon = message.index(b":", field.start)
        name = field.name.decode("ascii")
        fields.append(Field(name, message[colon + 1 : field.end], field.start, field.end))
    return HeaderBlock(fields, body_start, malformed)


def remove_fields(message: bytes, doomed: list[Field]) -> bytes:
    """The message without the given fields, every other byte unchanged."""
    if not doomed:
        return message
    pieces, pos = [], 0
    for field in sorted(doomed, key=lambda f: f.start):
        pieces.append(message[pos : field.start])
        pos = field.end
    pieces.append(message[pos:])
    return b"".join(pieces)


class ParsedMessage:
    """A message with its header block parsed once, to travel the whole pipeline.

    SPF, DKIM, ARC, DMARC, the Authentication-Results rewriting and signing all read the same
    fields and body view instead of each parsing the bytes again. The canonical bodies DKIM
    and ARC hash are computed once per canonicalisation and kept here, so the two signatures
    of a dual-signed message (RFC 8463) share one; rewriting the header block (adding our
    field, removing forged ones) keeps them, since the body does not change.
    """

    __slots__ = ("_canonical", "block", "body_start", "raw")

    def __init__(self, raw: bytes, block: HeaderBlock | None = None) -> None:
        self.raw = raw
        self.block = block if block is not None else parse_header_block(raw)
        # Where the body starts even when the block was cut at MAX_HEADER_FIELDS.
        self.body_start = header_end(raw, 0, len(raw))[1]
        self._canonical: dict[bytes, bytes] = {}

    @classmethod
    def of(cls, message: bytes | ParsedMessage) -> ParsedMessage:
        return message if isinstance(message, ParsedMessage) else cls(message)

    @property
    def header_bytes(self) -> bytes:
        """The header block with its empty line: all a header hash or a parser needs."""
        return self.raw[: self.body_start]

    @property
    def body(self) -> bytes:
        """The body with every line break CRLF (what DKIM canonicalises)."""
        cached = self._canonical.get(b"")
        if cached is None:
            cached = canon.normalise_line_breaks(self.raw[self.body_start :])
            self._canonical[b""] = cached
        return cached

    def canonical_body(self, method: bytes) -> bytes:
        """The body under DKIM's ``simple`` or ``relaxed`` canonicalisation, computed once."""
        method = method.lower()
        cached = self._canonical.get(method)
        if cached is None:
            cached = canon.CANONICALISERS[method](self.body)
            self._canonical[method] = cached
        return cached

    def rewritten(self, prepend: bytes = b"", remove: Sequence[Field] = ()) -> ParsedMessage:
        """The message with ``prepend`` (whole fields) first and ``remove`` cut out; the
        fields are moved, not parsed again, and the body (and its canonical forms) kept."""
        if not prepend and not remove:
            return self
        doomed = {f.start for f in remove}
        added = parse_header_block(prepend).fields if prepend else []
        fields = list(added)
        shift = len(prepend)
        for f in self.block.fields:
            if f.start in doomed:
                shift -= f.end - f.start
                continue
            fields.append(dataclasses.replace(f, start=f.start + shift, end=f.end + shift))
        block = HeaderBlock(fields, self.block.body_start + shift, self.block.malformed)
        result = ParsedMessage.__new__(ParsedMessage)
        result.raw = prepend + remove_fields(self.raw, list(remove))
        result.block = block
        result.body_start = self.body_start + shift
        result._canonical = self._canonical
        return result
