"""Header and structure rules: each fires on the form it names and not on ordinary mail."""

from __future__ import annotations

import base64

from postvern.filters.content import read_content
from postvern.filters.headers import POINTS, check_headers, parse_date

RECEIVED = (
    "Received: from mail.example.org (mail.example.org [192.0.2.25])\r\n"
    "\tby mx.example.net with ESMTPS id abc; Mon, 7 Dec 2026 10:00:05 +0000\r\n"
)


def message(
    *,
    received: str = RECEIVED,
    date: str | None = "Mon, 7 Dec 2026 10:00:00 +0000",
    message_id: str | None = "<abc.123@example.org>",
    extra: str = "",
    body: str = "Hello Alice,\r\n\r\nthe minutes of Monday's meeting are below.\r\n",
    content_type: str = "text/plain; charset=utf-8",
) -> bytes:
    head = received + "From: Bob <bob@example.org>\r\nTo: alice@example.net\r\n"
    head += "Subject: minutes\r\n"
    if date is not None:
        head += f"Date: {date}\r\n"
    if message_id is not None:
        head += f"Message-ID: {message_id}\r\n"
    head += f"MIME-Version: 1.0\r\nContent-Type: {content_type}\r\n{extra}"
    return (head + "\r\n" + body).encode()


def codes(raw: bytes) -> set[str]:
    return {h.code for h in check_headers(read_content(raw))}


def test_ordinary_mail_matches_no_rule() -> None:
    assert codes(message()) == set()


def test_every_rule_has_points_below_the_junk_score() -> None:
    assert all(0 < p < 5.0 for p in POINTS.values())


def test_duplicated_fields() -> None:
    raw = message(extra="From: Mallory <m@example.com>\r\n")
    assert "HDR_DUPLICATE" in codes(raw)


def test_dates() -> None:
    assert "HDR_DATE_FUTURE" in codes(message(date="Fri, 11 Dec 2026 10:00:00 +0000"))
    assert "HDR_DATE_PAST" in codes(message(date="Mon, 23 Nov 2026 10:00:00 +0000"))
    assert "HDR_DATE_MALFORMED" in codes(message(date="yesterday"))
    assert "HDR_DATE_MISSING" in codes(message(date=None))
    # time zones and a few hours of clock skew are not a rule
    assert codes(message(date="Mon, 7 Dec 2026 02:00:00 -0800")) == set()
    assert parse_date("Mon, 7 Dec 2026 10:00:00") is not None  # no zone: read as UTC


def test_message_id_shapes() -> None:
    assert "HDR_MSGID_MISSING" in codes(message(message_id=None))
    assert "HDR_MSGID_MALFORMED" in codes(message(message_id="1234567"))
    assert "HDR_MSGID_MALFORMED" in codes(message(message_id="<no-at-sign>"))


def test_rules_that_need_a_trace_skip_mail_without_one() -> None:
    # a news post or an archived message: no Received chain, no obligation
    assert codes(message(received="", date=None, message_id=None)) == set()


def test_received_chain() -> None:
    forged = RECEIVED + (
        "Received: from relay.example.org (relay.example.org [192.0.2.9])\r\n"
        "\tby mail.example.org; Wed, 9 Dec 2026 10:00:00 +0000\r\n"
    )
    assert "RCVD_TIME_DISORDER" in codes(message(received=forged))
    dynamic = (
        "Received: from pc17 (adsl-81-2-69-7.dyn.example.com [81.2.69.7])\r\n"
        "\tby mx.example.net with SMTP id x; Mon, 7 Dec 2026 10:00:05 +0000\r\n"
    )
    assert {"RCVD_DYNAMIC_CLIENT", "RCVD_HELO_NOT_FQDN"} <= codes(message(received=dynamic))
    unknown = dynamic.replace("adsl-81-2-69-7.dyn.example.com", "unknown")
    assert "RCVD_NO_RDNS" in codes(message(received=unknown))
    # (a public address: documentation ranges count as private)
    # hops inside the receiving network (private addresses) are not judged
    internal = dynamic.replace("81.2.69.7", "10.1.2.3")
    assert codes(message(received=internal)) == set()


def test_html_only_and_image_only() -> None:
    html = "<html><body><p>Great news! <a href='https://x.example'>Open</a></p></body></html>"
    assert "MIME_HTML_ONLY_SHORT" in codes(message(body=html, content_type="text/html"))
    image = "<html><body><img src='https://x.example/offer.png'></body></html>"
    assert "MIME_IMAGE_ONLY" in codes(message(body=image, content_type="text/html"))


def test_ascii_text_in_base64() -> None:
    body = base64.b64encode(b"Plain words that needed no encoding at all.\n").decode()
    raw = message(body=body, extra="Content-Transfer-Encoding: base64\r\n")
    assert "MIME_BASE64_TEXT" in codes(raw)
    accented = base64.b64encode("Grüße aus Köln\n".encode()).decode()
    raw = message(body=accented, extra="Content-Transfer-Encoding: base64\r\n")
    assert "MIME_BASE64_TEXT" not in codes(raw)


def test_bulk_mail_without_list_unsubscribe() -> None:
    body = "This week's offers are below.\r\n\r\nTo unsubscribe, click here.\r\n"
    assert "BULK_NO_LIST_UNSUB" in codes(message(body=body))
    with_field = message(body=body, extra="List-Unsubscribe: <https://x.example/u>\r\n")
    assert "BULK_NO_LIST_UNSUB" not in codes(with_field)
    # a list older than RFC 2369 marks itself Precedence: bulk: not counted
    assert "BULK_NO_LIST_UNSUB" not in codes(message(extra="Precedence: bulk\r\n"))


def test_content_only_text_is_not_judged() -> None:
    assert check_headers(read_content(b"Subject: hi\n\nno header to judge")) == []


def test_undisclosed_recipients_and_mime_without_version() -> None:
    raw = message().replace(b"To: alice@example.net", b"To: undisclosed-recipients:;")
    assert "HDR_TO_UNDISCLOSED" in codes(raw)
    assert "MIME_NO_VERSION" in codes(message().replace(b"MIME-Version: 1.0\r\n", b""))
