"""The spam model, the user's learning and reputation, the verdict, and robustness."""

from __future__ import annotations

import sys
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postvern.emailauth import AuthVerdict, results
from postvern.emailauth.arc import Result as ARCResult
from postvern.emailauth.arc import Status as ARCStatus
from postvern.emailauth.dkim import Result as DKIMResult
from postvern.emailauth.dkim import Status as DKIMStatus
from postvern.emailauth.dmarc import Result as DMARCResult
from postvern.emailauth.dmarc import Status as DMARCStatus
from postvern.emailauth.results import dkim_resinfo
from postvern.emailauth.spf import Result as SPFResult
from postvern.emailauth.spf import Status as SPFStatus
from postvern.filters import (
    AuthSummary,
    ScanContext,
    SenderIdentity,
    UserModel,
    UserModelError,
    analyse,
    decide,
    identity_from_message,
    scan,
)
from postvern.filters.content import read_content
from postvern.filters.extract import codec_name
from postvern.filters.features import MAX_TOKENS, language_of, spam_features, tokens
from postvern.filters.spam import (
    MAX_USER_TOKENS,
    MIN_EVIDENCE_FEATURES,
    MODEL_POINTS_FULL,
    USER_FULL_VOICE_MARKS,
    USER_MAX_LOGIT,
    shipped_model,
    user_tokens,
    weigh_evidence,
)
from postvern.filters.verdict import FOLD_AT

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import train_spam

CORPORA = train_spam.DEFAULT_CORPORA


@pytest.fixture(scope="module")
def held_out() -> list[train_spam.Sample]:
    """The evaluation part of the corpora: never seen by the shipped model."""
    return [s for s in train_spam.load_corpora(CORPORA) if s.part == "eval"]


def model_points(raw: bytes, ctx: ScanContext | None = None) -> float:
    analysis = analyse(raw, ctx or ScanContext(macro_checker=None))
    return sum(h.points for h in analysis.hits if h.code in ("SPAM_MODEL", "USER_LEARNED"))


def newsletter(body: str, sender: str = "Deals <deals@offers.example>") -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "bob@example.test"
    msg["Subject"] = "This week at the garden centre"
    msg.set_content(body)
    return msg.as_bytes()


GARDEN = (
    "Hello Bob,\n\nthe tomato seedlings are back in stock, and the rose pruning workshop is "
    "on Saturday morning at ten. Bring gloves; we provide the secateurs and the tea.\n\n"
    "See you there,\nMargaret from the garden centre\n"
)


def test_model_loads_once() -> None:
    assert shipped_model() is shipped_model()
    assert shipped_model().threshold_logit is not None


def test_model_scores_held_out_ham_and_spam(held_out: list[train_spam.Sample]) -> None:
    for kind, source in (("ham", "enron"), ("ham", "csdmc"), ("spam", "enron"), ("spam", "csdmc")):
        chosen = [s for s in held_out if s.kind == kind and s.source == source][::37][:25]
        # the model leans the right way by half its voice (it never junks alone, and
        # speaks fully only at odds of 4 to 1: postvern.filters.spam)
        as_spam = [model_points(s.raw) >= MODEL_POINTS_FULL / 2 for s in chosen]
        right = sum(as_spam) if kind == "spam" else len(as_spam) - sum(as_spam)
        assert right >= len(chosen) - 2, (kind, source, right, len(chosen))


def test_obvious_ham_and_spam() -> None:
    assert model_points(newsletter(GARDEN)) < MODEL_POINTS_FULL
    spam = newsletter(
        "CHEAP VIAGRA!!! Buy now, 80% off, no prescription needed. Best online pharmacy, "
        "click here http://pills.example.biz/buy to order, satisfaction guaranteed. "
        "To unsubscribe from this mailing list click here.",
    )
    assert model_points(spam) >= MODEL_POINTS_FULL


