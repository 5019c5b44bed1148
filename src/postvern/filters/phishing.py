"""Phishing rules: what a message claims to be against where it really leads.

Phishing borrows a trusted name (a brand, the recipient's own organisation) and sends the
reader somewhere else. The rules here compare the two: look-alike domains (confusable
skeletons, Unicode TR39), brands named in a display name or a host they do not own, a
From field that DMARC cannot hold to one owner (no domain name, several senders), link text
naming one site while the link opens another, URL tricks and links that hide their
destination, blocklisted hosts, and credential forms in the body or in HTML attachments;
and they note the disguises that work in any language (look-alike letters inside words,
words in mathematical letters, random codes in a subject). Each rule yields a :class:`Hit`.
"""

from __future__ import annotations

import email.utils
import functools
import importlib.resources
import itertools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from postvern.filters.blocklist import Blocklist
from postvern.filters.confusables import is_mixed_script, skeleton
from postvern.filters.content import Content
from postvern.filters.extract import Attachment, Extracted
from postvern.filters.htmlscan import HtmlDoc, scan_html
from postvern.filters.urls import (
    Url,
    collect_urls,
    link_mismatches,
    parse_url,
    registrable_domain,
    shown_domain,
    to_ascii_host,
    to_unicode_host,
)
from postvern.filters.verdict import Hit

BRANDS_RESOURCE = "brands.json"

# Points on the SpamAssassin-like scale (5 = junk). A look-alike domain or a credential
# form sent as a file is phishing on its own; the softer signals need company.
POINTS = {
    "PHISH_HOMOGRAPH": 6.0,  # a domain confusable with a brand's
    "PHISH_OWN_DOMAIN_LOOKALIKE": 6.0,  # ... or with the recipient's own domain
    "PHISH_IDN_MIXED_SCRIPT": 1.5,  # Latin mixed with another script in one label
    "PHISH_BRAND_IN_HOST": 2.5,  # "paypal.com.secure-login.example"
    "PHISH_FROM_BRAND_SPOOF": 4.0,  # "PayPal Support" <x@elsewhere.example>
    "PHISH_FROM_NAME_ADDRESS": 2.5,  # display name is another address than From
    "PHISH_FROM_NOT_A_DOMAIN": 3.0,  # "Correios <avisos@correios>": no domain to verify
    "PHISH_FROM_SEVERAL": 3.0,  # "Delivery@GLS.de", <reply@elsewhere.example>
    "PHISH_LINK_BRAND_MISMATCH": 4.0,  # link text shows a brand domain, opens another
    "PHISH_LINK_MISMATCH": 2.0,  # link text shows one domain, opens another
    "PHISH_URL_USERINFO": 3.0,  # "https://paypal.com@evil.example/"
    "PHISH_URL_IP_HOST": 1.5,  # a link to a bare IP address
    "PHISH_BUCKET_PAGE": 2.5,  # a web page kept in a cloud storage bucket
    "PHISH_URL_SHORTENER": 1.0,  # a link through a public shortener hides where it goes
    "PHISH_URL_REDIRECT": 1.5,  # google.com/url?q=https://evil.example/: a trusted name in front
    "PHISH_FORM_SERVICE": 2.0,  # a form on a public form builder: a form with no site of its own
    "PHISH_RANDOM_TOKEN": 1.5,  # "Fatura Emitida - KtSaGYsPn9djSGR": a filter-busting code
    "PHISH_HOMOGLYPH_WORD": 1.5,  # "Mαrch", "Рaypal": Greek or Cyrillic letters in a Latin word
    "PHISH_STYLED_LETTERS": 1.5,  # "𝐖𝐞𝐥𝐜𝐨𝐦𝐞": mathematical letters written as words
    "PHISH_HIDDEN_IN_WORDS": 3.0,  # "Micro<span style=font-size:0>x</span>soft" (ZeroFont)
    "URL_BLOCKLISTED": 10.0,
    # A brand's name, a charge or a renewal, and a telephone number to call about it, from
    # a sender that is not the brand: the callback lure (TOAD), which needs no link at all.
    "PHISH_CALLBACK": 3.0,
    "PHISH_BODY_PASSWORD_FORM": 3.0,  # a password field in the message itself
    # An HTML file with a credential form: enough on its own even when the model's
    # points are at their most negative (postvern.filters.spam.MODEL_POINTS_MIN).
    "PHISH_HTML_ATTACHMENT_FORM": 8.0,
    "PHISH_HTML_ATTACHMENT_REDIRECT": 3.5,  # an HTML file that scripts a redirect
}

