"""The IMAP ENVELOPE (RFC 9051 §7.5.2) of a message header.

String fields are the unfolded header values as written (encoded words stay encoded, as
IMAP requires); address fields are parsed lists. As in Dovecot, a repeated string field
takes its last occurrence and repeated address fields are joined, so a second From header
is shown rather than hidden. Sender and Reply-To default to From (RFC 9051 §7.5.2).
"""

from __future__ import annotations

from .address import parse_addresses
from .headers import unfold, wire_text
from .model import Address, Envelope

ENVELOPE_FIELDS = frozenset(
    {
        b"date",
        b"subject",
        b"from",
        b"sender",
        b"reply-to",
        b"to",
        b"cc",
        b"bcc",
        b"in-reply-to",
        b"message-id",
    }
)


def _text(values: list[bytes] | None) -> str | None:
    return wire_text(unfold(values[-1])) if values else None


def _addresses(values: list[bytes] | None) -> list[Address]:
    out: list[Address] = []
    for value in values or ():
        out += parse_addresses(unfold(value))
    return out


def build_envelope(fields: dict[bytes, list[bytes]]) -> Envelope:
    """Build the envelope from raw field values keyed by lower-case field name."""
    from_ = _addresses(fields.get(b"from"))
    return Envelope(
        date=_text(fields.get(b"date")),
        subject=_text(fields.get(b"subject")),
        from_=from_,
        sender=_addresses(fields.get(b"sender")) or list(from_),
        reply_to=_addresses(fields.get(b"reply-to")) or list(from_),
        to=_addresses(fields.get(b"to")),
        cc=_addresses(fields.get(b"cc")),
        bcc=_addresses(fields.get(b"bcc")),
        in_reply_to=_text(fields.get(b"in-reply-to")),
        message_id=_text(fields.get(b"message-id")),
    )
