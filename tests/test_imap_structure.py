"""ENVELOPE, BODY and BODYSTRUCTURE rendering of hand-built MIME model objects."""

from postvern.imap.structure import render_body, render_envelope
from postvern.imap.wire import WireContext
from postvern.mime.model import Address, BodyPart, Envelope, body_from_json, body_to_json


def text_part(**kw: object) -> BodyPart:
    fields: dict[str, object] = {
        "type": "TEXT",
        "subtype": "PLAIN",
        "params": [("CHARSET", "US-ASCII")],
        "size": 3028,
        "lines": 92,
    }
    fields.update(kw)
    return BodyPart(**fields)  # type: ignore[arg-type]


def test_rfc_single_part_body() -> None:
    # RFC 3501 §7.4.2 BODYSTRUCTURE example (a non-multipart body).
    assert render_body(text_part(), extensible=False) == (
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 3028 92)'
    )
    assert render_body(text_part(), extensible=True) == (
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 3028 92 NIL NIL NIL NIL)'
    )


def test_rfc_multipart_body() -> None:
    # RFC 3501 §7.4.2 example: two text parts, parts written with no space between them.
    first = text_part(size=1152, lines=23)
    second = text_part(
        params=[("CHARSET", "US-ASCII"), ("NAME", "cc.diff")],
        id="<960723163407.20117h@cac.washington.edu>",
        description="Compiler diff",
        encoding="BASE64",
        size=4554,
        lines=73,
    )
    mixed = BodyPart(type="MULTIPART", subtype="MIXED", parts=[first, second])
    assert render_body(mixed, extensible=False) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1152 23)'
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII" "NAME" "cc.diff") '
        b'"<960723163407.20117h@cac.washington.edu>" "Compiler diff" "BASE64" 4554 73) "MIXED")'
    )


def test_bodystructure_extension_data() -> None:
    attachment = BodyPart(
        type="APPLICATION",
        subtype="PDF",
        params=[("NAME", "report.pdf")],
        encoding="BASE64",
        size=1000,
        md5="Q2hlY2sgSW50ZWdyaXR5IQ==",
        disposition=("attachment", [("filename", "report.pdf")]),
        language=["en", "de"],
        location="http://example.com/report.pdf",
    )
    inline = text_part(disposition=("inline", []), language=["en"], lines=None)
    mixed = BodyPart(
        type="MULTIPART",
        subtype="MIXED",
        params=[("BOUNDARY", "xyz")],
        parts=[inline, attachment],
        disposition=None,
        language=None,
    )
    assert render_body(mixed, extensible=True) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 3028 0 '
        b'NIL ("inline" NIL) "en" NIL)'
        b'("APPLICATION" "PDF" ("NAME" "report.pdf") NIL NIL "BASE64" 1000 '
        b'"Q2hlY2sgSW50ZWdyaXR5IQ==" ("attachment" ("filename" "report.pdf")) ("en" "de") '
        b'"http://example.com/report.pdf") "MIXED" ("BOUNDARY" "xyz") NIL NIL NIL)'
    )
    # BODY is the same tree without any extension data, at every level.
    assert render_body(mixed, extensible=False) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 3028 0)'
        b'("APPLICATION" "PDF" ("NAME" "report.pdf") NIL NIL "BASE64" 1000) "MIXED")'
    )