# Hidden elements splitting visible words before the ZeroFont rule counts them: a
# template may leave one empty styled span between two letters, the trick needs many.
MIN_HIDDEN_IN_WORDS = 3
# Hosts examined per message for look-alikes (each costs a skeleton, cached).
MAX_HOSTS = 200
# HTML attachments larger than this are not scanned for forms (a login page is small).
MAX_HTML_ATTACHMENT_BYTES = 2 * 1024 * 1024
# Brand names shorter than this are too likely to occur inside unrelated host names.
MIN_BRAND_LABEL_IN_HOST = 4

# Public URL shorteners: a link through one shows no destination at all. They have
# honest uses, so the rule only adds to other evidence.
URL_SHORTENERS = frozenset(
    "bit.ly bitly.com tinyurl.com is.gd v.gd ow.ly buff.ly rebrand.ly cutt.ly shorturl.at "
    "rb.gy tiny.cc t.ly bit.do s.id goo.gl qrco.de shorte.st adf.ly urlz.fr 2no.co tr.im "
    "x.co clck.ru u.to".split()
)
# Cloud object storage serves a bucket's files under the provider's name, so a phishing
# page kept there borrows a reputable host and needs no site of its own. Mail links to
# files in buckets (images, downloads) but a web page there is a page that has no site.
_BUCKET_HOST = re.compile(
    r"(?:^|\.)(?:storage\.googleapis\.com|firebasestorage\.googleapis\.com"
    r"|s3[.-](?:[a-z0-9-]+\.)*amazonaws\.com|blob\.core\.windows\.net|r2\.dev"
    r"|digitaloceanspaces\.com|backblazeb2\.com|wasabisys\.com)$"
)
_PAGE_SUFFIXES = (".html", ".htm", ".xhtml", ".shtml")
# Public form builders host anyone's form under their own reputable name: surveys, and the
# password and card-number forms of phishing that needs no site of its own.
_FORM_SERVICE = re.compile(
    r"^(?:forms\.gle/|docs\.google\.com/forms/|forms\.office\.com/|forms\.yandex\.[a-z]+/"
    r"|form\.jotform\.com/|[a-z0-9-]+\.typeform\.com/to/)"
)
# Open redirects of well-known sites: the link shows google.com and opens whatever its
# query names. Mail that means to send a reader somewhere links there.
_OPEN_REDIRECT = re.compile(
    r"^(?:www\.)?(?:google\.[a-z.]{2,6}/url|googleadservices\.com/pagead/aclk"
    r"|bing\.com/ck/a|linkedin\.com/redir/redirect|youtube\.com/redirect)/?$"
)
# A token of ten or more letters and digits mixing upper case, lower case and digits
# ("v5V0ZVRe1HjazliqQoYz"): bulk senders put one in every subject so that no two copies
# match a checksum. Order and ticket numbers are digits or upper case; words are letters.
_ALNUM_TOKEN = re.compile(r"(?<![^\W_])[A-Za-z0-9]{10,64}(?![^\W_])")
MIN_RANDOM_CASE_LETTERS = 3  # of each case: "iPhone15Pro" is a name, not a code
MIN_RANDOM_CASE_CHANGES = 8
# A word spelt with Latin letters and Greek or Cyrillic look-alikes ("Mαrch" with an alpha,
# "Рaypal" with a Cyrillic Er) reads normally and matches no filter's word list; no
# language writes one word in two of these scripts (TR39 §5, mixed-script detection).
# Shorter words are units and symbols ("μm", "kΩ"), not disguises.
_LONG_WORD = re.compile(r"[^\W\d_]{4,}")
_LATIN_LETTER = re.compile(r"[A-Za-z\u00c0-\u024f]")
_GREEK_OR_CYRILLIC_LETTER = re.compile(r"[\u0370-\u03ff\u0400-\u052f]")
# Unicode's Mathematical Alphanumeric Symbols (U+1D400-U+1D7FF) are bold, italic and
# script letters for formulas; NFKC folds them to plain letters. Written as a word
# ("𝙒𝙚𝙡𝙘𝙤𝙢𝙚") they read normally and match no filter's word list (UTS #39 lists them
# among the confusables). Three in a row is a word, not a symbol in a formula.
_STYLED_RUN = re.compile("[\U0001d400-\U0001d7ff]{3,}")
# Text searched for such words: the first screens, where the claim is made.
MAX_HOMOGLYPH_TEXT = 20_000
# RFC 3464 delivery reports (in RFC 6522 multipart/report), and bounces in the older
# plain form (postvern.filters.extract): the mail system writes them, and names itself.
DELIVERY_REPORT_TYPES = frozenset({"delivery-status", "bounce"})
# Words that turn a common-word brand ("Apple", "Chase") into a claim to be the company.
_SERVICE_WORDS = frozenset(
    "support service services team security account accounts billing id online bank "
    "banking alert alerts notification notifications customer help helpdesk noreply "
    "no-reply verification verify admin center centre care store pay wallet".split()
)
_HTML_SUFFIXES = (".htm", ".html", ".xhtml", ".shtml", ".hta", ".svg", ".mht", ".mhtml")
_SCRIPT_REDIRECT = re.compile(
    r"(?i)(?:window|document|top|self)\s*\.\s*location(?:\s*\.\s*(?:href|replace|assign))?"
    r"\s*[=(]|\batob\s*\(|\bunescape\s*\(|\beval\s*\(|fromCharCode"
)
# RFC 5321 §2.3.5: a domain in mail is a fully-qualified name, labels of letters, digits
# and hyphens under a top-level domain that is not all digits. (Mail servers refuse other
# senders outright: Postfix's reject_non_fqdn_sender.)
_FQDN = re.compile(
    r"(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+"
    r"(?:[a-z][a-z0-9-]{0,61}[a-z0-9]|xn--[a-z0-9-]{1,59})"
)
_NAME_WORDS = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*")
_ADDRESS_IN_NAME = re.compile(r"[\w.+-]+@((?:[\w-]+\.)+[\w-]{2,})")


