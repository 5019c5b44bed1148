"""Body and URI rules (postvern.filters.body): a second reading of the words, by hand-written
patterns, that agrees with the content model or another family and never junks alone."""

from __future__ import annotations

import pytest

from postvern.filters import Analysis, FilterSettings, ScanContext, analyse, decide
from postvern.filters.body import POINTS, check_body
from postvern.filters.content import read_content
from postvern.filters.families import FAMILY_MAX_POINTS, family_of
from postvern.filters.spam import MODEL_POINTS_FULL
from postvern.filters.verdict import Hit


def mail(
    subject: str, body: str, *, sender: str = "Bob <bob@example.org>", extra: str = ""
) -> bytes:
    return (
        f"From: {sender}\r\nTo: alice@example.net\r\nSubject: {subject}\r\n{extra}"
        "Date: Mon, 7 Dec 2026 10:00:00 +0000\r\nMessage-ID: <b.1@example.org>\r\n\r\n"
        f"{body}\r\n"
    ).encode()


def codes(raw: bytes) -> set[str]:
    return {h.code for h in check_body(read_content(raw))}


SPAM = {
    "BODY_DRUGS_SALE": ("cheap meds", "Buy Viagra and Cialis online, no prescription needed."),
    "BODY_OBFUSCATED_WORD": ("hi", "get v1@gra today, and c.i.a.l.i.s too"),
    "BODY_ADVANCE_FEE": (
        "business proposal",
        "I am the widow of the late minister. The sum of US$ 25 million awaits transfer of "
        "the funds with a foreign partner; you will be the beneficiary as next of kin.",
    ),
    "BODY_ADULT": ("lonely", "Horny wives in your town want discreet encounters tonight."),
    "BODY_REPLICA_OEM": ("watches", "Swiss replica watches: a Rolex for $99, you save 90%."),
    "BODY_STOCK_TIP": (
        "alert",
        "Stock alert! Trading symbol ABCD, target price $4, strong buy before it explodes.",
    ),
    "BODY_REMOVE_ME": ("offer", "Great offer inside.\n\nTo be removed from this list reply."),
    "BODY_MISSPELT": ("night", "ciaiis has advantaqes over other piils, every one."),
    "BODY_PUNCTUATION_RUN": ("WOW", "You won't believe this!!! Amazing stuff."),
    "BODY_DISCOUNT_SUBJECT": ("Hey Bob, 80% off everything", "Shop now."),
    "BODY_BROKEN_WORDS": ("L etzte B enachrichtigung zu Ihrem P aket", "Bitte klicken."),
    "BODY_CRYPTO_LURE": ("airdrop", "Claim your free tokens now: connect your wallet."),
    "BODY_PRIZE": ("You won", "Congratulations! Claim your prize before Friday."),
    "BODY_PARCEL_FEE": ("Colis", "Votre colis est bloqué : frais de douane de 1,99 EUR."),
    "BODY_ACCOUNT_THREAT": (
        "Security notice",
        "Your account has been suspended after unusual activity. Verify your identity "
        "within 24 hours.",
    ),
}


@pytest.mark.parametrize("code", sorted(SPAM))
def test_each_rule_matches_its_spam(code: str) -> None:
    subject, body = SPAM[code]
    assert code in codes(mail(subject, body))


def test_personal_and_discussion_mail_match_no_rule() -> None:
    notes = [
        mail("hi there", "hi there"),
        mail("Lunch", "Are we still on for lunch at Ivan's on Friday? I can pick you up at 12."),
        mail(
            "Re: lm() with weights",
            "> Why does lm() ignore my weights?\n\nIt does not; the weights must be a column "
            "of the data frame, not a separate vector. See ?lm for the details.\n\nBest,\nJo",
        ),
        mail("Budget", "The project cost $35 million in 2001 and $618 million by 2005."),
        mail("Doctor", "My doctor prescribed valium for a week after the operation."),
    ]
    for raw in notes:
        assert codes(raw) == set(), raw


