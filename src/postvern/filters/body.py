"""Body and URI rules: what spam sells and how it writes, as hand-written general patterns.

The content model learns words from the corpora it was trained on; these rules are written
down, as SpamAssassin's body and URI rules are, so that they say the same about mail from
any source and any year. Each is a fact about the *goods* or the *manner* of bulk mail that
honest mail does not share:

* what is sold: prescription drugs without a prescription, pills by the price, sexual
  content and "enlargement", replica watches and OEM software, stock tips, loans and
  mortgages "approved", work-at-home income, and the advance-fee fraud's millions;
* how it is written: words spelt with look-alike characters to pass word filters ("v1agra",
  "c-i-a-l-i-s"), a text of prices, shouting and runs of "!!!" and "$$$", the selling
  phrases of direct marketing, and "to be removed" in mail that no list sent (RFC 2369);
* how it links: bare IP hosts and long random host names, top-level domains registered
  mostly for abuse, a link that passes its reader on to another URL.

Selling is not spam: a newsletter a user subscribed to sells too. The rules about manner
(selling phrases, money, shouting, opt-out wording) therefore do not apply to mail that
says it is bulk mail the way RFC 2369 and RFC 8058 ask (a List-Unsubscribe or List-Id
field); the rules about illicit goods and disguised words apply to all mail. This family is
one voice (postvern.filters.families): it agrees with another family, it never junks alone.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable

from postvern.filters.content import Content
from postvern.filters.urls import Url
from postvern.filters.verdict import Hit

# Points on the SpamAssassin-like scale (5 = junk). A clear hit gives at least the one
# point that, beside the content model's full voice (+4), junks; the softer facts of
# manner give half that, and need a second fact or another family.
POINTS = {
    "BODY_DRUGS_SALE": 2.0,  # prescription drugs offered for sale
    "BODY_OBFUSCATED_WORD": 2.5,  # a spam word spelt to pass word filters ("v1agra")
    "BODY_ADULT": 1.5,  # sexual content
    "BODY_ENLARGEMENT": 2.0,  # "enlarge your ..." and the rest of that trade
    "BODY_REPLICA_OEM": 1.5,  # replica watches, OEM software at a fraction of the price
    "BODY_STOCK_TIP": 2.0,  # a stock "alert" with symbol and target price
    "BODY_LOAN_OFFER": 1.5,  # mortgages and loans approved whatever the credit
    "BODY_INCOME_OFFER": 1.5,  # money from home, no experience needed
    "BODY_ADVANCE_FEE": 2.5,  # the advance-fee fraud's millions and next of kin
    "BODY_SELLING_PHRASES": 1.0,  # "act now", "risk free", "no obligation" ...
    "BODY_MONEY_DENSE": 1.0,  # a text that is mostly prices
    "BODY_SHOUTING": 0.5,  # a subject or a text written in capitals
    "BODY_PUNCTUATION_RUN": 0.5,  # "!!!", "$$$"
    "BODY_DISCOUNT_SUBJECT": 1.0,  # "80% off" in the subject
    "BODY_REMOVE_ME": 1.0,  # "to be removed, reply ..." without RFC 2369's fields
    "BODY_HIDDEN_TEXT": 1.0,  # many words the HTML hides from its reader
    "BODY_WORD_SALAD": 1.0,  # lines of random words, to poison statistical filters
    "BODY_SHORT_WITH_LINK": 1.0,  # a line or two and a link: the message is the click
    "BODY_SALES_WORDS": 1.0,  # a text made of the words of selling
    "BODY_BROKEN_WORDS": 1.5,  # "L etzte B enachrichtigung": words broken apart
    "BODY_CRYPTO_LURE": 1.5,  # an airdrop, a presale, a wallet to connect
    "BODY_PRIZE": 1.0,  # "congratulations, you have won"
    "BODY_ACCOUNT_THREAT": 1.5,  # "your account will be suspended; verify within 24 hours"
    "BODY_PARCEL_FEE": 1.0,  # a parcel held for a fee
    "BODY_MISSPELT": 1.0,  # words misspelt with look-alike letters ("advantaqes", "wiil")
    "URI_SUSPICIOUS_TLD": 1.0,  # a link under a top-level domain registered mostly for abuse
    "URI_RANDOM_HOST": 1.0,  # a host name of random letters or many labels
    "URI_NESTED_URL": 1.0,  # a link that carries another URL in its query
}

# Text read by the vocabulary rules: the first screens, where the offer is made. The
# bound keeps a rule's cost independent of the message's size.
MAX_SCAN_CHARS = 32 * 1024
# Fields that declare bulk mail (RFC 2369, RFC 2919, RFC 8058).
BULK_FIELDS = ("list-unsubscribe", "list-id")

# Characters spam substitutes for letters (and the letters they stand for), and the
# punctuation it puts between letters, so that "v1@gra", "c.i.a.l.i.s" and "V-I-A-G-R-A"
# still spell their word.
_LOOKALIKES = {
    "a": "a@4àáâãäå", "e": "e3€éèêë", "i": "i1!|líìîïy", "o": "o0òóôõö", "s": "s$5",
    "l": "l1|i", "u": "uùúûüv", "c": "c¢ç", "t": "t7+", "g": "g9q", "b": "b8",
}  # fmt: skip
# Between two letters: up to three characters that are not letters ("v 5 iagra",
# "ci : alis", "p \\ harmacy"), never a line break. (Written as one bounded repeat of a
# class, not an optional group of one: the same lengths tried in the same order, 3 to 0,
# so the same matches, by the regular-expression engine's fast path for a repeated class.)
_BETWEEN = r"[^a-z\n]{0,3}"


def _spelled(words: Iterable[str], *, literal_first: bool = True) -> str:
    """An alternation matching each of *words*, look-alike letters and spacing allowed.

    With *literal_first*, a word's first letter and each of its look-alikes open an
    alternative of their own (the same matches, found in the same order), so that every
    alternative begins with one literal character: the regular-expression engine then
    skips, in C, the positions where none of those characters stands instead of trying
    the whole alternation there. (The drug pattern was a quarter of the time of the body
    rules on the mail that holds one of the words; bench/filter_equiv.py shows the
    verdicts unchanged.) A pattern that opens with a look-behind gains nothing from it,
    and the longer alternation costs."""
    alternatives = []
    for word in words:
        letters = []
        for ch in word[1:]:
            similar = _LOOKALIKES.get(ch, ch)
            letters.append(f"[{re.escape(similar)}]" if len(similar) > 1 else re.escape(ch))
        first = word[0]
        similar = _LOOKALIKES.get(first, first)
        if literal_first:
            heads = [re.escape(ch) for ch in similar]
        else:
            heads = [f"[{re.escape(similar)}]" if len(similar) > 1 else re.escape(first)]
        alternatives += [_BETWEEN.join([head, *letters]) for head in heads]
    return "|".join(alternatives)


def _phrases(text: str) -> tuple[tuple[str, ...], ...]:
    """Phrases, one a line, as tuples of word patterns (see :class:`_PhraseIndex`): a word
    is alternatives parted by "|" (an empty one makes the word optional), "#" is any
    number and a final "*" matches any word that starts so."""
    out: list[tuple[str, ...]] = []
    for line in text.strip().splitlines():
        variants: list[tuple[str, ...]] = [()]
        for word in line.split():
            options = word.split("|")
            variants = [v + ((o,) if o else ()) for v in variants for o in options]
        out += [v for v in variants if v]
    return tuple(out)


# Drugs that spam sells without a prescription: erectile, sedatives, opioids, diet pills.
# Named in honest mail too (a doctor's, a patient's), so a name alone is not the rule.
_SPAM_DRUGS = (
    "viagra cialis levitra sildenafil tadalafil vardenafil xanax valium ativan klonopin "
    "alprazolam diazepam lorazepam vicodin hydrocodone oxycodone oxycontin percocet tramadol "
    "phentermine adipex meridia ambien zolpidem carisoprodol propecia fioricet ultram"
).split()
# Run into other words too ("BestViagra Shop"): no honest word contains one.
_DRUG = re.compile(rf"(?:{_spelled(_SPAM_DRUGS)})(?![a-z])")
# Selling drugs: "no prescription needed", "online pharmacy", "60 pills $279".
_DRUG_SALE = _phrases(
    """
    no prescription
    without a| prior| prescription
    no doctor
    online|internet|canadian|discount pharmacy|drugstore|meds
    cheap|discount|generic|order|buy meds|pills|medication|medications|viagra|cialis|rx
    meds online
    rx online
    overnight delivery|shipping
    discreet packaging|shipping|delivery
    prescription is| not required|needed
    meds
    pharmaceutical*
    # pills
    per pill|dose|tablet
    """
)
# Spam words the rule on obfuscation looks for spelt with look-alikes.
_DISGUISED = (
    _SPAM_DRUGS
    + (
        "pharmacy medication prescription mortgage refinance casino porn penis erection "
        "enlargement replica rolex investment"
    ).split()
)
_DISGUISABLE = re.compile(rf"(?<![a-z])(?:{_spelled(_DISGUISED, literal_first=False)})(?![a-z])")
# The cheap test that comes first: the words above with every look-alike read as one
# letter, searched in the text read the same way with all but letters dropped ("v 1 @ g r
# a" reads "viagra"). Only a text that passes is searched with the patterns above.
_FOLD = str.maketrans(
    "1|!l0@4€3$5q9+7y8vàáâãäåéèêëíìîïòóôõöùúûü",
    "iiiioaaeessggttibuaaaaaaeeeeiiiiooooouuuu",
    " \t\n\r.,;:-_*'\"~/\\()[]{}<>=#%&^`",
)
_FOLDED_WORDS = tuple(sorted({w.translate(_FOLD) for w in _DISGUISED}))
_ADULT = _phrases(
    """
    porn
    porno
    xxx
    horny
    slut|sluts
    hardcore
    milf|milfs
    naked girls|teens|women|wives|babes
    nude girls|teens|women|wives|babes|pics|photos
    hot chicks|babes
    hot girls next door
    live cam|cams|webcam|webcams|sex
    sex videos|movies|pics|cam|cams|chat
    adult site|content|videos|movies|dvd|dvds
    lonely|horny|bored|married|naughty wives|housewives|women|ladies|girls
    discreet encounters|affair|affairs|relationship|relationships|fun
    adult|casual|sexual dating|encounters|sex
    fuck*
    sex pills
    """
)
_ENLARGEMENT = _phrases(
    """
    penis
    penis|male enlargement
    enlarge your|his penis|manhood|member
    bigger|larger|longer|harder penis|erection|erections|manhood
    add|gain #|one|two|three inch|inches
    erectile dysfunction
    sexual performance|stamina
    """
)
_REPLICA_OEM = _phrases(
    """
    replica watch|watches|rolex|handbag|handbags|bag|bags
    swiss|luxury|designer replica|watches
    rolex
    oem software|version|versions|cd|price
    retail|regular price
    you save
    cheap|discount|discounted|oem|downloadable|localized software
    software at|for low|great|cheap|unbeatable prices|price
    software at|for the lowest prices|price
    instant|immediate download
    """
)
_STOCK = _phrases(
    """
    target|projected price
    short|long term price
    strong buy
    stock|share|investor|trading alert|alerts
    trading| symbol|ticker
    our|latest|next pick
    our|latest|next stock pick
    pink sheets
    otc bb|
    otcbb
    pps
    hot stock
    undervalued|explosive|huge gain|gains|stock|growth|upside
    forward looking statements
    shares outstanding
    """
)
_LOAN = _phrases(
    """
    mortgage
    refinance
    refinancing
    low|lowest|fixed interest| rate|rates
    bad|poor|no credit
    credit check
    pre| approved
    lender
    lenders
    homeowner|homeowners
    home owner|owners
    apr
    debt consolidation
    """
)
_INCOME = _phrases(
    """
    work|working from|at home
    make|earn money|$|cash|extra
    extra income|cash
    be your own boss
    financial freedom|independence
    no experience needed|required|necessary
    weekly|monthly income
    home based business
    residual income
    """
)
# The advance-fee fraud (SpamAssassin's ADVANCE_FEE_*): a fortune, a dead benefactor, a
# confidential transfer and a share for the reader.
_ADVANCE_FEE = _phrases(
    """
    next of kin
    late|deceased husband|father|client|mr
    beneficiary
    barrister
    strictly|highly confidential
    foreign|trustworthy|reliable partner
    transfer of| the|this fund|funds|money|sum
    security|finance|diplomatic company
    consignment
    bank|central| of nigeria|ghana|africa
    your assistance|cooperation in
    lottery promotion|promotions|draw|draws|winner|winners|program|programs|board
    claim|claims|fiduciary agent|officer
    widow
    """
)
# The fortune itself: said in every report about money too, so it counts as one phrase of
# the fraud however often and however it is said.
_FORTUNE = _phrases(
    """
    the| sum of
    # million us| dollars
    million|millions of united| states| us| dollars
    $|usd # million
    us $ # million
    #|ten|twenty|thirty %|percent of|for the|this fund|funds|money|sum
    """
)
# Crypto-currency lures: free tokens to claim, a wallet to connect or to "validate".
_CRYPTO = _phrases(
    """
    airdrop
    airdrops
    presale
    pre sale
    claim your|free tokens|token|reward|rewards|airdrop|nft|xrp|eth|btc|usdt
    connect|validate|verify|sync|synchronize your wallet
    seed|recovery|secret phrase
    wallet suspended|locked|disabled|deactivated
    free crypto|bitcoin|tokens|nft|nfts
    """
)
# The prize lure: the reader has won (the English of it; other languages' lures are
# judged by the other rules).
_PRIZE = _phrases(
    """
    congratulations
    you have| won
    you are|re a| winner
    winner of
    claim your|the prize|reward|gift|voucher|bonus
    free spins
    gift card
    selected to receive
    """
)
# A parcel held until a fee is paid, in the languages such lures come in.
_PARCEL = _phrases(
    """
    customs|delivery|shipping|redelivery fee|fees|charge|charges|duty|duties
    frais de douane|livraison|port|réexpédition
    taxa|taxas de entrega|envio|importação|alfândega
    taxas pendentes
    gastos|tasas de envío|envio|aduana
    zollgebühr|zollgebühren|versandkosten|nachnahmegebühr
    package|parcel|shipment|colis|encomenda|paket|paquete is| on hold|held|suspended|retained
    colis|encomenda|paket|paquete bloqué|retida|retenido|retenida|zurückgehalten
    """
)
# The credential lure's pressure: an account in danger, a deadline, details to confirm
# (SpamAssassin's and rspamd's phishing phrase rules), in English and the languages of the
# lures in the corpora's era. Honest services say some of this too, one phrase at a time.
_ACCOUNT_THREAT = _phrases(
    """
    your account has|will been|be suspended|locked|limited|disabled|closed
    your account has|will been|be deactivated|terminated|restricted|blocked
    your account is suspended|locked|limited|disabled|closed|deactivated|restricted
    verify|confirm|update|validate your account|identity|information|details|billing|password
    unusual|suspicious activity|sign|login|logins|attempt|attempts
    unauthorized|unauthorised access|activity|login|transaction
    within 24|48|72 hours
    failure to|if you fail to|do not verify|confirm|update|comply
    click|log|sign in| below|here to verify|confirm|restore|reactivate|unlock
    sua conta foi|será|está suspensa|bloqueada|desativada
    su cuenta ha|será|está sido| suspendida|bloqueada|desactivada
    ihr konto wurde|wird gesperrt|eingeschränkt|deaktiviert
    votre compte a|sera été| suspendu|bloqué|désactivé|limité
    """
)
MIN_ACCOUNT_THREAT_PHRASES = 2
MIN_PRIZE_PHRASES = 2
MIN_CRYPTO_PHRASES = 2
# Words broken by spaces in the subject or the sender's name ("L etzte B enachrichtigung",
# "P a kets"): a capital consonant alone, the rest of its word after a space. Single
# letters that are words ("A", "I", "O", "Y") are not counted.
_BROKEN_WORD = re.compile(r"(?<![^\W\d_])[B-DF-HJ-NP-TV-XZ] [a-zäöüéèàçñ]{2,}")
MIN_BROKEN_WORDS = 2
_SELLING = _phrases(
    """
    click here
    act now
    order now
    call now
    buy now
    limited time
    100|one| hundred % free|guaranteed|satisfaction|natural
    risk free
    no obligation
    no cost
    satisfaction guaranteed
    money back guarantee
    special offer|promotion
    once in a lifetime
    you have been selected|chosen
    congratulations
    dear friend
    lowest|best price|prices
    save up to|over|big
    why pay more
    while supplies last
    don t delete
    this is not spam
    free trial|gift|bonus|quote|shipping
    """
)
MIN_SELLING_PHRASES = 3
# A price: "$19.99", "$ 279 . 99", "US$ 100", "€ 50", "USD 1,000", "£5".
_CURRENCY = frozenset({"$", "€", "£", "usd", "eur", "gbp"})
# Text of prices: at least this many amounts, and one in every this many words.
MIN_AMOUNTS = 5
MAX_WORDS_PER_AMOUNT = 25
# Shouting: letters mostly capitals, in a subject of at least a few words or a text.
MIN_SHOUT_SUBJECT_LETTERS = 12
MIN_SHOUT_TEXT_LETTERS = 200
SHOUT_SHARE = 0.7
# Text read for shouting: its first screen.
MAX_SHOUT_CHARS = 4000
_UPPER = bytes(range(ord("A"), ord("Z") + 1))
_LOWER = bytes(range(ord("a"), ord("z") + 1))
# A discount in the subject line: the offer is the whole message.
_DISCOUNT = re.compile(
    r"\d{2}\s?(?:%|percent)\s(?:off|discount|cut|price)|save (?:up to )?\d{2}\s?%"
)
# ("???" is not counted: it is what a lost charset makes of a line of other letters.)
_PUNCTUATION_RUN = re.compile(r"([!$])(?:\s?\1){2,}")
# Opt-out wording of unsolicited bulk mail (SpamAssassin's old REMOVE_* rules): the sender
# has no list, so it asks to be answered. Mailing-list footers say "unsubscribe", which
# is not among these.
_REMOVE_ME = _phrases(
    """
    to be removed
    remove me
    reply|respond|send|email with|and remove
    reply|respond|send|email with|and type remove
    reply|respond|send|email to this with|and remove
    remove in|as the| subject
    no longer wish to receive
    do|don not|t wish to receive
    opt out
    optout
    prefer|wish|want not to receive
    remove me|you| from|off the|this|our| list|mailing
    removeme*
    take me off
    to stop receiving|these
    stop getting promotional|brochures|these|offers|mail
    stop getting this|our|such promotional|brochures|these|offers|mail
    is|as a|an advertisement|solicitation
    you are| received|receiving this message|email|mail because
    you are| received|receiving this e mail because
    this message|email is|was sent in compliance
    this e mail is|was sent in compliance
    """
)
# Opt-out wording is looked for in the first and the last words only, where senders put it.
OPT_OUT_SCAN_WORDS = 400
# Hidden words that are many (a paragraph kept from the reader: text to poison a
# statistical filter) rather than a newsletter's line of preview text.
MIN_HIDDEN_WORDS = 60
# Top-level domains whose registrations are mostly abuse (Spamhaus's and Interisle's
# reports on the most abused TLDs, 2015-2024): cheap or free names, bought by the hundred.
SUSPICIOUS_TLDS = frozenset(
    "top xyz icu buzz club work rest cyou sbs cfd bond click link loan men gq ml cf ga tk "
    "monster quest uno fit surf live shop online site website space fun store win bid "
    "review date trade racing download stream accountant".split()
)
# A host label this long, or a host of this many labels: a name generated per message.
MIN_RANDOM_LABEL = 20
MIN_HOST_LABELS = 6
_VOWELS = frozenset("aeiou")
# A URL in the query of another ("?url=http%3A%2F%2F..."): the link passes the reader on.
_NESTED_URL = re.compile(r"[?&][^=&#]{0,30}=(?:https?(?::|%3a)|www\.)", re.IGNORECASE)


def check_body(content: Content) -> list[Hit]:
    """The body and URI rules that match *content*."""
    msg = content.message
    text = content.scan_text[:MAX_SCAN_CHARS]
    plain = _URL_TEXT.sub(" ", text) if "://" in text or "www." in text else text
    words = (_ASCII_TOKEN if plain.isascii() else _TOKEN).findall(plain)
    found = _PHRASES.find(words, plain)
    hits: list[Hit] = []
    hits += _goods(text, words, found, msg.from_name.lower())
    broken = _BROKEN_WORD.findall(content.judged_subject) + _BROKEN_WORD.findall(msg.from_name)
    if len(broken) >= MIN_BROKEN_WORDS:
        hits.append(_hit("BODY_BROKEN_WORDS", f"'{broken[0]}', '{broken[1]}'"))
    if not any(f in msg.header_names for f in BULK_FIELDS):
        hits += _manner(text, words, found, content)
    if len(content.html.hidden_text.split()) >= MIN_HIDDEN_WORDS:
        hits.append(_hit("BODY_HIDDEN_TEXT", "the HTML hides many words"))
    hits += _uri_rules(content.urls)
    return hits


# Words too common to index a phrase by (see _PhraseIndex).
_COMMON_WORDS = frozenset(
    "the a an and or of to in on at by for with from is are was were be it this that you "
    "your we our i me no not now do don t as if more up one all".split()
)
# Words, numbers and the symbols of money: what the phrases above are made of. Every
# spacing of "$279.99", "$ 279 . 99" reads the same.
_TOKEN = re.compile(r"[^\W_]+|[$€£%]")
# The same on ASCII text (most mail): a bitmap test per character instead of a Unicode
# category look-up, with the same matches.
_ASCII_TOKEN = re.compile(r"[a-zA-Z0-9]+|[$%]")


class _PhraseIndex:
    """Every family's phrases, found in one pass over the words of a message (a regular
    expression per family would cost a pass each). Each phrase is indexed by its least
    common word, so that a message's "the" and "you" do not try every phrase they start."""

    def __init__(self, families: dict[str, tuple[tuple[str, ...], ...]]) -> None:
        self.by_word: dict[str, list[tuple[str, tuple[str, ...], int, bool]]] = {}
        self.by_prefix: list[tuple[str, str, tuple[str, ...]]] = []
        for family, phrases in families.items():
            for phrase in phrases:
                if len(phrase) == 1 and phrase[0].endswith("*"):
                    self.by_prefix.append((phrase[0][:-1], family, phrase))
                    continue
                at = max(range(len(phrase)), key=lambda i: _rarity(phrase[i]))
                plain = not any(w == "#" or w.endswith("*") for w in phrase)
                self.by_word.setdefault(phrase[at], []).append((family, phrase, at, plain))

    def find(self, words: list[str], text: str) -> dict[str, set[str]]:
        """The distinct phrases of each family among *words* (the words of *text*), as
        the words matched."""
        found: dict[str, set[str]] = {}
        by_word, n = self.by_word, len(words)
        # The positions of indexed words, found in C; most words start no phrase.
        for i in itertools.compress(range(n), map(by_word.__contains__, words)):
            for family, phrase, at, plain in by_word[words[i]]:
                start = i - at
                end = start + len(phrase)
                if start < 0 or end > n:
                    continue
                window = words[start:end]
                if plain:
                    if tuple(window) != phrase:
                        continue
                elif not all(map(_word_matches, phrase, window)):
                    continue
                # Numbers are one phrase whatever they are: "$35 million" and "$618
                # million" in one report are one way of speaking, said twice.
                said = " ".join("#" if w.isdigit() else w for w in window)
                found.setdefault(family, set()).add(said)
        for prefix, family, _ in self.by_prefix:
            if prefix in text:  # rare: the words are looked at only then
                matched = {w for w in words if w.startswith(prefix)}
                if matched:
                    found.setdefault(family, set()).update(matched)
        return found