@dataclass(frozen=True, slots=True)
class Brand:
    name: str
    domains: frozenset[str]  # registrable domains
    labels: frozenset[str]  # their first labels ("paypal"), official under any suffix
    names: tuple[tuple[str, ...], ...]  # the name and aliases, as skeleton word tuples
    generic: bool


class Brands:
    """The shipped brand list, indexed by skeleton for look-alike search."""

    def __init__(self, brands: Iterable[Brand]) -> None:
        self.brands = list(brands)
        self.by_domain_skeleton: dict[str, Brand] = {}
        self.by_label_skeleton: dict[str, tuple[Brand, str]] = {}
        self.by_label: dict[str, Brand] = {}
        # The brands whose name (or an alias) starts with a word: a display name is
        # compared with those only.
        self.by_first_word: dict[str, list[int]] = {}
        for n, brand in enumerate(self.brands):
            for first in {name[0] for name in brand.names if name}:
                self.by_first_word.setdefault(first, []).append(n)
        for brand in self.brands:
            for domain in brand.domains:
                self.by_domain_skeleton.setdefault(skeleton(domain), brand)
            for label in brand.labels:
                self.by_label.setdefault(label, brand)
                self.by_label_skeleton.setdefault(skeleton(label), (brand, label))

    @classmethod
    def from_json(cls, data: bytes) -> Brands:
        document = json.loads(data)
        brands = []
        for entry in document["brands"]:
            domains = frozenset(registrable_domain(d.lower()) for d in entry["domains"])
            labels = frozenset(d.split(".")[0] for d in domains)
            names = tuple(
                tuple(skeleton(w) for w in _NAME_WORDS.findall(n.lower()))
                for n in [entry["name"], *entry.get("aliases", [])]
            )
            brands.append(Brand(entry["name"], domains, labels, names, bool(entry["generic"])))
        return cls(brands)

    def owner(self, domain: str) -> Brand | None:
        """The brand that owns a registrable *domain* (a listed one or a country variant)."""
        label = domain.split(".")[0]
        brand = self.by_label.get(label)
        if brand is not None:
            return brand
        for candidate in self.brands:
            if domain in candidate.domains:
                return candidate
        return None

    def is_official(self, brand: Brand, domain: str) -> bool:
        """*domain* (registrable) is the brand's own, or the brand's name under another
        public suffix (amazon.de, paypal.co.uk). A bare name ("correios") is no domain."""
        if domain in brand.domains:
            return True
        label, dot, _ = domain.partition(".")
        return bool(dot) and label in brand.labels


