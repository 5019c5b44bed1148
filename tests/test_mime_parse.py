"""describe(): BODYSTRUCTURE and ENVELOPE semantics on small crafted messages."""

from __future__ import annotations

from postvern.mime import describe
from postvern.mime.model import Address, body_from_json, body_to_json
from postvern.mime.parse import MAX_DEPTH, MAX_PARTS, parse_message


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


def test_plain_message_defaults_to_text_plain_us_ascii():
    raw = crlf("Subject: hi\n\nline one\nline two\n")
    env, body = describe(raw)
    assert (body.type, body.subtype) == ("TEXT", "PLAIN")
    assert body.params == [("charset", "us-ascii")]
    assert body.encoding == "7BIT"
    assert body.size == len(b"line one\r\nline two\r\n") == body.end - body.body_start
    assert body.lines == 2
    assert raw[body.header_start : body.body_start] == crlf("Subject: hi\n\n")
    assert env.subject == "hi"


def test_text_without_charset_gets_us_ascii_appended_like_dovecot():
    _, body = describe(crlf("Content-Type: text/plain; format=flowed\n\nx\n"))
    assert body.params == [("format", "flowed"), ("charset", "us-ascii")]
    _, body = describe(crlf("Content-Type: image/png\n\nx\n"))
    assert body.params == []


def test_invalid_content_type_is_text_plain_rfc2045():
    _, body = describe(crlf("Content-Type: garbage; charset=utf-8\n\nx\n"))
    assert (body.type, body.subtype) == ("TEXT", "PLAIN")
    assert body.params == [("charset", "utf-8")]


def test_multipart_offsets_and_delimiter_line_breaks():
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=b\n\npreamble\n--b\n"
        "Content-Type: text/html\n\n<p>x</p>\n--b\n\nplain\n--b--\nepilogue\n"
    )
    _, body = describe(raw)
    assert body.type == "MULTIPART" and body.subtype == "MIXED"
    html, plain = body.parts
    # RFC 2046 §5.1.1: the line break before a delimiter belongs to the delimiter.
    assert raw[html.body_start : html.end] == b"<p>x</p>"
    assert raw[plain.body_start : plain.end] == b"plain"
    assert raw[html.header_start : html.body_start] == crlf("Content-Type: text/html\n\n")
    assert (html.size, html.lines) == (8, 0)
    assert body.end == len(raw)  # the epilogue is part of the multipart body


def test_nested_multipart_ends_at_outer_boundary():
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=x\n\n--x\n"
        "Content-Type: multipart/alternative; boundary=xy\n\n--xy\n\na\n--xy\n\nb\n"
        "--x\n\nc\n--x--\n"
    )
    _, body = describe(raw)
    alt, c = body.parts
    assert [raw[p.body_start : p.end] for p in alt.parts] == [b"a", b"b"]
    assert raw[c.body_start : c.end] == b"c"


def test_boundary_prefix_match_prefers_longest():
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=a\n\n--a\n"
        "Content-Type: multipart/mixed; boundary=ab\n\n--ab\n\ninner\n--ab--\n--a--\n"
    )
    _, body = describe(raw)
    (inner,) = body.parts
    assert raw[inner.parts[0].body_start : inner.parts[0].end] == b"inner"


def test_multipart_without_parts_gets_one_empty_text_part():
    for text in (
        "Content-Type: multipart/mixed\n\nbody\n",
        "Content-Type: multipart/mixed; boundary=z\n\nx\n",
    ):
        _, body = describe(crlf(text))
        (only,) = body.parts
        assert (only.type, only.subtype, only.size, only.lines) == ("TEXT", "PLAIN", 0, 0)


def test_delimiter_inside_part_header_ends_the_part():
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=x\n\n"
        "--x\nContent-Type: text/html\n--x\n\nhi\n--x--\n"
    )
    _, body = describe(raw)
    first, second = body.parts
    assert first.subtype == "HTML" and first.size == 0
    assert raw[second.body_start : second.end] == b"hi"


def test_digest_children_default_to_message_rfc822():
    raw = crlf(
        "Content-Type: multipart/digest; boundary=d\n\n--d\n\nSubject: one\n\nx\n"
        "--d\nContent-Type: text/plain\n\ny\n--d--\n"
    )
    _, body = describe(raw)
    msg, text = body.parts
    assert (msg.type, msg.subtype, msg.params) == ("MESSAGE", "RFC822", [])
    assert msg.message_envelope is not None and msg.message_envelope.subject == "one"
    assert msg.lines == 2 and msg.message_body is not None
    assert (text.type, text.subtype) == ("TEXT", "PLAIN")