def _rarity(word: str) -> tuple[bool, int]:
    """How good a word is to index a phrase by: an uncommon one, the longer the better
    (never a number or a prefix, which a dictionary cannot look up)."""
    if word == "#" or word.endswith("*"):
        return (False, -1)
    return (word not in _COMMON_WORDS, len(word))


def _word_matches(pattern: str, word: str) -> bool:
    if pattern == word:
        return True
    if pattern == "#":
        return word.isdigit()
    return pattern.endswith("*") and word.startswith(pattern[:-1])


_PHRASES = _PhraseIndex(
    {
        "drug-sale": _DRUG_SALE,
        "BODY_ADULT": _ADULT,
        "BODY_ENLARGEMENT": _ENLARGEMENT,
        "BODY_REPLICA_OEM": _REPLICA_OEM,
        "BODY_STOCK_TIP": _STOCK,
        "BODY_LOAN_OFFER": _LOAN,
        "BODY_INCOME_OFFER": _INCOME,
        "BODY_ADVANCE_FEE": _ADVANCE_FEE,
        "fortune": _FORTUNE,
        "BODY_SELLING_PHRASES": _SELLING,
        "BODY_REMOVE_ME": _REMOVE_ME,
        "BODY_CRYPTO_LURE": _CRYPTO,
        "BODY_PRIZE": _PRIZE,
        "BODY_PARCEL_FEE": _PARCEL,
        "BODY_ACCOUNT_THREAT": _ACCOUNT_THREAT,
    }
)
# Distinct phrases of a family that make its rule: the goods are named in honest mail
# too (a loan, a stock, a doctor), an offer of them in several of its words.
_GOODS = (
    ("BODY_ADULT", 2, "sexual content"),
    ("BODY_ENLARGEMENT", 2, "'enlargement'"),
    ("BODY_REPLICA_OEM", 2, "replicas or OEM software"),
    ("BODY_ADVANCE_FEE", 3, "an advance-fee fraud"),
    ("BODY_CRYPTO_LURE", MIN_CRYPTO_PHRASES, "a crypto-currency lure"),
    ("BODY_ACCOUNT_THREAT", MIN_ACCOUNT_THREAT_PHRASES, "an account threatened"),
)
# Offers that honest bulk mail makes too (a bank's, a broker's newsletter): judged only in
# mail that does not say it is bulk mail, like the other rules of manner.
_OFFERS = (
    ("BODY_STOCK_TIP", 3, "a stock tip"),
    ("BODY_LOAN_OFFER", 3, "a loan offer"),
    ("BODY_INCOME_OFFER", 2, "income from home"),
    ("BODY_PRIZE", MIN_PRIZE_PHRASES, "a prize"),
    ("BODY_PARCEL_FEE", 1, "a parcel held for a fee"),
)
# Word salad: lines of at least four words with none of the little words every sentence
# of English has; a text with this many such lines was not written to be read.
_FUNCTION_WORDS = frozenset(
    "the a an and or of to in on at by for with from is are was were be been it its this "
    "that these those you your we our i my me he she they them his her their not no but if "
    "as so do does did have has had will would can could should may there here what which "
    "who when where how all any some more than then also just only very".split()
)
MIN_SALAD_LINES = 3
_ALPHA_LINE = re.compile(r"(?m)^[ \t]*[a-z]+(?:[ \t]+[a-z]+){3,}[ \t]*$")
# A message of at most this many words besides its links says nothing but "click".
MAX_SHORT_WORDS = 30
_URL_TEXT = re.compile(r"(?:https?://|www\.)\S+")
# The words of selling: a text where at least this share of the words, and this many,
# are among them is an advertisement.
_SALES_WORDS = frozenset(
    "free offer offers save savings discount discounts cheap cheapest price prices order "
    "orders buy deal deals guarantee guaranteed bonus win winner cash credit loan meds pills "
    "sale sales shipping bargain bargains lowest affordable quality brand brands products "
    "product amazing unbelievable incredible exclusive instant instantly limited special "
    "secret satisfaction refund trial click visit now today hurry online shop store".split()
)
SALES_SHARE = 0.08
MIN_SALES_WORDS = 6
MAX_SALES_SCAN_WORDS = 2000
# Letters spam swaps for look-alikes to pass word filters ("advantaqes", "viaqra",
# "wiil", "piils"): a "q" for a "g" after a vowel and before another letter than "u",
# an "i" for an "l" beside another "i". English words have them almost never (names
# from other languages and Roman numerals aside); a text with several was misspelt on
# purpose. Identifiers of programs ("mysql", "irqsave") have the "q" after a consonant.
_MISSPELT_Q = re.compile(r"q[a-tv-z]")  # after a vowel: checked for each match
_MISSPELT_EXCEPTIONS = frozenset("skiing hawaii hawaiian radii genii ascii".split())
_ROMAN_NUMERAL = re.compile(r"[ivxlcdm]+")
MIN_MISSPELT_WORDS = 2
MIN_MISSPELT_LETTERS = 5
MAX_MISSPELT_LETTERS = 16  # longer: encoded data, not a word
_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyz")