@functools.cache
def default_brands() -> Brands:
    data = importlib.resources.files("postvern.filters").joinpath(BRANDS_RESOURCE).read_bytes()
    return Brands.from_json(data)


@dataclass(frozen=True, slots=True)
class PhishingContext:
    recipient_domains: tuple[str, ...] = ()
    verified_domains: tuple[str, ...] = ()  # DKIM d= / DMARC-aligned domains that passed
    blocklist: Blocklist | None = None
    brands: Brands | None = None


def check_phishing(content: Content, ctx: PhishingContext) -> list[Hit]:
    """Every phishing rule that matches *content*, strongest hit per rule."""
    brands = ctx.brands or default_brands()
    attachment_docs = [doc for doc in map(_html_attachment, content.message.attachments) if doc]
    urls = list(content.urls)
    for doc in attachment_docs:
        urls.extend(u for u in map(parse_url, doc.urls) if u is not None)
    hits: list[Hit] = []
    hits += _lookalikes(content, urls, brands, ctx)
    hits += _sender_claims(content, brands, ctx, attachment_docs)
    hits += _sender_form(content.message)
    hits += _several_senders(content.message)
    hits += _link_claims(content, brands)
    hits += _url_tricks(urls)
    hits += _hidden_destinations(urls)
    hits += _random_tokens(content)
    hits += _homoglyph_words(content)
    hits += _styled_letters(content)
    hits += _hidden_in_words(content.html)
    hits += _callback(content, brands)
    if ctx.blocklist is not None:
        hits += _blocklisted(urls, content, ctx.blocklist)
    hits += _forms(content.html, attachment_docs)
    return _strongest_per_rule(hits)


def _hit(code: str, detail: str) -> Hit:
    return Hit(code, POINTS[code], detail)


def _hidden_in_words(doc: HtmlDoc) -> list[Hit]:
    """Letters hidden inside the words a reader sees (the ZeroFont trick): the reader reads
    "Microsoft", a filter reading the markup's text reads "Microqzsoft". No layout needs an
    invisible element between two letters of a word, let alone several."""
    if doc.hidden_in_words < MIN_HIDDEN_IN_WORDS:
        return []
    detail = f"{doc.hidden_in_words} hidden pieces of text inside visible words"
    return [_hit("PHISH_HIDDEN_IN_WORDS", detail)]


