"""The shape of a parsed message, as IMAP describes it (RFC 9051 §7.5.2).

A message is parsed once, at insert, into an :class:`Envelope` and a :class:`BodyPart` tree.
The store caches both as JSON beside the raw bytes, so that FETCH ENVELOPE, BODYSTRUCTURE
and BODY[section] never parse again: every part records the byte offsets of its header and
body inside the raw message.

Strings here are the header values as they appear on the wire (RFC 2047 encoded words are
*not* decoded: IMAP returns them undecoded), with folding removed. ``None`` is NIL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Address:
    """One address structure: (name adl mailbox host).

    RFC 9051 §7.5.2 encodes groups in-band: the start of a group is an Address with
    ``host=None`` and ``mailbox`` = the group name; the end is one with both ``None``.
    """

    name: str | None
    adl: str | None
    mailbox: str | None
    host: str | None


@dataclass(slots=True)
class Envelope:
    date: str | None = None
    subject: str | None = None
    from_: list[Address] = field(default_factory=list)
    sender: list[Address] = field(default_factory=list)
    reply_to: list[Address] = field(default_factory=list)
    to: list[Address] = field(default_factory=list)
    cc: list[Address] = field(default_factory=list)
    bcc: list[Address] = field(default_factory=list)
    in_reply_to: str | None = None
    message_id: str | None = None


@dataclass(slots=True)
class BodyPart:
    """One node of the MIME tree, with what BODYSTRUCTURE needs and where it lies.

    ``type``/``subtype`` are as IMAP reports them (upper-case by convention, e.g. ``TEXT``,
    ``PLAIN``). Offsets index the raw message: ``header_start`` ≤ ``body_start`` ≤ ``end``;
    the part's MIME header is ``raw[header_start:body_start]`` (including the blank line)
    and its body is ``raw[body_start:end]``. For the top level, the header is the message
    header. ``size`` is ``end - body_start`` (RFC 9051: octets of the body as transferred).
    """

    type: str
    subtype: str
    params: list[tuple[str, str]] = field(default_factory=list)
    id: str | None = None
    description: str | None = None
    encoding: str = "7BIT"
    size: int = 0
    lines: int | None = None  # TEXT/* and MESSAGE/RFC822 (and GLOBAL) only
    md5: str | None = None
    disposition: tuple[str, list[tuple[str, str]]] | None = None
    language: list[str] | None = None
    location: str | None = None
    parts: list[BodyPart] = field(default_factory=list)  # multipart children
    # MESSAGE/RFC822 (and MESSAGE/GLOBAL): the encapsulated message's envelope and body.
    message_envelope: Envelope | None = None
    message_body: BodyPart | None = None
    header_start: int = 0
    body_start: int = 0
    end: int = 0

    @property
    def is_multipart(self) -> bool:
        return self.type == "MULTIPART"

    @property
    def is_message(self) -> bool:
        return self.message_body is not None


def envelope_to_json(env: Envelope) -> str:
    return json.dumps(_envelope_dict(env), separators=(",", ":"))


def envelope_from_json(text: str) -> Envelope:
    return _envelope(json.loads(text))


def body_to_json(part: BodyPart) -> str:
    return json.dumps(_body_dict(part), separators=(",", ":"))


# The stored JSON has one key per field, in field order. Written out rather than through
# dataclasses.asdict, whose recursive deep copy was a fifth of the cost of a spool import.
def _address_dicts(items: list[Address]) -> list[dict[str, Any]]:
    return [{"name": a.name, "adl": a.adl, "mailbox": a.mailbox, "host": a.host} for a in items]


def _envelope_dict(env: Envelope) -> dict[str, Any]:
    return {
        "date": env.date,
        "subject": env.subject,
        "from_": _address_dicts(env.from_),
        "sender": _address_dicts(env.sender),
        "reply_to": _address_dicts(env.reply_to),
        "to": _address_dicts(env.to),
        "cc": _address_dicts(env.cc),
        "bcc": _address_dicts(env.bcc),
        "in_reply_to": env.in_reply_to,
        "message_id": env.message_id,
    }


def _body_dict(part: BodyPart) -> dict[str, Any]:
    return {
        "type": part.type,
        "subtype": part.subtype,
        "params": part.params,
        "id": part.id,
        "description": part.description,
        "encoding": part.encoding,
        "size": part.size,
        "lines": part.lines,
        "md5": part.md5,
        "disposition": part.disposition,
        "language": part.language,
        "location": part.location,
        "parts": [_body_dict(p) for p in part.parts],
        "message_envelope": (
            _envelope_dict(part.message_envelope) if part.message_envelope else None
        ),
        "message_body": _body_dict(part.message_body) if part.message_body else None,
        "header_start": part.header_start,
        "body_start": part.body_start,
        "end": part.end,
    }


def body_from_json(text: str) -> BodyPart:
    return _body(json.loads(text))


def _addresses(items: list[Any]) -> list[Address]:
    return [Address(**a) for a in items]


def _envelope(d: dict[str, Any]) -> Envelope:
    return Envelope(
        date=d["date"],
        subject=d["subject"],
        from_=_addresses(d["from_"]),
        sender=_addresses(d["sender"]),
        reply_to=_addresses(d["reply_to"]),
        to=_addresses(d["to"]),
        cc=_addresses(d["cc"]),
        bcc=_addresses(d["bcc"]),
        in_reply_to=d["in_reply_to"],
        message_id=d["message_id"],
    )


def _body(d: dict[str, Any]) -> BodyPart:
    disp = d["disposition"]
    return BodyPart(
        type=d["type"],
        subtype=d["subtype"],
        params=[tuple(p) for p in d["params"]],
        id=d["id"],
        description=d["description"],
        encoding=d["encoding"],
        size=d["size"],
        lines=d["lines"],
        md5=d["md5"],
        disposition=(disp[0], [tuple(p) for p in disp[1]]) if disp else None,
        language=d["language"],
        location=d["location"],
        parts=[_body(p) for p in d["parts"]],
        message_envelope=_envelope(d["message_envelope"]) if d["message_envelope"] else None,
        message_body=_body(d["message_body"]) if d["message_body"] else None,
        header_start=d["header_start"],
        body_start=d["body_start"],
        end=d["end"],
    )