def _hit(code: str, detail: str) -> Hit:
    return Hit(code, POINTS[code], detail)


def _goods(text: str, words: list[str], found: dict[str, set[str]], sender: str) -> list[Hit]:
    hits = []
    folded = text.translate(_FOLD)
    # (A substring test per word costs less than one pattern of them all.)
    if any(word in folded for word in _FOLDED_WORDS):  # a name, plain or not: read closely
        drugs = {_plain(m) for m in _DRUG.findall(text)}
        # A sender that names itself after such a drug ("BestViagra Shop") sells it.
        offered = len(drugs) >= 3 or "drug-sale" in found or _amounts(words)
        if drugs and (offered or _DRUG.search(sender)):
            hits.append(_hit("BODY_DRUGS_SALE", f"offers {sorted(drugs)[0]}"))
        for m in _DISGUISABLE.finditer(text):
            if _disguised(m.group(0)):
                hits.append(_hit("BODY_OBFUSCATED_WORD", f"'{m.group(0)}' disguises a word"))
                break
    for code, at_least, what in _GOODS:
        phrases = found.get(code, set())
        if code == "BODY_ADVANCE_FEE" and "fortune" in found:
            phrases = phrases | {min(found["fortune"])}
        if len(phrases) >= at_least:
            hits.append(_hit(code, f"{what}: {', '.join(sorted(phrases)[:3])}"))
    return hits