def test_a_word_split_once_is_two_words_not_a_disguise() -> None:
    assert "BODY_OBFUSCATED_WORD" not in codes(mail("x", "We met at ivan's place."))
    assert "BODY_OBFUSCATED_WORD" in codes(mail("x", "We sell at:ivan and v-i-a-g-r-a."))


def test_mail_that_declares_itself_bulk_is_not_judged_on_its_manner() -> None:
    body = "Big sale!!! Click here, act now, limited time, risk free."
    assert {"BODY_PUNCTUATION_RUN", "BODY_SELLING_PHRASES"} <= codes(mail("Sale", body))
    declared = "List-Unsubscribe: <https://shop.example/unsub?u=1>\r\n"
    assert codes(mail("Sale", body, extra=declared)) == set()
    # ... but illicit goods are judged in any mail
    drugs = "Buy Viagra online, no prescription."
    assert "BODY_DRUGS_SALE" in codes(mail("Sale", drugs, extra=declared))


def test_the_display_name_is_read_too() -> None:
    raw = mail("x", "Order today: 60 pills $99.", sender='"BestViagra Shop" <s@shop.example>')
    assert "BODY_DRUGS_SALE" in codes(raw)
    # a sender named after the drug sells it, whatever the text says
    raw = mail("Hey, 80% off", "Read more.", sender='"Real Viagra USA" <s@shop.example>')
    assert "BODY_DRUGS_SALE" in codes(raw)


def test_uri_rules() -> None:
    raw = mail("x", "See http://a.b.c.d.e.example.top/x?go=https%3A%2F%2Felsewhere.example%2F")
    assert {"URI_SUSPICIOUS_TLD", "URI_RANDOM_HOST", "URI_NESTED_URL"} <= codes(raw)


def test_the_body_family_is_capped_and_agrees_with_the_model() -> None:
    assert all(family_of(code) in ("body", "links") for code in POINTS)
    settings = FilterSettings()
    everything = [Hit(code, points) for code, points in POINTS.items() if code.startswith("BODY_")]
    alone = decide(Analysis(hits=everything), settings)
    assert alone.action == "inbox" and alone.score == FAMILY_MAX_POINTS
    # the model's full voice and one clear body rule junk together
    agreed = decide(
        Analysis(hits=[Hit("SPAM_MODEL", MODEL_POINTS_FULL), Hit("BODY_REMOVE_ME", 1.0)]),
        settings,
    )
    assert agreed.action == "junk"


def test_spam_with_a_second_voice_is_junked_whole() -> None:
    raw = mail(
        "Cheap meds, no prescription!!!",
        "Dear friend, our online pharmacy sells Viagra, Cialis and Valium without a prior "
        "prescription. 60 pills $99.99, 90 pills $129.99. Discreet shipping worldwide. "
        "Order now, limited time, risk free!\n\nTo be removed from our list reply remove.",
    )
    verdict = decide(analyse(raw, ScanContext(macro_checker=None)), FilterSettings())
    assert verdict.action == "junk"
    assert any(r.startswith("BODY_") for r in verdict.reasons)


def test_a_callback_lure_names_a_brand_a_charge_and_a_number() -> None:
    from postvern.filters.phishing import PhishingContext, check_phishing

    text = (
        "Your Norton LifeLock subscription renewal of USD 364.88 has been processed. If you "
        "did not authorize this charge, call 1 864 349-9580 to cancel."
    )
    lure = read_content(mail("Your renewal", text, sender="Jodie <jp@cfecgcft.example>"))
    assert "PHISH_CALLBACK" in {h.code for h in check_phishing(lure, PhishingContext())}
    # the brand's own mail, and a friend's order with a number, are not lures
    own = read_content(mail("Your renewal", text, sender="Norton <billing@norton.com>"))
    assert "PHISH_CALLBACK" not in {h.code for h in check_phishing(own, PhishingContext())}
    note = read_content(mail("Apple", "I ordered the Apple charger; call me at 617 555-0100."))
    assert "PHISH_CALLBACK" not in {h.code for h in check_phishing(note, PhishingContext())}
