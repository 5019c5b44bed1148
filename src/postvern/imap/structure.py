"""ENVELOPE, BODY and BODYSTRUCTURE (RFC 9051 §7.5.2, RFC 3501 §7.4.2) from the MIME model.

The MIME parser (:mod:`postvern.mime.model`) records each message once; this module only
spells that record in IMAP's nested-list syntax, with NIL for what is absent. BODYSTRUCTURE
carries the extension data (MD5, disposition, language, location); BODY is the same tree
without it, as RFC 3501 clients expect.
"""

from __future__ import annotations

from postvern.imap.wire import Joined, WireContext, render
from postvern.mime.model import Address, BodyPart, Envelope

# RFC 9051 §9 body-type-mpart needs at least one part; a malformed multipart with none is
# described as one empty text part, as other servers do, rather than as invalid syntax.
_EMPTY_PART = BodyPart(type="TEXT", subtype="PLAIN", params=[("CHARSET", "US-ASCII")], lines=0)
# RFC 9051 media-message: these subtypes carry an envelope, a body and a line count.
_MESSAGE_SUBTYPES = frozenset({"RFC822", "GLOBAL"})


def _address(address: Address) -> list[object]:
    return [address.name, address.adl, address.mailbox, address.host]


def _address_list(addresses: list[Address]) -> list[object] | None:
    """RFC 9051 §9 env-from etc.: "(" 1*address ")" — no space between addresses — or NIL.

    Groups are already in-band (a start entry with a NIL host, an end entry of NILs).
    """
    return [Joined([_address(a) for a in addresses])] if addresses else None


def envelope_value(envelope: Envelope) -> list[object]:
    # RFC 3501 §7.4.2: an absent or empty Sender or Reply-To defaults to From.
    sender = envelope.sender or envelope.from_
    reply_to = envelope.reply_to or envelope.from_
    return [
        envelope.date,
        envelope.subject,
        _address_list(envelope.from_),
        _address_list(sender),
        _address_list(reply_to),
        _address_list(envelope.to),
        _address_list(envelope.cc),
        _address_list(envelope.bcc),
        envelope.in_reply_to,
        envelope.message_id,
    ]


def _params(params: list[tuple[str, str]]) -> list[object] | None:
    if not params:
        return None
    flat: list[object] = []
    for name, value in params:
        flat += [name, value]
    return flat


def _disposition(disposition: tuple[str, list[tuple[str, str]]] | None) -> list[object] | None:
    if disposition is None:
        return None
    kind, params = disposition
    return [kind, _params(params)]


def _language(language: list[str] | None) -> object:
    if not language:
        return None
    return language[0] if len(language) == 1 else list(language)


def body_value(part: BodyPart, *, extensible: bool) -> list[object]:
    """The ``body`` production: BODYSTRUCTURE when ``extensible``, BODY otherwise."""
    if part.is_multipart:
        return _multipart(part, extensible)
    return _single(part, extensible)


def _multipart(part: BodyPart, extensible: bool) -> list[object]:
    children = part.parts or [_EMPTY_PART]
    items: list[object] = [
        Joined([body_value(child, extensible=extensible) for child in children]),
        part.subtype,
    ]
    if extensible:
        # body-ext-mpart = body-fld-param SP body-fld-dsp SP body-fld-lang SP body-fld-loc
        items += [
            _params(part.params),
            _disposition(part.disposition),
            _language(part.language),
            part.location,
        ]
    return items


def _single(part: BodyPart, extensible: bool) -> list[object]:
    items: list[object] = [
        part.type,
        part.subtype,
        _params(part.params),
        part.id,
        part.description,
        part.encoding,
        part.size,
    ]
    kind = part.type.upper()
    if kind == "MESSAGE" and part.subtype.upper() in _MESSAGE_SUBTYPES and part.is_message:
        assert part.message_body is not None
        items += [
            envelope_value(part.message_envelope or Envelope()),
            body_value(part.message_body, extensible=extensible),
            part.lines or 0,
        ]
    elif kind == "TEXT":
        items.append(part.lines or 0)
    if extensible:
        # body-ext-1part = body-fld-md5 SP body-fld-dsp SP body-fld-lang SP body-fld-loc
        items += [part.md5, _disposition(part.disposition), _language(part.language), part.location]
    return items


def render_envelope(envelope: Envelope, ctx: WireContext | None = None) -> bytes:
    return render(envelope_value(envelope), ctx)


def render_body(part: BodyPart, *, extensible: bool, ctx: WireContext | None = None) -> bytes:
    return render(body_value(part, extensible=extensible), ctx)