def _amounts(words: list[str]) -> int:
    """How many amounts of money *words* name: a currency before a number."""
    return sum(1 for i, w in enumerate(words[:-1]) if w in _CURRENCY and words[i + 1].isdigit())


# Characters that stand for letters, or that no text puts inside a word.
_SUBSTITUTES = re.compile(r"[^a-z\s,.;'\-]")
_SEPARATOR = re.compile(r"[^a-z]+")


def _disguised(spelt: str) -> bool:
    """Whether *spelt*, a match of a spam word, was disguised: a character standing for a
    letter or put inside the word ("v1agra", "ci:alis"), or the word broken more than once
    ("c.i.a.l.i.s"). Once, by a space or a comma, is two words ("at ivan")."""
    if spelt.isalpha():
        return False
    return bool(_SUBSTITUTES.search(spelt)) or len(_SEPARATOR.findall(spelt)) >= 2


def _plain(word: str) -> str:
    return "".join(ch for ch in word if ch.isalpha())


def _manner(text: str, words: list[str], found: dict[str, set[str]], content: Content) -> list[Hit]:
    hits = []
    subject = content.judged_subject
    for code, at_least, what in _OFFERS:
        phrases = found.get(code, ())
        if len(phrases) >= at_least:
            hits.append(_hit(code, f"{what}: {', '.join(sorted(phrases)[:3])}"))
    selling = found.get("BODY_SELLING_PHRASES", ())
    if len(selling) >= MIN_SELLING_PHRASES:
        hits.append(_hit("BODY_SELLING_PHRASES", f"{', '.join(sorted(selling)[:3])}"))
    amounts = _amounts(words) if "$" in text or "€" in text or "£" in text or "usd" in text else 0
    if amounts >= MIN_AMOUNTS and amounts * MAX_WORDS_PER_AMOUNT >= len(words):
        hits.append(_hit("BODY_MONEY_DENSE", f"{amounts} amounts of money"))
    visible = content.visible_text[:MAX_SHOUT_CHARS]
    if _shouts(subject, MIN_SHOUT_SUBJECT_LETTERS) or _shouts(visible, MIN_SHOUT_TEXT_LETTERS):
        hits.append(_hit("BODY_SHOUTING", "written in capitals"))
    if _DISCOUNT.search(subject.lower()):
        hits.append(_hit("BODY_DISCOUNT_SUBJECT", "a discount in the subject"))
    if _runs(subject) or _runs(text):
        hits.append(_hit("BODY_PUNCTUATION_RUN", "runs of '!' or '$'"))
    ends = [*words[:OPT_OUT_SCAN_WORDS], "\n", *words[-OPT_OUT_SCAN_WORDS:]]
    if "BODY_REMOVE_ME" in found and _PHRASES.find(ends, text).get("BODY_REMOVE_ME"):
        hits.append(_hit("BODY_REMOVE_ME", "asks to be answered to stop it, without a list"))
    if content.urls and len(words) <= MAX_SHORT_WORDS and "\n>" not in text:
        hits.append(_hit("BODY_SHORT_WITH_LINK", f"{len(words)} words and a link"))
    sample = words[:MAX_SALES_SCAN_WORDS]
    selling_words = sum(map(_SALES_WORDS.__contains__, sample))
    if selling_words >= MIN_SALES_WORDS and selling_words >= SALES_SHARE * len(sample):
        hits.append(_hit("BODY_SALES_WORDS", f"{selling_words} of {len(sample)} words sell"))
    misspelt = _misspelt(text)
    if len(misspelt) >= MIN_MISSPELT_WORDS:
        hits.append(_hit("BODY_MISSPELT", f"{', '.join(sorted(misspelt)[:3])}"))
    if _word_salad(text):
        hits.append(_hit("BODY_WORD_SALAD", "lines of random words"))
    return hits