def _lookalikes(
    content: Content, urls: list[Url], brands: Brands, ctx: PhishingContext
) -> list[Hit]:
    hosts = {u.host for u in urls if not u.is_ip}
    msg = content.message
    for addr in (msg.from_addr, msg.reply_to_addr):
        if addr:
            hosts.add(to_ascii_host(addr.rpartition("@")[2]))
    hosts.update(filter(None, (shown_domain(link.text) for link in content.html.links)))
    own = {registrable_domain(to_ascii_host(d.lower().rstrip("."))) for d in ctx.recipient_domains}
    own_skeletons = {skeleton(to_unicode_host(d)): d for d in own}
    hits = []
    for host in sorted(hosts)[:MAX_HOSTS]:
        domain = registrable_domain(host)
        if domain in own:
            continue
        shown = to_unicode_host(domain)
        sk = skeleton(shown)
        if sk in own_skeletons:
            hits.append(
                _hit("PHISH_OWN_DOMAIN_LOOKALIKE", f"{domain} imitates {own_skeletons[sk]}")
            )
            continue
        hits += _brand_lookalike(host, domain, shown, sk, brands)
    return hits


def _brand_lookalike(host: str, domain: str, shown: str, sk: str, brands: Brands) -> list[Hit]:
    owner = brands.owner(domain)
    if owner is not None:
        return []
    label = shown.split(".")[0]
    brand = brands.by_domain_skeleton.get(sk)
    if brand is not None:
        return [_hit("PHISH_HOMOGRAPH", f"{domain} imitates {brand.name}")]
    match = brands.by_label_skeleton.get(skeleton(label))
    if match is not None and label != match[1]:
        return [_hit("PHISH_HOMOGRAPH", f"{domain} imitates {match[0].name}")]
    hits = []
    if not shown.isascii() and is_mixed_script(label):
        hits.append(_hit("PHISH_IDN_MIXED_SCRIPT", f"{domain} mixes scripts"))
    for part in re.split(r"[.-]", host):
        brand = brands.by_label.get(part)
        if brand and not brand.generic and len(part) >= MIN_BRAND_LABEL_IN_HOST:
            hits.append(_hit("PHISH_BRAND_IN_HOST", f"{host} names {brand.name}"))
            break
    return hits


def _sender_claims(
    content: Content, brands: Brands, ctx: PhishingContext, attachments: list[HtmlDoc]
) -> list[Hit]:
    msg = content.message
    if not msg.from_name or not msg.from_addr:
        return []
    hits = []
    from_domain = registrable_domain(to_ascii_host(msg.from_domain))
    verified = {registrable_domain(d.lower().rstrip(".")) for d in ctx.verified_domains}
    m = _ADDRESS_IN_NAME.search(msg.from_name)
    if m and registrable_domain(to_ascii_host(m.group(1).lower())) != from_domain:
        hits.append(_hit("PHISH_FROM_NAME_ADDRESS", f"name shows {m.group(1).lower()}"))
    words = [skeleton(w) for w in _NAME_WORDS.findall(msg.from_name.lower())]
    plain = set(_NAME_WORDS.findall(msg.from_name.lower()))
    candidates = sorted({n for w in words for n in brands.by_first_word.get(w, ())})
    for brand in (brands.brands[n] for n in candidates):
        if not any(_contains(words, name) for name in brand.names):
            continue
        if brand.generic and not plain & _SERVICE_WORDS:
            continue  # "Chase Miller" is a person; "Chase Online Banking" claims the bank
        if brands.is_official(brand, from_domain) or any(
            brands.is_official(brand, d) for d in verified
        ):
            continue
        if _is_delivery_report(content, attachments, brand, brands, from_domain):
            continue  # "Microsoft Outlook" <postmaster@example.org>: Exchange's bounce
        hits.append(_hit("PHISH_FROM_BRAND_SPOOF", f"'{brand.name}' sent from {from_domain}"))
        break
    return hits


