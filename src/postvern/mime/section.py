"""FETCH BODY[section] and BINARY[section] (RFC 9051 §6.4.5, RFC 3516) from stored offsets.

A section is parsed once into a :class:`Section` (so the IMAP layer can reject bad syntax
with BAD before touching a message), then resolved against the cached :class:`BodyPart`
tree and sliced out of the raw message; nothing is re-parsed except the header lines that
HEADER.FIELDS selects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .cte import UnknownTransferEncoding, decode_body
from .headers import iter_fields
from .model import BodyPart

__all__ = [
    "Section",
    "SectionSyntaxError",
    "UnknownTransferEncoding",
    "binary_bytes",
    "find_part",
    "parse_section",
    "section_bytes",
]

# RFC 9051 has no limit; these keep a hostile FETCH from costing more than the message.
MAX_PART_DEPTH = 128
MAX_HEADER_NAMES = 256

_TEXTS = ("HEADER.FIELDS.NOT", "HEADER.FIELDS", "HEADER", "TEXT", "MIME")
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 9051 header-fld-name is an astring


class SectionSyntaxError(ValueError):
    """The section spec is not valid RFC 9051 syntax (the IMAP answer is BAD)."""


@dataclass(slots=True, frozen=True)
class Section:
    """A parsed section spec: a part path and what to take from that part.

    ``part`` is the numeric path (empty for the whole message); ``text`` is one of
    ``HEADER``, ``HEADER.FIELDS``, ``HEADER.FIELDS.NOT``, ``TEXT``, ``MIME`` or None (the
    part's body); ``fields`` holds the upper-cased header names of HEADER.FIELDS[.NOT].
    """

    part: tuple[int, ...] = ()
    text: str | None = None
    fields: tuple[str, ...] = ()

    def __str__(self) -> str:
        items = [str(n) for n in self.part]
        if self.text:
            items.append(self.text)
        spec = ".".join(items)
        return f"{spec} ({' '.join(self.fields)})" if self.fields else spec


def parse_section(spec: str) -> Section:
    """Parse the text between the brackets of BODY[...] (RFC 9051 §9 ``section-spec``)."""
    rest = spec.strip()
    fields: tuple[str, ...] = ()
    if "(" in rest:
        rest, fields = _header_list(rest)
    part: list[int] = []
    text: str | None = None
    while rest:
        head, dot, tail = rest.partition(".")
        if head.isdigit() and text is None:
            if head.startswith("0") or len(part) >= MAX_PART_DEPTH or not head.isascii():
                raise SectionSyntaxError("bad part number")
            part.append(int(head))
            if dot and not tail:
                raise SectionSyntaxError("trailing dot")
            rest = tail
            continue
        text = next((t for t in _TEXTS if rest.upper() == t), None)
        if text is None:
            raise SectionSyntaxError("unknown section text")
        break
    if text == "MIME" and not part:
        raise SectionSyntaxError("MIME needs a part number")
    if (text or "").startswith("HEADER.FIELDS") != bool(fields):
        raise SectionSyntaxError("HEADER.FIELDS needs a header list, and only it")
    return Section(tuple(part), text, fields)


def _header_list(spec: str) -> tuple[str, tuple[str, ...]]:
    head, _, names = spec.partition("(")
    if not names.endswith(")") or not head.endswith(" "):
        raise SectionSyntaxError("bad header list")
    items = names[:-1].split()
    if not items or len(items) > MAX_HEADER_NAMES:
        raise SectionSyntaxError("bad header list")
    out = []
    for item in items:
        name = item[1:-1] if len(item) >= 2 and item[0] == item[-1] == '"' else item
        if not _FIELD_NAME.fullmatch(name):
            raise SectionSyntaxError("bad header name")
        out.append(name.upper())
    return head.rstrip(), tuple(out)


def find_part(body: BodyPart, path: tuple[int, ...]) -> BodyPart | None:
    """The part a numeric path names, or None (RFC 9051 §6.4.5 part numbering).

    The message itself and every encapsulated message number their body's parts; a
    non-multipart body is part 1 of its message.
    """
    node = body
    for depth, number in enumerate(path):
        if depth == 0:
            container: BodyPart | None = node
        elif node.message_body is not None:
            container = node.message_body
        elif node.is_multipart:
            container = node
        else:
            return None  # a leaf has no sub-parts
        assert container is not None
        if container.is_multipart:
            if not 1 <= number <= len(container.parts):
                return None
            node = container.parts[number - 1]
        elif number == 1:
            node = container
        else:
            return None
    return node


def section_bytes(raw: bytes, body: BodyPart, section: str | Section) -> bytes | None:
    """The octets BODY[section] returns, or None when the part does not exist.

    (Dovecot answers a nonexistent part with an empty string; the IMAP layer chooses.)
    Raises :class:`SectionSyntaxError` for a malformed section given as text.
    """
    sec = parse_section(section) if isinstance(section, str) else section
    node = find_part(body, sec.part)
    if node is None:
        return None
    if sec.text is None:
        return raw if not sec.part else raw[node.body_start : node.end]
    if sec.text == "MIME":
        return raw[node.header_start : node.body_start]
    if sec.part:
        # HEADER and TEXT of a part apply only to an encapsulated message.
        if node.message_body is None:
            return None
        node = node.message_body
    if sec.text == "TEXT":
        return raw[node.body_start : node.end]
    if sec.text == "HEADER":
        return raw[node.header_start : node.body_start]
    return header_fields(raw, node, sec.fields, exclude=sec.text == "HEADER.FIELDS.NOT")


def header_fields(raw: bytes, node: BodyPart, names: tuple[str, ...], exclude: bool) -> bytes:
    """The header lines whose names are (or, with ``exclude``, are not) in ``names``.

    RFC 9051 §6.4.5: the subset of the header, then the blank line that ends it.
    """
    wanted = {n.lower().encode("ascii", "replace") for n in names}
    out = bytearray()
    for f in iter_fields(raw, node.header_start, node.body_start, junk=exclude):
        if (f.lname in wanted) != exclude:
            out += raw[f.start : f.end]
    # The header's own empty line ends the subset. When the message ends inside the
    # header there is none: Dovecot then still ends HEADER.FIELDS with one, but not
    # HEADER.FIELDS.NOT, which is the whole unterminated header; we do the same.
    empty = _empty_line(raw[node.header_start : node.body_start])
    out += empty or (b"" if exclude else b"\r\n")
    return bytes(out)


def _empty_line(header: bytes) -> bytes:
    for eol in (b"\r\n", b"\n"):
        if header == eol or header.endswith(b"\n" + eol):
            return eol
    return b""


def binary_bytes(raw: bytes, body: BodyPart, part_path: str | tuple[int, ...]) -> bytes | None:
    """BINARY[part] (RFC 3516 §4.2): the part's body with its transfer encoding undone.

    Returns None when the part does not exist; raises :class:`UnknownTransferEncoding` when
    the encoding is unknown (IMAP answers NO [UNKNOWN-CTE]) and :class:`SectionSyntaxError`
    for a malformed path.
    """
    if isinstance(part_path, str):
        sec = parse_section(part_path)
        if sec.text is not None:
            raise SectionSyntaxError("BINARY takes a part number only")
        part_path = sec.part
    node = find_part(body, part_path)
    if node is None:
        return None
    data = raw if not part_path else raw[node.body_start : node.end]
    if node.is_multipart or node.is_message:
        return data  # containers are returned as stored (RFC 3516 §4.2)
    return decode_body(data, node.encoding)