def test_message_rfc822_nesting_and_offsets():
    inner = "Subject: inner\nContent-Type: multipart/mixed; boundary=i\n\n--i\n\nin\n--i--\n"
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=o\n\n--o\nContent-Type: message/rfc822\n\n"
        + inner
        + "--o--\n"
    )
    _, body = describe(raw)
    (msg,) = body.parts
    assert msg.is_message and msg.message_body is not None
    assert msg.message_body.header_start == msg.body_start
    assert msg.message_body.end == msg.end
    assert msg.message_envelope is not None and msg.message_envelope.subject == "inner"
    assert msg.lines == raw.count(b"\n", msg.body_start, msg.end)
    inner_text = msg.message_body.parts[0]
    assert raw[inner_text.body_start : inner_text.end] == b"in"


def test_message_global_is_encapsulated_rfc9051():
    _, body = describe(crlf("Content-Type: message/global\n\nSubject: g\n\nx\n"))
    assert body.message_envelope is not None and body.message_envelope.subject == "g"


def test_encoded_message_rfc822_is_opaque_with_empty_envelope():
    raw = crlf(
        "Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\nU3ViamVjdDogaW4K\n"
    )
    _, body = describe(raw)
    assert body.message_envelope is not None and body.message_envelope.subject is None
    assert body.message_body is not None and body.message_body.size == 0
    assert body.size == len(b"U3ViamVjdDogaW4K\r\n")


def test_rfc2231_continuations_presented_like_dovecot():
    raw = crlf(
        'Content-Type: application/pdf; name*0="a b"; name*1=c;\n'
        " title*=us-ascii'en'%41%20b; x*0*=utf-8''%C3%A9; x*1=z\n\nx\n"
    )
    _, body = describe(raw)
    assert body.params == [
        ("name", "a bc"),
        ("title*", "us-ascii'en'%41%20b"),
        ("x*", "utf-8''%C3%A9z"),
    ]


def test_params_quoting_case_and_broken_pieces():
    _, body = describe(
        crlf('Content-Type: text/plain; CHARSET="UTF-8"; Name="Q\\"x"; a=; foo\n\nx\n')
    )
    assert body.params == [("CHARSET", "UTF-8"), ("Name", 'Q"x'), ("a", "")]


def test_disposition_language_location_id_description_md5():
    raw = crlf(
        'MIME-Version: 1.0\nContent-Disposition: attachment; filename="a.txt"\n'
        "Content-Language: en, de\nContent-Location: http://x/y\nContent-ID: <id@x>\n"
        "Content-Description: =?utf-8?q?d?=\nContent-MD5: abc\n\nhi\n"
    )
    _, body = describe(raw)
    assert body.disposition == ("ATTACHMENT", [("filename", "a.txt")])
    assert body.language == ["en", "de"]
    assert body.location == "http://x/y"
    assert body.id == "<id@x>"
    assert body.description == "=?utf-8?q?d?="  # IMAP returns it undecoded
    assert body.md5 == "abc"


def test_non_mime_message_ignores_content_fields_like_dovecot():
    _, body = describe(crlf("Content-Transfer-Encoding: base64\nContent-ID: <x>\n\naGk=\n"))
    assert body.encoding == "7BIT" and body.id is None
    _, body = describe(crlf("MIME-Version: 1.0\nContent-Transfer-Encoding: base64\n\naGk=\n"))
    assert body.encoding == "BASE64"


def test_envelope_fields_groups_and_defaults():
    raw = crlf(
        "Date: Mon, 1 Jan 2001 00:00:00 +0000\nSubject: =?utf-8?q?caf=C3=A9?=\n"
        'From: "Joe Q. Public" <joe@example.com>\nTo: Friends: a@x, "b c"@y (Bee);, d@z\n'
        "Cc: undisclosed-recipients:;\nMessage-ID: <m@x>\nIn-Reply-To: <p@x>\n\nbody\n"
    )
    env, _ = describe(raw)
    assert env.date == "Mon, 1 Jan 2001 00:00:00 +0000"
    assert env.subject == "=?utf-8?q?caf=C3=A9?="
    joe = Address("Joe Q. Public", None, "joe", "example.com")
    assert env.from_ == [joe] and env.sender == [joe] and env.reply_to == [joe]
    assert env.to == [
        Address(None, None, "Friends", None),
        Address(None, None, "a", "x"),
        Address("Bee", None, "b c", "y"),
        Address(None, None, None, None),
        Address(None, None, "d", "z"),
    ]
    assert env.cc == [
        Address(None, None, "undisclosed-recipients", None),
        Address(None, None, None, None),
    ]
    assert env.bcc == []
    assert (env.message_id, env.in_reply_to) == ("<m@x>", "<p@x>")