def _sender_form(msg: Extracted) -> list[Hit]:
    """A From field that names an address outside any domain name ("avisos@correios",
    "taxas@%pagamentos.com") or no well-formed address at all. DMARC holds a From domain
    to its owner's policy (RFC 7489 §3.1; §6.6.1 on malformed From fields): without a
    domain to check, a brand can be put in the From field that no check contradicts."""
    if "@" not in msg.from_field:
        return []
    if msg.from_addr:
        domain = msg.from_domain.rstrip(".")
        if domain.startswith("[") or _FQDN.fullmatch(to_ascii_host(domain)):
            return []  # an RFC 5321 address literal, or a name: judged elsewhere
    return [_hit("PHISH_FROM_NOT_A_DOMAIN", "the sender address has no domain name")]


def _several_senders(msg: Extracted) -> list[Hit]:
    """A From field that reads as more than one mailbox: '"Delivery@GLS.de", <x@other.example>'
    or 'Booking.com, <x@other.example>' (an unquoted comma in a display name). RFC 5322
    §3.6.2 allows several authors only with a Sender field naming the one who sent it, and
    DMARC cannot hold such a field to one domain (RFC 7489 §6.6.1; Gmail refuses the mail
    outright): the reader sees the first "author", the checks the other. A display name that
    merely repeats the address is sloppy, not several senders, so addresses count once."""
    if "," not in msg.from_field and msg.from_field.count("@") < 2:
        return []
    if "sender" in msg.header_names:
        return []
    mailboxes = {addr.lower() for _, addr in email.utils.getaddresses([msg.from_field]) if addr}
    if len(mailboxes) < 2:
        return []
    return [_hit("PHISH_FROM_SEVERAL", "the From field names more than one sender")]


def _is_delivery_report(
    content: Content, attachments: list[HtmlDoc], brand: Brand, brands: Brands, domain: str
) -> bool:
    """A delivery report whose display name is the mail system's product: Exchange signs
    its bounces "Microsoft Outlook" from the postmaster of the organisation that bounced.

    A forged report is no exemption: one that asks for anything (a form, a password, an
    HTML attachment) or links anywhere but the reporting domain and the product's own
    sites is judged like any other message. Links in the returned copy are the
    recipient's own mail and are not counted.
    """
    msg = content.message
    if msg.report_type not in DELIVERY_REPORT_TYPES or attachments:
        return False
    returned = msg.returned or Extracted()
    returned_doc = content.returned_html or HtmlDoc()
    if content.html.password_inputs > returned_doc.password_inputs:
        return False
    if len(content.html.forms) > len(returned_doc.forms):
        return False
    returned_urls = collect_urls(returned.text, returned_doc.urls, returned_doc.text)
    returned_raw = {u.raw for u in returned_urls}
    return all(
        url.raw in returned_raw or url.domain == domain or brands.is_official(brand, url.domain)
        for url in content.urls
    )


def _contains(words: list[str], name: tuple[str, ...]) -> bool:
    n = len(name)
    return n > 0 and any(tuple(words[i : i + n]) == name for i in range(len(words) - n + 1))


def _link_claims(content: Content, brands: Brands) -> list[Hit]:
    hits = []
    for mismatch in link_mismatches(content.html.links):
        brand = brands.owner(mismatch.shown)
        if brand is not None and not brands.is_official(brand, mismatch.actual):
            detail = f"link shows {mismatch.shown} ({brand.name}) but opens {mismatch.actual}"
            hits.append(_hit("PHISH_LINK_BRAND_MISMATCH", detail))
        elif brand is None:
            detail = f"link shows {mismatch.shown} but opens {mismatch.actual}"
            hits.append(_hit("PHISH_LINK_MISMATCH", detail))
    return hits


