"""The words the spam model reads: tokens of subject and text, and a few header and URL facts.

Training (tools/train_spam.py) and scoring call the same function, so the model sees the
same features on both sides. Features are chosen to carry the *content* of spam, not the
time or corpus it came from: digits are reduced to their shape (no years, no dates), no
header is read verbatim (formats and relays change with the era), and the facts kept are
ones a spammer controls in any year (a reply address elsewhere, a link to a bare IP).
Charsets and attachment types are left out on purpose: in the training corpora they tell
the corpus and the decade apart (old ham is Latin-1 without attachments, new phishing is
UTF-8 with PDFs), not spam from ham.
"""

from __future__ import annotations

import itertools
import re

from postvern.filters.content import Content
from postvern.filters.urls import has_public_suffix, strip_urls

# Tokens read per message. The first screens of a message carry its signal; the cap makes
# scoring cost independent of message size.
MAX_TOKENS = 2500
# Longer "words" are encodings, hashes or run-together CJK text, not vocabulary.
MAX_TOKEN_CHARS = 24

# Words, and the few symbols that carry spam signal on their own (money, emphasis).
_WORD = re.compile(r"[^\W_]+|[$€£¥!%]")
_SYMBOLS = frozenset("$€£¥!%")
_DIGITS = re.compile(r"\d")
# A line this long without a space is encoded data (uuencode, base64, a hash), not words.
_ENCODED_LINE = re.compile(r"(?m)^[ \t>]*\S{40,}[ \t]*$")
# Scripts written without spaces: a run is split into characters pairs.
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def tokens(text: str, limit: int = MAX_TOKENS) -> list[str]:
    """Normalised words of *text*: lower case, digits reduced to their shape."""
    out: list[str] = []
    for m in _WORD.finditer(text.lower()):
        word = m.group(0)
        if len(word) < 2 and word not in _SYMBOLS:
            continue
        if len(word) > MAX_TOKEN_CHARS:
            if _CJK.search(word):
                out.extend(_cjk_pairs(word))
            else:
                out.append("#long")
        elif word.isdigit():
            # "2004" and "2024" alike: a year must not tell the model the era.
            out.append("#" + "9" * min(len(word), 6))
        elif any(c.isdigit() for c in word):
            out.append(_DIGITS.sub("9", word))
        else:
            out.append(word)
        if len(out) >= limit:
            break
    return out


def readable_text(text: str) -> str:
    """*text* without what is not language: URLs (their facts are features of their own;
    their query strings are noise) and lines of encoded data."""
    return _ENCODED_LINE.sub(" ", strip_urls(text))


def _cjk_pairs(word: str) -> list[str]:
    return [word[i : i + 2] for i in range(0, min(len(word), 200) - 1, 2)]


def spam_features(content: Content) -> set[str]:
    """The feature set of a message (presence, not counts)."""
    msg = content.message
    features: set[str] = set()
    subject = tokens(msg.subject, 60)
    features.update("s:" + t for t in subject)
    # The subject is read as the first line of the text too: some mail is all subject,
    # and its words mean what they mean in a body.
    body = subject + tokens(readable_text(content.visible_text))
    features.update(body)
    features.update(f"{a} {b}" for a, b in itertools.pairwise(body))
    features.update(_header_facts(content))
    features.update(_url_facts(content))
    return features


def _header_facts(content: Content) -> list[str]:
    msg = content.message
    facts = []
    if not msg.subject.strip():
        facts.append("h:no-subject")
    if "@" in msg.from_name:
        facts.append("h:from-name-has-address")
    if msg.reply_to_addr and msg.from_addr:
        if msg.reply_to_addr.rpartition("@")[2] != msg.from_domain:
            facts.append("h:reply-to-elsewhere")
    if content.html.forms:
        facts.append("h:html-form")
    if content.html.password_inputs:
        facts.append("h:html-password")
    return facts


def _url_facts(content: Content) -> list[str]:
    urls = content.urls
    facts: list[str] = []
    if not urls:
        return facts
    facts.append("u:count:" + ("1" if len(urls) == 1 else "few" if len(urls) < 6 else "many"))
    domains = set()
    for url in urls[:100]:
        if url.has_userinfo:
            facts.append("u:userinfo")
        if url.is_ip:
            facts.append("u:ip-host")
            continue
        domains.add(url.domain)
        tld = url.host.rpartition(".")[2]
        facts.append("u:tld:" + (tld if has_public_suffix(url.host) else "unknown"))
    spread = "1" if len(domains) == 1 else "few" if len(domains) < 4 else "many"
    facts.append("u:domains:" + spread)
    return facts
