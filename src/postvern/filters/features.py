"""The words the spam model reads: tokens of subject and text, and a few header and URL facts.

Training (tools/train_spam.py) and scoring call the same function, so the model sees the
same features on both sides; :func:`language_of` tells from them which language (or
script) a message is in, since the model may only read a language it has seen ham in.
Features are chosen to carry the *content* of spam, not the time or corpus it came from:
digits are reduced to their shape (no years, no dates), no header is read verbatim
(formats and relays change with the era), and the facts kept are ones a spammer controls
in any year (a reply address elsewhere, a link to a bare IP). Charsets, attachment types,
URL counts and top-level domains, and the mere absence of a subject are left out on
purpose: in the training corpora they tell the corpus and the decade apart (old ham is
Latin-1 without attachments and lost its links to preprocessing, new phishing is UTF-8
with PDFs and links), not spam from ham. Nor are the parts of a message that are the same
under all of a sender's or a list's mail read: signatures and list footers (RFC 3676) and
OpenPGP armor (RFC 4880) teach the model the mailbox, not the message.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections import Counter
from collections.abc import Collection, Iterator

from postvern.filters.content import Content
from postvern.filters.extract import Extracted
from postvern.filters.urls import strip_urls

# Tokens read per message. The first screens of a message carry its signal; the cap makes
# scoring cost independent of message size.
MAX_TOKENS = 2500
# Longer "words" are encodings, hashes or run-together CJK text, not vocabulary.
MAX_TOKEN_CHARS = 24
# URLs whose facts are read; a message with more gains nothing from the rest.
MAX_URL_FACTS = 100

# Words, and the few symbols that carry spam signal on their own (money, emphasis).
_WORD = re.compile(r"[^\W_]+|[$€£¥!%]")
# The same on lower-cased ASCII text (most mail), where a class of ASCII letters is a
# bitmap test rather than a Unicode category look-up per character, and only words of two
# or more characters and the symbols: a one-character word that is no symbol is never a
# token, so it is not matched at all (a longer run is matched whole from its first
# character, as by _WORD).
_ASCII_TOKEN_WORD = re.compile(r"[a-z0-9]{2,}|[$!%]")
_WORD_CHUNK = 16 * 1024  # characters searched for words at a time
_SYMBOLS = frozenset("$€£¥!%")
_DIGITS = re.compile(r"\d")
# A line this long without a space is encoded data (uuencode, base64, a hash), not words.
_ENCODED_LINE = re.compile(r"(?m)^[ \t>]*\S{40,}[ \t]*$")
# RFC 4880 §7: a cleartext-signed message is framed by armor lines and ends in a signature
# block. The armor is machine text, the same in ham and spam; a forged frame around spam
# leaves the spam's words to read.
_PGP_MESSAGE_HEADER = re.compile(
    r"(?m)^-----BEGIN PGP SIGNED MESSAGE-----[ \t]*\n(?:Hash:[^\n]*\n)?"
)
_PGP_SIGNATURE = ("-----BEGIN PGP SIGNATURE-----", "-----END PGP SIGNATURE-----")
# RFC 3676 §4.3: the line "-- " opens the signature. What follows (the sender's name, a
# mailing list's footer) is the same under every message, the words of the mailbox or list
# rather than of the message: read, they teach the model which list a message came from
# (in leave-one-source-out, the Debian lists' footer alone made their ham look like spam).
# A longer tail is not a signature and is read, so that spam cannot hide behind "-- ".
# A mailing list's footer is opened the same way by a line of underscores (Mailman's
# msg_footer, which most list software copies): read, it is the list's words again.
_SIGNATURE_SEPARATOR = re.compile(r"(?m)^(?:-- ?|[ \t]*_{10,}[ \t]*)\r?$")
# Every separator holds one of these, so a text with neither has no separator.
_UNDERSCORES = "_" * 10
MAX_SIGNATURE_LINES = 15
MAX_SIGNATURE_CHARS = 1000
# Characters a reader does not see (zero-width spaces and joiners, soft hyphens, BOMs):
# spam puts them inside words so that no two copies of a word look alike.
_INVISIBLE = re.compile("[\u00ad\u034f\u180e\u200b-\u200f\u2060-\u2064\ufeff]")
# Three or more single letters with a little punctuation or space between them
# ("v i a g r a", "v.i.a.g.r.a", "e . . n . . o . . u . . g . . h") are read as one word.
_SPACED_LETTERS = re.compile(r"(?<![^\W\d_])(?:[^\W\d_][\s.*_,-]{1,5}){2,}[^\W\d_](?![^\W\d_])")
_ASCII_SPACED_LETTERS = re.compile(
    r"(?<![a-zA-Z])(?:[a-zA-Z][\s.*_,-]{1,5}){2,}[a-zA-Z](?![a-zA-Z])"
)
_NOT_LETTER = re.compile(r"[\W\d_]+")
# A letter replaced by "?" inside a word ("d?bt", "elim?nat?", "c?ns?lid?tion"): spam
# masks its words so that no filter knows them. A charset lost in transit makes "?" of a
# quote too, but there only before the one- or two-letter tail of a contraction ("don?t",
# "we?ll"), which is not counted. Two masked words make the fact (in the training part:
# 1% of the spam, none of the ham).
_MASKED_WORD = re.compile(r"(?<![^\W\d_?])[^\W\d_]+\?(?!(?:s|t|d|m|ll|re|ve)(?![^\W\d_]))[^\W\d_]")
MIN_MASKED_WORDS = 2
# Lines quoted from the message replied to (">" at the start of a line, the convention RFC
# 3676 §4.5 writes down): a conversation. Three such lines make the fact (in the corpora:
# three quarters of the mailing-list ham, 1% of the Enron ham, which quoted in its own way,
# and 12 of 17,000 spam and phishing messages). It is learned like any feature, so quoting
# that spam forges costs the spam nothing it has not earned.
MIN_QUOTED_LINES = 3
# Masked words are looked for as far as tokens are read: the cost stays bounded.
MASKED_SCAN_CHARS = MAX_TOKENS * MAX_TOKEN_CHARS
# Scripts written without spaces: a run is split into characters pairs.
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def tokens(text: str, limit: int = MAX_TOKENS) -> list[str]:
    """Normalised words of *text*: lower case, digits reduced to their shape."""
    text = text.lower()
    if text.isascii():
        return _ascii_tokens(text, limit)
    out: list[str] = []
    append = out.append
    for words in _word_chunks(text, _WORD):
        for word in words:
            size = len(word)
            if size <= MAX_TOKEN_CHARS and word.isalpha():  # most words: checked first
                if size >= 2:
                    append(word)
                    if len(out) >= limit:
                        return out
                continue
            if size < 2 and word not in _SYMBOLS:
                continue
            if size > MAX_TOKEN_CHARS:
                if _CJK.search(word):
                    out.extend(_cjk_pairs(word))
                else:
                    append("#long")
            elif size == 1:
                append(word)
            elif word.isdigit():
                # "2004" and "2024" alike: a year must not tell the model the era.
                append("#" + "9" * min(size, 6))
            else:
                append(_DIGITS.sub("9", word))
            if len(out) >= limit:
                return out
    return out


def _ascii_tokens(text: str, limit: int) -> list[str]:
    """:func:`tokens` of lower-cased ASCII *text* (most mail), the same list made faster:
    there every word gives exactly one token (no CJK pairs; _ASCII_TOKEN_WORD leaves out
    the one-letter and one-digit words the general loop drops), so a chunk's tokens are
    one list comprehension and the limit a slice."""
    out: list[str] = []
    for words in _word_chunks(text, _ASCII_TOKEN_WORD):
        out += [
            word if len(word) <= MAX_TOKEN_CHARS and word.isalpha() else _ascii_shape(word)
            for word in words
        ]
        if len(out) >= limit:
            return out[:limit]
    return out


def _ascii_shape(word: str) -> str:
    """The token of an ASCII word that is not all letters or is too long (the general
    loop's rules in its order; a symbol is its own token)."""
    size = len(word)
    if size > MAX_TOKEN_CHARS:
        return "#long"
    if size == 1:
        return word
    if word.isdigit():
        return "#" + "9" * min(size, 6)
    return _DIGITS.sub("9", word)


def _word_chunks(text: str, pattern: re.Pattern[str]) -> Iterator[list[str]]:
    """The *pattern* (word) matches of *text*, found a chunk at a time so that a long text
    costs only as much as the tokens taken from it. Chunks end at white space, which no
    match spans. (A list per chunk rather than a word at a time: resuming a generator per
    word cost as much as the test of the word.)"""
    pos, size = 0, len(text)
    while size - pos > _WORD_CHUNK:
        end = text.rfind(" ", pos, pos + _WORD_CHUNK)
        if end <= pos:
            break
        yield pattern.findall(text, pos, end)
        pos = end
    yield pattern.findall(text, pos)


def readable_text(text: str) -> str:
    """*text* without what is not language: URLs (their facts are features of their own;
    their query strings are noise), lines of encoded data, OpenPGP armor, and the
    signature and list footer."""
    if not text.isascii():  # (the invisible characters are not ASCII)
        text = _INVISIBLE.sub("", text)
    text = _without_signature(_without_armor(text))
    text = _ENCODED_LINE.sub(" ", strip_urls(text))
    return (_ASCII_SPACED_LETTERS if text.isascii() else _SPACED_LETTERS).sub(_joined, text)


def _without_armor(text: str) -> str:
    """*text* without OpenPGP cleartext-signature armor (one pass, however many blocks)."""
    if "-----BEGIN PGP " not in text:
        return text
    text = _PGP_MESSAGE_HEADER.sub(" ", text)
    begin, end = _PGP_SIGNATURE
    kept: list[str] = []
    pos = 0
    while (start := text.find(begin, pos)) >= 0 and (stop := text.find(end, start)) >= 0:
        kept.append(text[pos:start])
        pos = stop + len(end)
    kept.append(text[pos:])
    return " ".join(kept)


def _without_signature(text: str) -> str:
    """*text* up to the first signature separator that only a signature follows (a
    personal one, then a mailing list's, each opened by its own separator)."""
    if "--" not in text and _UNDERSCORES not in text:
        return text  # no separator can match (most mail): the text is not searched line by line
    for separator in _SIGNATURE_SEPARATOR.finditer(text):
        tail = len(text) - separator.end()
        if tail <= MAX_SIGNATURE_CHARS and text.count("\n", separator.end()) <= MAX_SIGNATURE_LINES:
            return text[: separator.start()]
    return text


def _joined(m: re.Match[str]) -> str:
    return _NOT_LETTER.sub("", m.group(0))


def _cjk_pairs(word: str) -> list[str]:
    return [word[i : i + 2] for i in range(0, min(len(word), 200) - 1, 2)]


def spam_features(content: Content) -> set[str]:
    """The feature set of a message (presence, not counts), made once per message and
    kept on *content*: the caller must not change it."""
    if content.features is None:
        content.features = _features_of(content)
    return content.features


def _features_of(content: Content) -> set[str]:
    features: set[str] = set()
    subject = tokens(content.judged_subject, 60)
    features.update("s:" + t for t in subject)
    # The subject is read as the first line of the text too: some mail is all subject,
    # and its words mean what they mean in a body.
    text = readable_text(content.judged_text)
    body = subject + tokens(text)
    features.update(body)
    features.update(map(" ".join, itertools.pairwise(body)))
    features.update(_header_facts(content.message.returned or content.message))
    features.update(_masking_facts(text))
    features.update(_quoting_facts(text))
    features.update(_html_facts(content))
    features.update(_url_facts(content))
    return features


def _header_facts(msg: Extracted) -> list[str]:
    facts = []
    if "@" in msg.from_name:
        facts.append("h:from-name-has-address")
    if msg.reply_to_addr and msg.from_addr:
        if msg.reply_to_addr.rpartition("@")[2] != msg.from_domain:
            facts.append("h:reply-to-elsewhere")
    return facts


def _masking_facts(text: str) -> list[str]:
    """Words whose letters were masked to hide them from filters."""
    if not _letters_around_question_mark(text, MIN_MASKED_WORDS):
        return []  # the usual case, found without the pattern's per-character look-behind
    masked = _MASKED_WORD.findall(text, 0, MASKED_SCAN_CHARS)
    return ["h:masked-letters"] if len(masked) >= MIN_MASKED_WORDS else []


def _letters_around_question_mark(text: str, at_least: int) -> bool:
    """Whether at least *at_least* question marks within MASKED_SCAN_CHARS stand between
    two letters: a masked word needs one, while a question ends in "?" and a space."""
    found = 0
    at = text.find("?", 1, MASKED_SCAN_CHARS)
    while at > 0:
        if _is_letter(text[at - 1]) and _is_letter(text[at + 1 : at + 2]):
            found += 1
            if found >= at_least:
                return True
        at = text.find("?", at + 1, MASKED_SCAN_CHARS)
    return False


def _is_letter(ch: str) -> bool:
    """What ``[^\\W\\d_]`` matches: a word character that is no digit and no underscore."""
    return ch.isalnum() and not ch.isdecimal()


def _quoting_facts(text: str) -> list[str]:
    """Whether *text* quotes the message it answers."""
    quoted = text.count("\n>") + text.count("\n >") + text.startswith((">", " >"))
    return ["h:quoted-lines"] if quoted >= MIN_QUOTED_LINES else []


def _html_facts(content: Content) -> list[str]:
    facts = []
    if content.html.forms:
        facts.append("h:html-form")
    if content.html.password_inputs:
        facts.append("h:html-password")
    return facts


def _url_facts(content: Content) -> list[str]:
    """Link tricks that mean the same in any year (how many links, or under which
    top-level domain, changed with the era and the corpus, not with spamminess)."""
    facts: list[str] = []
    for url in content.urls[:MAX_URL_FACTS]:
        if url.has_userinfo:
            facts.append("u:userinfo")
        if url.is_ip:
            facts.append("u:ip-host")
    return facts


# Unicode blocks of the scripts mail is written in, as (first code point, script). A code
# point belongs to the last block starting at or below it; "" closes a block. Letters of
# scripts not listed are "Other".
_SCRIPT_BLOCKS = (
    (0x0041, "Latin"), (0x005B, ""), (0x0061, "Latin"), (0x007B, ""), (0x00C0, "Latin"),
    (0x02B0, ""), (0x0370, "Greek"), (0x0400, "Cyrillic"), (0x0530, "Armenian"),
    (0x0590, "Hebrew"), (0x0600, "Arabic"), (0x0780, "Other"), (0x0900, "Indic"),
    (0x0E00, "Thai"), (0x0E80, "Other"), (0x10A0, "Georgian"), (0x1100, "Hangul"),
    (0x1200, "Other"), (0x1E00, "Latin"), (0x1F00, "Greek"), (0x2000, ""),
    (0x2E80, "Han"), (0x3040, "Kana"), (0x3100, "Other"), (0x3130, "Hangul"),
    (0x3190, "Other"), (0x3400, "Han"), (0xA000, "Other"), (0xAC00, "Hangul"),
    (0xD7B0, ""), (0xF900, "Han"), (0xFB00, "Other"), (0xFB1D, "Hebrew"), (0xFB50, "Arabic"),
    (0xFE00, ""), (0xFE70, "Arabic"), (0xFF00, ""), (0xFF21, "Latin"), (0xFF3B, ""),
    (0xFF41, "Latin"), (0xFF5B, ""), (0xFF66, "Kana"), (0xFFA0, "Hangul"), (0xFFE0, ""),
)  # fmt: skip
_BLOCK_STARTS = [start for start, _ in _SCRIPT_BLOCKS]


def script_of(word: str) -> str:
    """The script of a token's first letter ("Latin", "Cyrillic", "Han"...), "" for a
    token without letters (a number shape, a symbol)."""
    for ch in word:
        if ch.isalpha():
            if ch.isascii():
                return "Latin"
            i = bisect.bisect_right(_BLOCK_STARTS, ord(ch)) - 1
            return (_SCRIPT_BLOCKS[i][1] or "Other") if i >= 0 else "Other"
    return ""


# The commonest function words of languages written in Latin script, for telling which
# language a message is in. Words that are also English words or names ("die", "do",
# "per", "son", "we", "al", "ben") are left out: they would make English mail look foreign.
_FUNCTION_WORDS: dict[str, frozenset[str]] = {
    lang: frozenset(words.split())
    for lang, words in {
        "en": "the and of to is you that it for with this are be have not your from will "
        "at by our can if would there their what which been has was they he she but or my",
        "de": "und der das nicht ist ich sie mit sich auf für den dem des ein eine einen zu "
        "von wir auch bei oder wenn noch nur aber uns ihr ihre werden wird sind haben "
        "können bitte sehr vielen danke gerne heute über schon mir dir hast habe wie",
        "fr": "le les des est et une pour dans pas vous nous qui que sur avec cette sont "
        "mais au aux du je il elle votre vos merci bonjour très être avoir été peut ne se "
        "de un",
        "es": "el los las del que por para una su sus como pero más este esta usted gracias "
        "hola muy también se lo está hay nos tu ya cuando donde todo porque de un",
        "pt": "os dos das em não que para com uma por seu sua você obrigado olá mais está "
        "são ao pelo pela foi ser tem isso esse essa como mas muito já também nós de",
        "it": "il gli della che sono è ciao grazie anche questo questa del nel alla delle "
        "degli come più ti si lo hai siamo essere tutto molto di alle un va ci da",
        "nl": "het een van niet zijn met voor ook maar dat wij jij ik wordt bij naar hoe "
        "bedankt en te om er nog wel als kan zou heb hebben deze dit uw je de mijn mee",
        "sv": "och att det är inte jag med för på som den har av ett vi du om",
        "da": "og er ikke jeg det til på med af som har en vi du kan fra",
        "pl": "się nie jest na że jak ale czy dla jestem mnie tak już przez być będzie "
        "przy pozdrawiam",
        "tr": "ve bir bu için ile çok ne ama gibi daha olarak değil var sen",
        "id": "yang dan di ini itu untuk dengan tidak dari akan ada kami anda saya",
    }.items()
}
# A message is taken for a language other than English when at least this many of that
# language's function words occur in it, and more of them than of English's. (Taking
# English mail for foreign costs little: see postvern.filters.spam.)
MIN_FUNCTION_WORDS = 2


def language_of(features: Collection[str]) -> str:
    """The language of a feature set: a script name ("Cyrillic", "Han"...) when most words
    are not in Latin script, else a language code ("en", "de"...); "en" when unsure."""
    if not "".join(features).isascii():
        scripts = Counter(script_of(f) for f in features if " " not in f and ":" not in f)
        scripts.pop("", None)
        if scripts:
            script, _ = scripts.most_common(1)[0]
            if script != "Latin":
                return script
    best, best_hits = "en", len(_FUNCTION_WORDS["en"].intersection(features))
    for lang, words in _FUNCTION_WORDS.items():
        hits = len(words.intersection(features))
        if hits >= MIN_FUNCTION_WORDS and hits > best_hits:
            best, best_hits = lang, hits
    return best


def foreign_function_words(known_languages: Collection[str]) -> frozenset[str]:
    """The function words of every tabled language not in *known_languages*: in mail of an
    unknown language they say which language it is, and nothing about spam."""
    return frozenset().union(
        *(words for lang, words in _FUNCTION_WORDS.items() if lang not in known_languages)
    )