def test_envelope_broken_addresses_keep_placeholders():
    env, _ = describe(crlf("From: foo\nTo: Jane <jane at example.com>\nCc: <>\n\nx\n"))
    assert env.from_ == [Address(None, None, "foo", "MISSING_DOMAIN")]
    assert env.to == [Address("Jane", None, "jane", "SYNTAX_ERROR")]
    assert env.cc == [Address(None, None, "MISSING_MAILBOX", "MISSING_DOMAIN")]


def test_envelope_unfolds_and_keeps_utf8_headers_rfc6532():
    env, _ = describe(crlf("Subject: caf\u00e9\n  au lait\nFrom: J\u00e9 <j@\u00e9.fr>\n\nx\n"))
    assert env.subject == "caf\u00e9  au lait"
    assert env.from_ == [Address("J\u00e9", None, "j", "\u00e9.fr")]


def test_bare_lf_message():
    raw = (
        b"Subject: lf\nContent-Type: multipart/mixed; boundary=q\n\n--q\n\none\n--q\n\ntwo\n--q--\n"
    )
    env, body = describe(raw)
    assert env.subject == "lf"
    assert [raw[p.body_start : p.end] for p in body.parts] == [b"one", b"two"]
    assert body.parts[0].lines == 0
    assert body.parts[0].header_start == raw.index(b"--q\n") + 4


def test_missing_header_and_truncation():
    _, body = describe(b"no header at all, and no end of line")
    assert body.body_start == body.end == len(b"no header at all, and no end of line")
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=t\n\n--t\nContent-Type: text/plain\n\ntrunc"
    )
    _, body = describe(raw)
    assert raw[body.parts[0].body_start : body.parts[0].end] == b"trunc"


def test_depth_limit_makes_opaque_leaf():
    depth = MAX_DEPTH + 20
    raw = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%03d\r\n\r\n--b%03d\r\n" % (i, i)
        for i in range(depth)
    )
    raw += b"\r\nleaf\r\n"
    _, body = parse_message(raw)
    level, node = 0, body
    while node.is_multipart:
        node = node.parts[0]
        level += 1
    assert level == MAX_DEPTH
    assert (node.type, node.subtype) == ("APPLICATION", "OCTET-STREAM")


def test_parts_limit_bounds_the_tree():
    raw = b"Content-Type: multipart/mixed; boundary=p\r\n\r\n" + b"--p\r\n\r\nx\r\n" * (
        MAX_PARTS + 50
    )
    _, body = parse_message(raw)
    assert len(body.parts) < MAX_PARTS
    assert body.end == len(raw)


def test_json_round_trip():
    raw = crlf(
        "From: a@b\nContent-Type: multipart/mixed; boundary=o\n\n"
        "--o\nContent-Type: message/rfc822\n"
        "Content-Disposition: inline; filename=x\n\nSubject: s\nTo: g: a@b;\n\nbody\n--o--\n"
    )
    _, body = describe(raw)
    assert body_from_json(body_to_json(body)) == body


def test_empty_part_header_sharing_the_delimiter_line_break():
    # The "\n" after "--b" line both ends the empty part header and precedes "--b--".
    raw = b"Content-Type: multipart/mixed; boundary=b\n\n--b\n\n--b--\n"
    _, body = parse_message(raw)
    (part,) = body.parts
    assert part.size == 0
    assert part.end <= body.end


def test_delimiter_cutting_a_header_keeps_children_inside_parent():
    raw = crlf(
        "Content-Type: multipart/mixed; boundary=o\n\n--o\n"
        "Content-Type: multipart/mixed; boundary=i\n\n--i\nand\n--o\n\nx\n--o--\n"
    )
    _, body = parse_message(raw)
    inner = body.parts[0]
    assert inner.parts[0].end <= inner.end <= body.parts[1].header_start