def _url_tricks(urls: list[Url]) -> list[Hit]:
    hits = []
    for url in urls:
        if url.has_userinfo:
            hits.append(_hit("PHISH_URL_USERINFO", f"link to {url.host} hides it after '@'"))
        if url.is_ip:
            hits.append(_hit("PHISH_URL_IP_HOST", f"link to address {url.host}"))
    return hits


def _hidden_destinations(urls: list[Url]) -> list[Hit]:
    """Links that do not show where they lead: a shortener, an open redirect, a page in a
    storage bucket, a form on a form builder."""
    hits = []
    for url in urls:
        if url.host in URL_SHORTENERS:
            hits.append(_hit("PHISH_URL_SHORTENER", f"link through the shortener {url.host}"))
        where = url.host + url.path
        if "?" in url.raw and _OPEN_REDIRECT.match(where):
            hits.append(_hit("PHISH_URL_REDIRECT", f"link through {url.host}'s open redirect"))
        if _FORM_SERVICE.match(where if url.path else where + "/"):
            hits.append(_hit("PHISH_FORM_SERVICE", f"link to a form hosted on {url.host}"))
        if _BUCKET_HOST.search(url.host) and url.path.lower().endswith(_PAGE_SUFFIXES):
            hits.append(_hit("PHISH_BUCKET_PAGE", f"link to a page stored on {url.host}"))
    return hits


# A North American telephone number as lures write it ("1 864 349-9580", "(839) 268-8812",
# "+1-800-555-0199"): the callback lure's numbers are toll-free or US numbers.
_PHONE = re.compile(r"(?<!\d)(?:\+?1[\s.-]?)?\(?[2-9]\d\d\)?[\s.-]?\d{3}[\s.-]\d{4}(?!\d)")
_CHARGE = re.compile(
    r"(?i)\b(?:renewal|renewed|auto-renew\w*|subscription|invoice|charged|transaction|billing)\b"
)
_CALL_TO_ACT = re.compile(
    r"(?i)\b(?:cancel|refund|dispute|did(?: not|n't) (?:authori[sz]e|make|order|recogni[sz]e))"
)


# Words one of which every callback lure has: found by substring first, the patterns after.
_CALLBACK_WORDS = ("cancel", "refund", "dispute", "did not", "didn't")


def _callback(content: Content, brands: Brands) -> list[Hit]:
    text = content.visible_text[:MAX_HOMOGLYPH_TEXT]
    lowered = text.lower()
    if not any(word in lowered for word in _CALLBACK_WORDS):
        return []
    if not _CALL_TO_ACT.search(text) or not _CHARGE.search(text) or not _PHONE.search(text):
        return []
    domain = registrable_domain(to_ascii_host(content.message.from_domain))
    for brand in brands.brands:
        # (Generic names too: "Norton" beside a charge and a number to call is the brand.)
        if brand.name.lower() not in lowered:
            continue
        if brands.is_official(brand, domain):
            return []
        detail = f"'{brand.name}', a charge and a number to call, sent from {domain or 'nowhere'}"
        return [_hit("PHISH_CALLBACK", detail)]
    return []


def _random_tokens(content: Content) -> list[Hit]:
    msg = content.message
    for where, text in (("subject", msg.subject), ("sender name", msg.from_name)):
        if any(map(_is_random_code, _ALNUM_TOKEN.findall(text))):
            return [_hit("PHISH_RANDOM_TOKEN", f"the {where} carries a random code")]
    return []


def _is_random_code(token: str) -> bool:
    upper = sum(c.isupper() for c in token)
    lower = sum(c.islower() for c in token)
    if upper < MIN_RANDOM_CASE_LETTERS or lower < MIN_RANDOM_CASE_LETTERS:
        return False
    # Digits among the letters, or the case changing again and again ("WBmmvfJdFtGqOvWw"):
    # a name changes case once a word ("McDonaldsHQ", "iPhoneProMax").
    changes = sum(a.isupper() != b.isupper() for a, b in itertools.pairwise(token))
    return any(c.isdigit() for c in token) or changes >= MIN_RANDOM_CASE_CHANGES