def test_user_learning_moves_the_score() -> None:
    target = newsletter(GARDEN)
    before = model_points(target)
    user = UserModel()
    for i in range(4):
        user.learn(newsletter(GARDEN.replace("Bob", f"Bob {i}")), is_spam=True)
        user.learn(newsletter(f"Minutes of meeting {i}: budget, hiring, the roadmap."), False)
    ctx = ScanContext(user_model=user, macro_checker=None)
    after = model_points(target, ctx)
    assert after > before + 2.0
    for i in range(4):
        user.unlearn(newsletter(GARDEN.replace("Bob", f"Bob {i}")), is_spam=True)
    assert model_points(target, ScanContext(user_model=user, macro_checker=None)) < after


def test_a_few_ham_marks_cannot_outvote_many_spam_marks() -> None:
    # A user who moved twenty offers to Junk and one note out of it: the note's words, and
    # the common words the offers happen to lack, are not evidence of ham against them.
    user = UserModel()
    offers = [f"Cheap watches number {i}: replica Rolex, order today, discreet delivery."
              for i in range(20)]  # fmt: skip
    for text in offers:
        user.learn(newsletter(text), is_spam=True)
    user.learn(newsletter("Minutes of the meeting: budget, hiring, the roadmap."), False)
    spam = read_content(newsletter("Replica Rolex watches, order today: the best of the year."))
    assert user.token_logit(user_tokens(spam)) > 0
    # the ham side's voice grows with its own marks only
    note = read_content(newsletter("Minutes of the meeting: budget and hiring."))
    assert -user.token_logit(user_tokens(note)) <= USER_MAX_LOGIT * 1 / USER_FULL_VOICE_MARKS


def test_user_model_round_trip_and_corruption() -> None:
    user = UserModel()
    user.learn(newsletter(GARDEN), is_spam=True, sender=SenderIdentity(ip="192.0.2.10"))
    user.learn(newsletter("Quarterly report attached."), is_spam=False)
    data = user.to_bytes()
    again = UserModel.from_bytes(data)
    assert again.to_bytes() == data
    content = read_content(newsletter(GARDEN))
    sender = SenderIdentity(ip="192.0.2.99")
    assert again.evidence(content, sender) == user.evidence(content, sender)
    for bad in (b"", b"garbage", data[:-5], data[:5] + b"\x00" * 20):
        with pytest.raises(UserModelError):
            UserModel.from_bytes(bad)


def test_user_model_is_bounded() -> None:
    user = UserModel()
    words = " ".join(f"w{n:x}qz" for n in range(3000))
    for batch in range(20):
        user.learn(newsletter(words.replace("qz", f"q{batch}z")), is_spam=batch % 2 == 0)
    assert len(user.tokens) <= MAX_USER_TOKENS
    assert len(user.to_bytes()) < 4 * 1024 * 1024


def test_sender_reputation_from_verified_identities() -> None:
    user = UserModel()
    marked = SenderIdentity(dkim_domains=("promo.example",), ip="198.51.100.23")
    for i in range(3):
        user.learn(newsletter(f"Offer {i}"), is_spam=True, sender=marked)
    auth = AuthSummary(dkim="pass", dkim_domains=("promo.example",))
    ctx = ScanContext(user_model=user, auth=auth, client_ip="198.51.100.77", macro_checker=None)
    hits = {h.code: h for h in analyse(newsletter(GARDEN), ctx).hits}
    assert hits["SENDER_REPUTATION"].points > 5  # DKIM domain and the same /24
    # Unverified, the same domain earns nothing: reputation needs authentication.
    ctx = ScanContext(user_model=user, client_ip="203.0.113.5", macro_checker=None)
    assert "SENDER_REPUTATION" not in {h.code for h in analyse(newsletter(GARDEN), ctx).hits}

    friend = SenderIdentity(from_addr="ann@friends.example", from_verified=True)
    for i in range(3):
        user.learn(newsletter(f"Photos {i}", "Ann <ann@friends.example>"), False, sender=friend)
    ctx = ScanContext(user_model=user, auth=AuthSummary(dmarc="pass"), macro_checker=None)
    hits = {h.code: h for h in analyse(newsletter(GARDEN, "Ann <ann@friends.example>"), ctx).hits}
    assert hits["SENDER_REPUTATION"].points < -5


