"""Text of a message for search (RFC 9051 §6.4.4 SEARCH BODY/TEXT/HEADER) and filters.

Headers are decoded (RFC 2047 encoded words, RFC 6532 UTF-8), text parts are decoded from
their transfer encoding and charset, HTML is reduced to its words, and attachments are
skipped. Leaves can also be walked with their decoded content for attachment scanning.
All output is bounded, and nothing here raises on bad input.
"""

from __future__ import annotations

from collections.abc import Iterator

from .charset import decode
from .cte import UnknownTransferEncoding, decode_body
from .encoded_words import decode_header_value
from .headers import header_end, iter_fields, unfold
from .htmltext import html_to_text
from .model import BodyPart
from .params import param

# Search indexes the start of long bodies; a body beyond this adds cost, not recall.
DEFAULT_MAX_CHARS = 1_000_000
# Decoding cost is bounded per leaf: base64 of a 50 MB attachment is not read for a filter.
DEFAULT_MAX_DECODED = 32 * 1024 * 1024
# A header section with more lines than this is hostile; search reads the first ones.
MAX_HEADER_FIELDS = 2000

_TEXT_SUBTYPES = frozenset({"PLAIN", "HTML", "ENRICHED", "RICHTEXT"})


def headers_text(raw: bytes, body: BodyPart | None = None) -> str:
    """Every field of the (top-level) header as ``Name: decoded value`` lines."""
    end = body.body_start if body is not None else header_end(raw, 0, len(raw))[1]
    lines = []
    for i, f in enumerate(iter_fields(raw, 0, end)):
        if i >= MAX_HEADER_FIELDS:
            break
        name = f.name.decode("ascii", "replace")
        lines.append(f"{name}: {decode_header_value(unfold(f.value))}")
    return "\n".join(lines)


def header_values(raw: bytes, name: str, body: BodyPart | None = None) -> list[str]:
    """The decoded values of every top-level header field called ``name``."""
    lname = name.lower().encode("ascii", "replace")
    end = body.body_start if body is not None else header_end(raw, 0, len(raw))[1]
    return [
        decode_header_value(unfold(f.value))
        for i, f in enumerate(iter_fields(raw, 0, end))
        if i < MAX_HEADER_FIELDS and f.lname == lname
    ]


def is_attachment(part: BodyPart) -> bool:
    """A part a reader would show as an attachment rather than as message text."""
    if part.disposition is not None and part.disposition[0] == "ATTACHMENT":
        return True
    return filename(part) is not None and part.type != "TEXT"


def filename(part: BodyPart) -> str | None:
    """The part's file name (Content-Disposition filename, else Content-Type name), decoded.

    RFC 2231 encoded names (``filename*``) are percent-decoded in their charset; RFC 2047
    encoded words, which senders put in names against the RFC, are decoded too.
    """
    for params, key in (
        ((part.disposition[1] if part.disposition else []), "filename"),
        (
            part.params,
            "name",
        ),
    ):
        extended = param(params, key + "*")
        if extended is not None:
            return _rfc2231_value(extended)
        plain = param(params, key)
        if plain is not None:
            return decode_header_value(plain.encode("utf-8", "replace"))
    return None


def _rfc2231_value(value: str) -> str:
    from urllib.parse import unquote_to_bytes

    charset, _, rest = value.partition("'")
    _, _, encoded = rest.partition("'")
    if not rest:  # no charset'language' prefix
        charset, encoded = "utf-8", value
    return decode(unquote_to_bytes(encoded), charset or "utf-8")


def iter_leaves(
    raw: bytes, body: BodyPart, max_decoded: int = DEFAULT_MAX_DECODED
) -> Iterator[tuple[BodyPart, str | None, bytes]]:
    """Yield ``(part, filename, decoded content)`` for every leaf, encapsulated ones too.

    Content is cut to ``max_decoded`` octets (the raw input is cut before decoding, so the
    work is bounded too); a part with an unknown transfer encoding yields its raw octets.
    """
    for part in _leaves(body):
        data = raw[part.body_start : min(part.end, part.body_start + max_decoded * 2)]
        try:
            decoded = decode_body(data, part.encoding)
        except UnknownTransferEncoding:
            decoded = data
        yield part, filename(part), decoded[:max_decoded]


def _leaves(part: BodyPart) -> Iterator[BodyPart]:
    stack = [part]
    while stack:
        node = stack.pop()
        if node.is_multipart:
            stack.extend(reversed(node.parts))
        elif node.message_body is not None:
            stack.append(node.message_body)
        else:
            yield node


def body_text(raw: bytes, body: BodyPart, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """The readable text of the message: text parts decoded, HTML reduced, attachments
    skipped; of a multipart/alternative only the plain part when it has one."""
    out: list[str] = []
    size = 0
    for part in _text_parts(body):
        data = raw[part.body_start : min(part.end, part.body_start + max_chars * 4)]
        try:
            decoded = decode_body(data, part.encoding)
        except UnknownTransferEncoding:
            decoded = data
        text = decode(decoded, param(part.params, "charset"))
        if part.subtype == "HTML":
            text = html_to_text(text)
        out.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "\n".join(out)[:max_chars]


def _text_parts(part: BodyPart) -> Iterator[BodyPart]:
    if part.is_multipart:
        children = part.parts
        if part.subtype == "ALTERNATIVE":
            # RFC 2046 §5.1.4: alternatives say the same thing; prefer plain text.
            plain = [c for c in children if c.type == "TEXT" and c.subtype == "PLAIN"]
            children = plain[:1] or children[-1:]
        for child in children:
            yield from _text_parts(child)
    elif part.message_body is not None:
        yield from _text_parts(part.message_body)
    elif part.type == "TEXT" and part.subtype in _TEXT_SUBTYPES and not is_attachment(part):
        yield part