def _runs(text: str) -> bool:
    """Whether *text* has a run of three '!' or '$' (spaces between allowed)."""
    if text.count("!") + text.count("$") < 3:
        return False
    return _PUNCTUATION_RUN.search(text) is not None


def _after_vowel(text: str, at: int) -> bool:
    return at > 0 and text[at - 1] in _VOWELS


def _misspelt(text: str) -> set[str]:
    """The words of *text* with a look-alike spelling (see _MISSPELT_Q), up to the number
    the rule needs."""
    starts = [
        at for at in (m.start() for m in _MISSPELT_Q.finditer(text)) if _after_vowel(text, at)
    ]
    at = text.find("ii")
    while at >= 0 and len(starts) < 64:
        starts.append(at)
        at = text.find("ii", at + 2)
    words: set[str] = set()
    for start in starts:
        end = start
        while start > 0 and text[start - 1] in _LETTERS:
            start -= 1
        while end < len(text) and text[end] in _LETTERS:
            end += 1
        word = text[start:end]
        if (
            MIN_MISSPELT_LETTERS <= len(word) <= MAX_MISSPELT_LETTERS
            and word not in _MISSPELT_EXCEPTIONS
            and not _ROMAN_NUMERAL.fullmatch(word)
        ):
            words.add(word)
            if len(words) >= MIN_MISSPELT_WORDS:
                break
    return words


