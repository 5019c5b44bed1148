"""BODY[section] and BINARY[part] extraction (RFC 9051 §6.4.5, RFC 3516)."""

from __future__ import annotations

import base64

import pytest

from postvern.mime import (
    Section,
    SectionSyntaxError,
    UnknownTransferEncoding,
    binary_bytes,
    describe,
    parse_section,
    section_bytes,
)


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


HEADER = (
    "From: a@b\nSubject: top\nX-Folded: one\n two\nContent-Type: multipart/mixed; boundary=o\n\n"
)
PART1_MIME = (
    "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n"
)
PART2_MIME = "Content-Type: message/rfc822\n\n"
INNER_HEADER = "Subject: inner\nFrom: c@d\nContent-Type: multipart/alternative; boundary=i\n\n"
INNER_BODY = (
    "--i\nContent-Type: text/plain\n\ninner plain\n"
    "--i\nContent-Type: text/html\nContent-Transfer-Encoding: base64\n\n"
    + base64.b64encode(b"<b>inner</b>").decode()
    + "\n--i--\n"
)
MESSAGE = crlf(
    HEADER
    + "preamble\n--o\n"
    + PART1_MIME
    + "caf=C3=A9 =\nsoft\n--o\n"
    + PART2_MIME
    + INNER_HEADER
    + INNER_BODY
    + "--o--\n"
)


@pytest.fixture(scope="module")
def body():
    return describe(MESSAGE)[1]


def test_whole_header_and_text(body):
    assert section_bytes(MESSAGE, body, "") == MESSAGE
    assert section_bytes(MESSAGE, body, "HEADER") == crlf(HEADER)
    assert section_bytes(MESSAGE, body, "TEXT") == MESSAGE[len(crlf(HEADER)) :]


def test_part_and_mime(body):
    assert section_bytes(MESSAGE, body, "1") == b"caf=C3=A9 =\r\nsoft"
    assert section_bytes(MESSAGE, body, "1.MIME") == crlf(PART1_MIME)
    assert section_bytes(MESSAGE, body, "2.MIME") == crlf(PART2_MIME)
    # The close delimiter line keeps its line break even right before the outer delimiter.
    assert section_bytes(MESSAGE, body, "2") == crlf(INNER_HEADER + INNER_BODY)


def test_encapsulated_message_header_text_and_parts(body):
    assert section_bytes(MESSAGE, body, "2.HEADER") == crlf(INNER_HEADER)
    assert section_bytes(MESSAGE, body, "2.TEXT") == crlf(INNER_BODY)
    assert section_bytes(MESSAGE, body, "2.1") == b"inner plain"
    assert section_bytes(MESSAGE, body, "2.1.MIME") == crlf("Content-Type: text/plain\n\n")
    # The MIME header of an encapsulated message's body is that message's header (Dovecot).
    assert section_bytes(MESSAGE, body, "2.2.MIME").startswith(b"Content-Type: text/html")


def test_header_fields_and_not(body):
    got = section_bytes(MESSAGE, body, "HEADER.FIELDS (subject X-FOLDED)")
    assert got == crlf("Subject: top\nX-Folded: one\n two\n\n")
    got = section_bytes(MESSAGE, body, "HEADER.FIELDS.NOT (From Content-Type)")
    assert got == crlf("Subject: top\nX-Folded: one\n two\n\n")
    assert section_bytes(MESSAGE, body, "HEADER.FIELDS (NOPE)") == b"\r\n"
    assert section_bytes(MESSAGE, body, "2.HEADER.FIELDS (FROM)") == crlf("From: c@d\n\n")
    assert section_bytes(MESSAGE, body, "2.HEADER.FIELDS.NOT (FROM CONTENT-TYPE)") == crlf(
        "Subject: inner\n\n"
    )


def test_nonexistent_parts_are_none(body):
    for spec in ("3", "1.1", "2.3", "1.HEADER", "1.TEXT", "9.MIME", "2.1.1"):
        assert section_bytes(MESSAGE, body, spec) is None, spec


def test_part_one_of_a_single_part_message_is_its_body():
    raw = crlf("Subject: s\n\nhello\n")
    body = describe(raw)[1]
    assert section_bytes(raw, body, "1") == b"hello\r\n"
    assert section_bytes(raw, body, "1.MIME") == crlf("Subject: s\n\n")
    assert section_bytes(raw, body, "2") is None


def test_binary_decodes_transfer_encoding(body):
    assert binary_bytes(MESSAGE, body, "1") == "caf\u00e9 soft".encode()
    assert binary_bytes(MESSAGE, body, "2.2") == b"<b>inner</b>"
    assert binary_bytes(MESSAGE, body, (2, 1)) == b"inner plain"
    assert binary_bytes(MESSAGE, body, "7") is None


def test_binary_unknown_cte_raises_named_error():
    raw = crlf("MIME-Version: 1.0\nContent-Transfer-Encoding: x-uuencode\n\nbegin 644 x\n")
    body = describe(raw)[1]
    with pytest.raises(UnknownTransferEncoding):
        binary_bytes(raw, body, "1")
    assert section_bytes(raw, body, "1") == b"begin 644 x\r\n"


def test_parse_section_forms():
    assert parse_section("") == Section()
    assert parse_section("1.2.MIME") == Section((1, 2), "MIME")
    assert parse_section('HEADER.FIELDS (a "B")') == Section((), "HEADER.FIELDS", ("A", "B"))
    assert parse_section("3.header.fields.not (X)") == Section((3,), "HEADER.FIELDS.NOT", ("X",))
    assert str(parse_section("1.HEADER.FIELDS (a b)")) == "1.HEADER.FIELDS (A B)"


@pytest.mark.parametrize(
    "spec",
    [
        "0",
        "1.",
        ".1",
        "MIME",
        "HEADER.FIELDS",
        "HEADER.FIELDS ()",
        "FOO",
        "1.01",
        "TEXT.1",
        "HEADER (A)",
        "1.MIME.1",
        "\u00b2",
        "1..2",
        "HEADER.FIELDS (A",
    ],
)
def test_parse_section_rejects_bad_syntax(spec):
    with pytest.raises(SectionSyntaxError):
        parse_section(spec)