def test_envelope_with_group_and_defaults() -> None:
    envelope = Envelope(
        date="Wed, 17 Jul 1996 02:23:25 -0700 (PDT)",
        subject="IMAP4rev1 WG mtg summary and minutes",
        from_=[Address("Terry Gray", None, "gray", "cac.washington.edu")],
        to=[Address(None, None, "imap", "cac.washington.edu")],
        cc=[
            Address(None, None, "minutes", "CNRI.Reston.VA.US"),
            Address("John Klensin", None, "KLENSIN", "MIT.EDU"),
        ],
        bcc=[
            Address(None, None, "undisclosed-recipients", None),  # group start
            Address(None, None, None, None),  # group end
        ],
        message_id="<B27397-0100000@cac.washington.edu>",
    )
    # RFC 3501 §7.4.2 example; Sender and Reply-To default to From.
    assert render_envelope(envelope) == (
        b'("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)" "IMAP4rev1 WG mtg summary and minutes" '
        b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
        b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
        b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
        b'((NIL NIL "imap" "cac.washington.edu")) '
        b'((NIL NIL "minutes" "CNRI.Reston.VA.US")("John Klensin" NIL "KLENSIN" "MIT.EDU")) '
        b'((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL)) '
        b'NIL "<B27397-0100000@cac.washington.edu>")'
    )


def test_empty_envelope_is_all_nil() -> None:
    assert render_envelope(Envelope()) == b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"


def test_eight_bit_and_special_strings() -> None:
    envelope = Envelope(
        subject='caf\udce9 "quoted" back\\slash', from_=[Address("Jürgen", None, "j", "x.de")]
    )
    rendered = render_envelope(envelope)
    # Raw 8-bit (kept as a surrogate escape by the MIME parser) goes back out as a literal.
    assert b'{24}\r\ncaf\xe9 "quoted" back\\slash' in rendered
    assert b'(("J' not in rendered and b"{7}\r\nJ\xc3\xbcrgen" in rendered
    utf8 = render_envelope(envelope, WireContext(utf8=True))
    assert b'(("J\xc3\xbcrgen" NIL "j" "x.de"))' in utf8
    crlf = render_envelope(Envelope(subject="a\r\nb"))
    assert b"{4}\r\na\r\nb" in crlf


def test_message_rfc822_part() -> None:
    inner_env = Envelope(subject="inner", from_=[Address(None, None, "a", "b.example")])
    inner_body = text_part(size=10, lines=1, params=[])
    attached = BodyPart(
        type="MESSAGE",
        subtype="RFC822",
        size=500,
        lines=12,
        message_envelope=inner_env,
        message_body=inner_body,
    )
    assert render_body(attached, extensible=False) == (
        b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 500 '
        b'(NIL "inner" ((NIL NIL "a" "b.example")) ((NIL NIL "a" "b.example")) '
        b'((NIL NIL "a" "b.example")) NIL NIL NIL NIL NIL) '
        b'("TEXT" "PLAIN" NIL NIL NIL "7BIT" 10 1) 12)'
    )
    assert render_body(attached, extensible=True).endswith(
        b'("TEXT" "PLAIN" NIL NIL NIL "7BIT" 10 1 NIL NIL NIL NIL) 12 NIL NIL NIL NIL)'
    )
    # A MESSAGE/RFC822 whose content could not be parsed is described as a basic part.
    broken = BodyPart(type="MESSAGE", subtype="RFC822", size=5)
    assert render_body(broken, extensible=False) == b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 5)'


def test_nested_multipart_and_empty_multipart() -> None:
    alternative = BodyPart(
        type="MULTIPART",
        subtype="ALTERNATIVE",
        parts=[text_part(size=1, lines=1), text_part(subtype="HTML", size=2, lines=1)],
    )
    outer = BodyPart(type="MULTIPART", subtype="MIXED", parts=[alternative])
    assert render_body(outer, extensible=False) == (
        b'((("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1 1)'
        b'("TEXT" "HTML" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 2 1) "ALTERNATIVE") "MIXED")'
    )
    empty = BodyPart(type="MULTIPART", subtype="MIXED")
    assert render_body(empty, extensible=False) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0) "MIXED")'
    )


def test_rendering_survives_the_json_cache() -> None:
    part = BodyPart(
        type="MULTIPART",
        subtype="MIXED",
        parts=[text_part(disposition=("inline", [("a", "b")]), language=["en"])],
    )
    again = body_from_json(body_to_json(part))
    assert render_body(again, extensible=True) == render_body(part, extensible=True)