def test_identity_read_back_from_our_authentication_results() -> None:
    field = results.format_field(
        "mx.example.test",
        [
            dkim_resinfo(DKIMResult(DKIMStatus.PASS, domain="promo.example", selector="s1")),
            "spf=pass (sender IP is authorised) smtp.mailfrom=bounce@mail.promo.example",
            "dmarc=pass (p=none dis=none) header.from=promo.example",
            "arc=pass header.oldest-pass=0 smtp.remote-ip=198.51.100.23",
        ],
    )
    forged = b"Authentication-Results: evil.example; dkim=pass header.d=bank.example\r\n"
    raw = field + forged + newsletter(GARDEN, "Promo <news@promo.example>")
    identity = identity_from_message(raw, "mx.example.test")
    assert identity == SenderIdentity(
        from_addr="news@promo.example",
        from_verified=True,
        dkim_domains=("promo.example",),
        spf_domain="mail.promo.example",
        ip="198.51.100.23",
    )
    assert identity_from_message(raw, "other.example") == SenderIdentity(
        from_addr="news@promo.example"
    )


def test_auth_summary_from_the_emailauth_verdict() -> None:
    verdict = AuthVerdict(
        spf=SPFResult(SPFStatus.SOFTFAIL, "mailfrom", "promo.example", "x@promo.example"),
        spf_helo=SPFResult(SPFStatus.NONE, "helo", "mta.example", "postmaster@mta.example"),
        dkim=[
            DKIMResult(DKIMStatus.FAIL, domain="list.example"),
            DKIMResult(DKIMStatus.PASS, domain="Promo.Example"),
        ],
        dmarc=DMARCResult(DMARCStatus.PASS, from_domain="promo.example"),
        arc=ARCResult(ARCStatus.NONE),
        header=b"",
        policy="accept",
        reason="",
    )
    summary = AuthSummary.from_verdict(verdict)
    assert summary == AuthSummary(
        spf="softfail", dkim="pass", dmarc="pass", dkim_domains=("promo.example",)
    )


def test_ipv6_reputation_uses_the_48() -> None:
    keys = dict(SenderIdentity(ip="2001:db8:1234:5678::1").keys())
    assert keys == {"ip48": "2001:db8:1234::/48"}


async def test_scan_and_header_format() -> None:
    verdict = await scan(newsletter(GARDEN), ScanContext())
    assert verdict.action == "inbox"
    value = verdict.header()
    assert value.startswith("no; score=") and "SPAM_MODEL(" in value
    line = verdict.header_line()
    assert line.startswith(b"X-Postvern-Spam: ") and line.endswith(b"\r\n")
    assert all(len(part) <= FOLD_AT for part in line.split(b"\r\n"))


async def test_hostile_text_cannot_break_the_header() -> None:
    raw = newsletter("x", sender='"PayPal\\r\\nBcc: x" <a@evil.example>').replace(
        b"PayPal", "PayPal \u202e\u0000 Support".encode()
    )
    verdict = await scan(raw, ScanContext())
    value = verdict.header()
    assert value.isascii() and "\r" not in value and "\n" not in value


def test_messages_from_the_mime_torture_corpora_never_raise() -> None:
    ctx = ScanContext(macro_checker=None)
    count = 0
    for path in sorted((CORPORA / "mime").rglob("*")):
        if path.is_file() and path.stat().st_size < 2 * 1024 * 1024:
            verdict = decide(analyse(path.read_bytes(), ctx), ctx.settings)
            assert verdict.action in ("inbox", "junk", "reject")
            count += 1
    assert count > 300


