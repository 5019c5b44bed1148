"""Authentication-Results formatting and reading (RFC 8601), and the header-block scanner."""

from __future__ import annotations

import pytest

from postvern.emailauth import results
from postvern.emailauth.headers import parse_header_block


def test_comments_and_values_cannot_break_out() -> None:
    assert results.comment("a (b) \\c\r\nX-Evil: 1") == "(a \\(b\\) \\\\c??X-Evil: 1)"
    assert results.value("rsa-sha256") == "rsa-sha256"
    assert results.value('x"y') == '"x\\"y"'
    assert results.value("ab/c=") == '"ab/c="'
    assert results.value("") == '""'
    assert results.address_value("first.last@Example.TEST") == "first.last@example.test"
    assert results.address_value('"odd local"@example.test') == "@example.test"
    assert results.domain_value("bücher.test") == "xn--bcher-kva.test"


def test_field_is_folded_within_78_characters() -> None:
    long_note = "word " * 60
    field = results.format_field("mx.example.org", ["spf=pass " + results.comment(long_note)])
    lines = field.split(b"\r\n")
    assert lines[0] == b"Authentication-Results: mx.example.org;"
    assert lines[-1] == b"" and all(len(line) <= 78 for line in lines)
    assert results.format_field("mx.example.org", []) == (
        b"Authentication-Results: mx.example.org;\r\n\tnone\r\n"
    )


@pytest.mark.parametrize(
    ("text", "authserv"),
    [
        (" mx.example.org; spf=pass", "mx.example.org"),
        ("mx.example.org 1; none", "mx.example.org"),
        (" (comment (nested)) mx.example.org;", "mx.example.org"),
        (' "quoted\\"id"; spf=pass', 'quoted"id'),
        ("   ", None),
    ],
)
def test_authserv_id(text: str, authserv: str | None) -> None:
    assert results.authserv_id_of(text) == authserv


def test_split_resinfos_keeps_semicolons_in_quotes_and_comments() -> None:
    authserv, resinfos = results.split_resinfos(
        ' mx.example.org;\r\n\tspf=pass (a; b) smtp.mailfrom=a@b.test;  dkim=fail reason="x; y"'
        " header.d=b.test; none"
    )
    assert authserv == "mx.example.org"
    assert resinfos == [
        "spf=pass (a; b) smtp.mailfrom=a@b.test",
        'dkim=fail reason="x; y" header.d=b.test',
    ]


def test_remove_claiming_is_byte_exact() -> None:
    message = (
        b"Received: from a\r\n\tby b\r\n"
        b"Authentication-Results: mx.example.org; spf=pass\r\n"
        b"authentication-results: MX.EXAMPLE.ORG;\r\n dkim=pass\r\n"
        b"Authentication-Results: ; garbage\r\n"
        b"Authentication-Results: elsewhere.example; spf=fail\r\n"
        b"ARC-Authentication-Results: i=1; mx.example.org; spf=pass\r\n"
        b"Subject: x\r\n"
        b"\r\n"
        b"Authentication-Results: mx.example.org; in the body, untouched\r\n"
    )
    cleaned = results.remove_claiming(message, "mx.example.org")
    assert cleaned == (
        b"Received: from a\r\n\tby b\r\n"
        b"Authentication-Results: elsewhere.example; spf=fail\r\n"
        b"ARC-Authentication-Results: i=1; mx.example.org; spf=pass\r\n"
        b"Subject: x\r\n"
        b"\r\n"
        b"Authentication-Results: mx.example.org; in the body, untouched\r\n"
    )


def test_header_block_scanner() -> None:
    message = b"From x@y Mon Jan 1\nA: 1\n  folded\nbad line\nB:2\n\nbody: not a field\n"
    block = parse_header_block(message)
    assert [(f.name, f.unfolded) for f in block.fields] == [("A", b"1  folded"), ("B", b"2")]
    assert block.malformed and message[block.body_start :] == b"body: not a field\n"
    assert parse_header_block(b"").fields == []
    many = b"X: 1\r\n" * 3000 + b"\r\n"
    assert len(parse_header_block(many).fields) == 2000