def _word_salad(text: str) -> bool:
    salad = 0
    for line in _ALPHA_LINE.findall(text):
        if _FUNCTION_WORDS.isdisjoint(line.split()):
            salad += 1
            if salad >= MIN_SALAD_LINES:
                return True
    return False


def _shouts(text: str, min_letters: int) -> bool:
    """Whether most of the (ASCII) letters of *text* are capitals."""
    raw = text.encode("ascii", "ignore")
    upper = len(raw) - len(raw.translate(None, _UPPER))
    if upper < SHOUT_SHARE * min_letters:
        return False
    lower = len(raw) - len(raw.translate(None, _LOWER))
    letters = upper + lower
    return letters >= min_letters and upper >= SHOUT_SHARE * letters


def _uri_rules(urls: list[Url]) -> list[Hit]:
    hits = []
    tld = random = nested = None
    for url in urls:
        host = url.host
        if tld is None and not url.is_ip and host.rpartition(".")[2] in SUSPICIOUS_TLDS:
            tld = host
        if random is None and not url.is_ip and _random_host(host):
            random = host
        if nested is None and _NESTED_URL.search(url.raw):
            nested = host
    if tld:
        hits.append(_hit("URI_SUSPICIOUS_TLD", f"link to {tld}"))
    if random:
        hits.append(_hit("URI_RANDOM_HOST", f"link to {random[:60]}"))
    if nested:
        hits.append(_hit("URI_NESTED_URL", f"link through {nested}"))
    return hits


def _random_host(host: str) -> bool:
    labels = host.split(".")
    if len(labels) >= MIN_HOST_LABELS:
        return True
    for label in labels[:-2]:
        if len(label) >= MIN_RANDOM_LABEL and "-" not in label:
            return True
        if len(label) >= 8 and label.isalpha() and not _VOWELS.intersection(label):
            return True
    return False