def test_language_of_a_feature_set() -> None:
    def language(text: str) -> str:
        raw = b"Subject: -\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text.encode()
        return language_of(spam_features(read_content(raw)))

    assert language(GARDEN) == "en"
    assert language("Hallo Peter, hast du am Freitag Zeit? Ich koche, und Jonas kommt.") == "de"
    assert language("Olá Pedro, você pode trazer o carvão para o churrasco?") == "pt"
    assert language("Привет, Саша! Давай встретимся в пятницу.") == "Cyrillic"
    assert language("안녕하세요 지영씨, 이번 주말에 같이 등산 갈래요?") == "Hangul"
    # Two foreign words in English mail do not make it foreign.
    assert language(GARDEN + "\nP.S. the rosé was très bon.") == "en"


def test_few_known_features_never_reach_the_threshold_alone() -> None:
    threshold = shipped_model().threshold_logit
    for known in range(MIN_EVIDENCE_FEATURES):
        assert weigh_evidence(50.0, known, threshold) < threshold
        assert weigh_evidence(-50.0, known, threshold) > -threshold
    assert weigh_evidence(50.0, MIN_EVIDENCE_FEATURES, threshold) == 50.0
    assert weigh_evidence(50.0, 0, threshold) == 0.0


def test_report_and_charset_reading() -> None:
    returned = newsletter(GARDEN)
    report = (
        b"From: MAILER-DAEMON@mx.example\r\nSubject: Undelivered Mail\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nUser unknown\r\n"
        b"--b\r\nContent-Type: message/delivery-status\r\n\r\nAction: failed\r\n\r\n"
        b"--b\r\nContent-Type: message/rfc822\r\n\r\n" + returned + b"\r\n--b--\r\n"
    )
    content = read_content(report)
    assert content.message.report_type == "delivery-status"
    assert content.judged_subject == "This week at the garden centre"
    assert "User unknown" in content.message.text and "User unknown" not in content.judged_text
    plain = read_content(newsletter(GARDEN))
    assert plain.message.report_type == "" and plain.judged_text == plain.visible_text
    for label, data in (("gb2312", "汉字 碁".encode("gbk")), ("x-sjis", "ｶﾀｶﾅ 髙".encode("cp932"))):
        raw = b"Subject: x\r\nContent-Type: text/plain; charset=" + label.encode() + b"\r\n\r\n"
        assert read_content(raw + data).message.text == data.decode(codec_name(label))


LIST_FOOTER = (
    "\n-- \nTo UNSUBSCRIBE, email to debian-user-REQUEST@lists.debian.org\n"
    'with a subject of "unsubscribe". Trouble? Contact listmaster@lists.debian.org\n'
)
MAILMAN_FOOTER = (  # Mailman's msg_footer, opened by a line of underscores
    "\n _______________________________________________\n"
    "Do not post admin requests to the list. They will be ignored.\n"
    "Gardening mailing list      (Gardening@lists.example.org)\n"
    "Help/Unsubscribe/Update your Subscription:\n"
    "http://lists.example.org/mailman/options/gardening/bob%40example.org\n\n"
    "This email sent to bob@example.org\n"
)
PGP_SIGNED = (
    "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA1\n\n{body}\n"
    "-----BEGIN PGP SIGNATURE-----\nVersion: GnuPG v1.4.10 (GNU/Linux)\n\n"
    "iEYEARECAAYFAkvCm0QACgkQM0LLzLt8MhxVKwCfVZ6x\n=x8Qe\n-----END PGP SIGNATURE-----\n"
)


def test_signatures_and_armor_are_not_read() -> None:
    # RFC 3676 §4.3 signatures (a list's footer) and RFC 4880 §7 armor are the same under
    # every message of a list or a sender: they are not the message's words.
    plain = spam_features(read_content(newsletter(GARDEN)))
    assert spam_features(read_content(newsletter(GARDEN + LIST_FOOTER))) == plain
    assert spam_features(read_content(newsletter(GARDEN + MAILMAN_FOOTER))) == plain
    signed = PGP_SIGNED.format(body=GARDEN)
    assert spam_features(read_content(newsletter(signed + LIST_FOOTER))) == plain
    # Past a signature's size the tail is read: spam cannot hide its text behind "-- ".
    hidden = GARDEN + "\n-- \n" + "Buy cheap pills now at the best online pharmacy.\n" * 20
    assert "pharmacy" in spam_features(read_content(newsletter(hidden)))
    underscored = GARDEN + "\n" + "_" * 47 + "\n" + "Buy cheap pills now at the pharmacy.\n" * 20
    assert "pharmacy" in spam_features(read_content(newsletter(underscored)))


