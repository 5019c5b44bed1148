"""The header block of a message as email authentication needs it: fields with their offsets.

Only the header block is scanned (up to the first empty line), never the body, and every
field keeps its exact bytes and position, so callers can read a field, unfold it, or cut it
out of the message without touching anything else (RFC 5322 §2.2, §2.2.3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
