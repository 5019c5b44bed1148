"""Text for search and filters: decoded headers, body text, leaves; charset decoding."""

from __future__ import annotations

import base64

from postvern.mime import body_text, describe, header_values, headers_text, iter_leaves
from postvern.mime.charset import decode
from postvern.mime.encoded_words import decode_header_value
from postvern.mime.params import parse_media_type
from postvern.mime.text import filename


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


def test_encoded_words_rfc2047():
    assert (
        decode_header_value(b"=?ISO-8859-1?Q?Keld_J=F8rn_Simonsen?=") == "Keld J\u00f8rn Simonsen"
    )
    # RFC 2047 §6.2: whitespace between adjacent encoded words is dropped.
    assert decode_header_value(b"=?utf-8?B?w6k=?=  =?utf-8?B?w6k=?= x") == "\u00e9\u00e9 x"
    # A character split across two words is joined before decoding.
    assert decode_header_value(b"=?utf-8?B?4oI=?= =?utf-8?B?rA==?=") == "\u20ac"
    assert decode_header_value(b"=?utf-8*en?q?a?=") == "a"  # RFC 2231 §5 language
    assert decode_header_value(b"=?bogus-charset?q?ok?=") == "ok"
    assert decode_header_value(b"raw caf\xc3\xa9") == "raw caf\u00e9"  # RFC 6532


def test_charset_decoding_never_raises():
    assert decode(b"\xe9t\xe9", "iso-8859-1") == "\u00e9t\u00e9"
    assert decode(b"\xe9t\xe9", "no-such-charset") == "\u00e9t\u00e9"  # guessed windows-1252
    assert decode(b"caf\xc3\xa9", None) == "caf\u00e9"
    assert decode(b"x", "rot13") == "x"  # not a text encoding: never applied
    assert decode(b"\xff\xfe", "utf-8") == "\ufffd\ufffd"
    assert decode(b"x", "a\x00b") == "x"
    assert decode(b"\x1b$B$3$s$K$A$O\x1b(B", "iso-2022-jp") == "\u3053\u3093\u306b\u3061\u306f"


def test_headers_text_and_values():
    raw = crlf("Subject: =?utf-8?q?h=C3=A9llo?=\nX-A: 1\nX-A: 2\n folded\n\nbody\nX-A: 3\n")
    text = headers_text(raw)
    assert "Subject: h\u00e9llo" in text and "body" not in text
    assert header_values(raw, "x-a") == ["1", "2 folded"]
    assert header_values(raw, "missing") == []


def test_body_text_prefers_plain_and_skips_attachments():
    html = base64.b64encode(
        "<html><style>p{}</style><p>caf\u00e9 &amp; co</p></html>".encode()
    ).decode()
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=m\n\n--m\n"
        "Content-Type: multipart/alternative; boundary=a\n\n--a\n"
        "Content-Type: text/plain; charset=iso-8859-1\n"
        "Content-Transfer-Encoding: quoted-printable\n\n"
        "caf=E9 plain\n--a\nContent-Type: text/html\n\n<p>html</p>\n--a--\n"
        "--m\nContent-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: base64\n\n"
        + html
        + "\n--m\nContent-Type: text/plain\nContent-Disposition: attachment; filename=a.txt\n\n"
        "attached\n--m--\n"
    )
    _, body = describe(raw)
    text = body_text(raw, body, 10_000)
    assert "caf\u00e9 plain" in text
    assert "caf\u00e9 & co" in text and "p{}" not in text
    assert "attached" not in text
    assert body_text(raw, body, 5) == text[:5]


def test_iter_leaves_decodes_and_names_attachments():
    payload = bytes(range(256)) * 4
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=m\n\n--m\n\nhello\n--m\n"
        'Content-Type: application/octet-stream; name="n.bin"\n'
        "Content-Disposition: attachment; filename*=utf-8''%E2%82%AC.bin\n"
        "Content-Transfer-Encoding: base64\n\n"
        + base64.encodebytes(payload).decode()
        + "--m\nContent-Type: message/rfc822\n\nSubject: in\n\ninner\n--m--\n"
    )
    _, body = describe(raw)
    leaves = list(iter_leaves(raw, body))
    assert [(p.type, name) for p, name, _ in leaves] == [
        ("TEXT", None),
        ("APPLICATION", "\u20ac.bin"),
        ("TEXT", None),
    ]
    assert leaves[1][2] == payload
    assert leaves[2][2] == b"inner"
    small = list(iter_leaves(raw, body, max_decoded=10))
    assert all(len(data) <= 10 for _, _, data in small)


def test_filename_sources():
    def part(ct: bytes):
        from postvern.mime.model import BodyPart

        m = parse_media_type(ct)
        return BodyPart(m.type or "TEXT", m.subtype or "PLAIN", m.params)

    assert filename(part(b'application/pdf; name="=?utf-8?q?r=C3=A9sum=C3=A9.pdf?="')) == (
        "r\u00e9sum\u00e9.pdf"
    )
    assert filename(part(b"application/pdf; name*0*=utf-8''a%20; name*1=b.pdf")) == "a b.pdf"
    assert filename(part(b"application/pdf")) is None