def test_line_endings_and_raw_utf8_headers_are_read_alike() -> None:
    lf = newsletter(GARDEN + LIST_FOOTER)
    crlf = lf.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert spam_features(read_content(crlf)) == spam_features(read_content(lf))
    # RFC 6532 UTF-8 in header fields, beside an RFC 2047 encoded word.
    raw = (
        "From: Jürgen Groß <j@example.de>\r\nSubject: Grüße =?utf-8?q?aus_K=C3=B6ln?=\r\n"
        "Content-Type: text/plain\r\n\r\nhi"
    ).encode()
    message = read_content(raw).message
    assert (message.from_name, message.subject) == ("Jürgen Groß", "Grüße aus Köln")


def test_masked_letters_are_a_fact_and_lost_quotes_are_not() -> None:
    def facts(body: str) -> set[str]:
        return {f for f in spam_features(read_content(newsletter(body))) if f.startswith("h:")}

    masked = "Elim?nate all your d?bt t?day, n? b?nkruptcy, n? c?ns?lid?tion."
    assert "h:masked-letters" in facts(masked)
    # A charset lost in transit turns apostrophes into "?": contractions are not masking,
    # and neither is one stray "?" in a word nor a link's query string.
    lost_quotes = "I don?t know, we?ll see; it?s fine and you?re welcome. I?m off."
    assert "h:masked-letters" not in facts(GARDEN + lost_quotes)
    assert "h:masked-letters" not in facts(GARDEN + "Yes?no. https://a.example/p?id=x&q?r=s")


def test_tokens_of_a_long_text_are_read_across_chunks_whole() -> None:
    """Words are found a chunk at a time; no word is cut where a chunk ends, and reading
    stops at MAX_TOKENS however long the text is."""
    filler = "lorem ipsum dolor " * 2000  # 36,000 characters, several chunks
    text = (
        filler
        + "Ünïcode-mixed w0rd 2024 $ "
        + "x" * 30
        + " 中文中文中文中文中文中文中文中文中文中文中文中文中文"
    )
    tail = tokens(text, limit=10**6)[6000:]
    assert tail[:5] == ["ünïcode", "mixed", "w9rd", "#9999", "$"]
    assert tail[5] == "#long"
    assert tail[6:] == ["中文"] * 13
    # One very long line with no spaces: found as one chunk, still whole.
    assert tokens("ab" * 20_000 + " end", limit=10) == ["#long", "end"]
    assert len(tokens("word " * 100_000)) == MAX_TOKENS


def test_a_quoted_reply_is_a_fact_of_its_own() -> None:
    def features(body: str) -> set[str]:
        msg = EmailMessage()
        msg["From"] = "ann@example.org"
        msg["Subject"] = "Re: the build"
        msg.set_content(body)
        return spam_features(read_content(msg.as_bytes()))

    reply = "On Monday, Bob wrote:\n> the build fails\n> on arm64\n >since Friday\n\nFixed it.\n"
    assert "h:quoted-lines" in features(reply)
    assert "h:quoted-lines" not in features("> one quoted line\n> and two\n\nthanks\n")


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab?s t'²5_\né"), max_size=60))
def test_the_masked_letters_precheck_never_changes_the_answer(text: str) -> None:
    """The cheap look for "?" between letters only skips texts the pattern cannot match."""
    from postvern.filters import features

    masked = features._MASKED_WORD.findall(text, 0, features.MASKED_SCAN_CHARS)
    full = ["h:masked-letters"] if len(masked) >= features.MIN_MASKED_WORDS else []
    assert features._masking_facts(text) == full
