"""MIME parsing: the structure IMAP describes, section extraction, text for search.

``describe`` runs once per message at insert; its result (see :mod:`.model`) is cached as
JSON and serves FETCH ENVELOPE/BODYSTRUCTURE, and with the raw bytes, BODY[section] and
BINARY[section] without parsing again.
"""

from .cte import UnknownTransferEncoding
from .model import (
    Address,
    BodyPart,
    Envelope,
    body_from_json,
    body_to_json,
    envelope_from_json,
    envelope_to_json,
)
from .parse import MAX_DEPTH, MAX_PARTS, describe
from .section import (
    Section,
    SectionSyntaxError,
    binary_bytes,
    find_part,
    parse_section,
    section_bytes,
)
from .text import body_text, header_values, headers_text, iter_leaves

__all__ = [
    "MAX_DEPTH",
    "MAX_PARTS",
    "Address",
    "BodyPart",
    "Envelope",
    "Section",
    "SectionSyntaxError",
    "UnknownTransferEncoding",
    "binary_bytes",
    "body_from_json",
    "body_text",
    "body_to_json",
    "describe",
    "envelope_from_json",
    "envelope_to_json",
    "find_part",
    "header_values",
    "headers_text",
    "iter_leaves",
    "parse_section",
    "section_bytes",
]