def _disguisable_texts(content: Content) -> list[tuple[str, str]]:
    """Where a disguise of letters works on a reader, by name: the subject, the sender's
    name and the first screens of text. ASCII text cannot hold one, so it is left out."""
    msg = content.message
    texts = [
        ("subject", msg.subject),
        ("sender name", msg.from_name),
        ("text", content.visible_text[:MAX_HOMOGLYPH_TEXT]),
    ]
    return [(where, text) for where, text in texts if not text.isascii()]


def _homoglyph_words(content: Content) -> list[Hit]:
    for _, text in _disguisable_texts(content):
        for word in _LONG_WORD.findall(text):
            if (not word.isascii() and _LATIN_LETTER.search(word)
                    and _GREEK_OR_CYRILLIC_LETTER.search(word)):  # fmt: skip
                return [_hit("PHISH_HOMOGLYPH_WORD", f"'{word[:40]}' mixes scripts")]
    return []


def _styled_letters(content: Content) -> list[Hit]:
    for where, text in _disguisable_texts(content):
        if _STYLED_RUN.search(text):
            return [_hit("PHISH_STYLED_LETTERS", f"the {where} is written in mathematical letters")]
    return []


def _blocklisted(urls: list[Url], content: Content, blocklist: Blocklist) -> list[Hit]:
    hits = []
    for url in urls:
        entry = blocklist.match(url)
        if entry:
            hits.append(_hit("URL_BLOCKLISTED", f"{url.host} is listed ({entry})"))
            break
    domains = {content.message.from_domain, content.message.reply_to_addr.rpartition("@")[2]}
    for domain in filter(None, domains):
        entry = blocklist.match_host(domain)
        if entry:
            hits.append(_hit("URL_BLOCKLISTED", f"sender domain {domain} is listed"))
    return hits


def _forms(body: HtmlDoc, attachments: list[HtmlDoc]) -> list[Hit]:
    hits = []
    if body.password_inputs:
        hits.append(_hit("PHISH_BODY_PASSWORD_FORM", "the message asks for a password"))
    for doc in attachments:
        offsite = [f.action for f in doc.forms if parse_url(f.action) is not None]
        if doc.password_inputs or offsite:
            what = "a password field" if doc.password_inputs else "a form posting elsewhere"
            hits.append(_hit("PHISH_HTML_ATTACHMENT_FORM", f"HTML attachment has {what}"))
        if _SCRIPT_REDIRECT.search(doc.script_text) or _meta_refresh_offsite(doc):
            hits.append(_hit("PHISH_HTML_ATTACHMENT_REDIRECT", "HTML attachment redirects"))
    return hits


def _meta_refresh_offsite(doc: HtmlDoc) -> bool:
    # A meta refresh URL is recorded among doc.urls; a lone HTML file that navigates away
    # on open is a redirector whatever else it shows.
    return bool(doc.urls) and not doc.text.strip() and any(parse_url(u) for u in doc.urls)


def _html_attachment(att: Attachment) -> HtmlDoc | None:
    name = att.filename.lower()
    head = att.data[:512].lstrip().lower()
    looks_html = head.startswith((b"<!doctype html", b"<html", b"<head", b"<form", b"<script"))
    if not (att.content_type in ("text/html", "image/svg+xml") or name.endswith(_HTML_SUFFIXES)
            or looks_html):  # fmt: skip
        return None
    if len(att.data) > MAX_HTML_ATTACHMENT_BYTES:
        return None
    text = att.data.decode("utf-8", "replace")
    return scan_html(text)


def _strongest_per_rule(hits: list[Hit]) -> list[Hit]:
    best: dict[str, Hit] = {}
    for hit in hits:
        if hit.code not in best:
            best[hit.code] = hit
    return list(best.values())
