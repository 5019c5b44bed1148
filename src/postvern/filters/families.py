"""Families of evidence, and how their points add up to a verdict.

Every rule belongs to one family: the content model, the user's own marks, sender
reputation, links and phishing, header and structure, the sender's identity and its
authentication, attachments, and the evidence that the user wanted the message. A
family's points are capped below the junk score, so that no one kind of evidence junks a
message alone: Junk needs a second family to agree. This is what keeps a filter right on
mail unlike what it learned from — a model that has never seen a mailing list may be sure
a list post is spam, but the post's headers, links and sender do not agree. SpamAssassin
caps its Bayes at +3.5 of a 5.0 line (BAYES_99) and rspamd at about a third of its reject
score, for the same reason.

Known-bad findings (a virus, a blocklisted URL, a dangerous attachment) are not capped:
they are facts about the message, not opinions.
"""

from __future__ import annotations

from collections.abc import Iterable

from postvern.filters.verdict import Hit

# A family's points are capped here, a full point below the default junk score (5.0), so
# that another family must add at least that much before a message is junked. SpamAssassin's
# strongest Bayes rule gives 3.5 of 5.0; one point more lets the content model say "sure"
# louder than any single header rule.
FAMILY_MAX_POINTS = 4.0
# The content model is the exception above: past its full voice (+4, at a calibrated 80%)
# it keeps rising with its log-odds, slowly, to just below the junk score
# (postvern.filters.spam), so that a model sure at 99% needs only the weakest rule of
# another family (half a point) to junk, and the score still orders the mail it is sure of.
# It never reaches the junk score: alone it junks nothing.
CONTENT_MAX_POINTS = 4.9
# Negative evidence is capped too, so that one family cannot hide a phishing lure either;
# the evidence that the user wanted a message (they wrote to the sender, it answers their
# own message) may outweigh any one family of spam evidence, but not two.
FAMILY_MIN_POINTS = -4.0
WANTED_MIN_POINTS = -6.0
# The user's own marks are the one opinion about words that may junk (or rescue) a message
# alone: it is their mail, and a shipped model that never saw it must not overrule them.
# The bound outweighs the content model's most negative points (-3) by the junk score, so
# that spam the model reads as ham is junked once the user has marked enough of it.
PERSONAL_BOUND_POINTS = 8.0

CONTENT = "content"  # the shipped model
PERSONAL = "personal"  # the user's own Junk/Not-Junk marks on words
REPUTATION = "reputation"  # the user's marks on senders
LINKS = "links"  # URLs and phishing rules
HEADER = "header"  # header and structure anomalies
# What the text sells and how it is written, by hand-written rules (postvern.filters.body):
# a second reading of the words, apart from the learned model's.
BODY = "body"
# Who the message says it is from: SPF, DKIM, DMARC, and the From field's own claims (a
# brand in the display name, an address in it, no domain at all): a lure makes these
# claims apart from its links, so they are evidence apart from the links.
SENDER = "sender"
ATTACHMENT = "attachment"
WANTED = "wanted"  # lists, replies to the user, correspondents
KNOWN_BAD = "known-bad"  # virus, blocklisted URL, dangerous attachment: not capped
OTHER = "other"

_BY_CODE = {
    "SPAM_MODEL": CONTENT,
    "USER_LEARNED": PERSONAL,
    "SENDER_REPUTATION": REPUTATION,
    "VIRUS": KNOWN_BAD,
    "URL_BLOCKLISTED": KNOWN_BAD,
    "DANGEROUS_ATTACHMENT": KNOWN_BAD,
    "SUSPICIOUS_ATTACHMENT": ATTACHMENT,
    "ATTACHMENT_PASSWORD_GIVEN": ATTACHMENT,
}
_BY_PREFIX = (
    ("PHISH_FROM_", SENDER),
    ("PHISH_", LINKS),
    ("URL_", LINKS),
    ("URI_", LINKS),
    ("BODY_", BODY),
    ("HDR_", HEADER),
    ("RCVD_", HEADER),
    ("MIME_", HEADER),
    ("BULK_", HEADER),
    ("AUTH_", SENDER),
    ("WANTED_", WANTED),
)
# The hit that records a family's cap: its points bring the family's sum to the cap, so the
# verdict's score is still the sum of its hits (and its reasons say why).
CAP_CODE_PREFIX = "CAPPED_"


def family_of(code: str) -> str:
    """The family of a rule's code."""
    family = _BY_CODE.get(code)
    if family is not None:
        return family
    for prefix, name in _BY_PREFIX:
        if code.startswith(prefix):
            return name
    return OTHER


def bounds(family: str) -> tuple[float, float]:
    """(lowest, highest) points the family may add."""
    if family == KNOWN_BAD:
        return -float("inf"), float("inf")
    if family == PERSONAL:
        return -PERSONAL_BOUND_POINTS, PERSONAL_BOUND_POINTS
    low = WANTED_MIN_POINTS if family == WANTED else FAMILY_MIN_POINTS
    return low, CONTENT_MAX_POINTS if family == CONTENT else FAMILY_MAX_POINTS


def family_sums(hits: Iterable[Hit]) -> dict[str, float]:
    """The uncapped sum of each family's points."""
    sums: dict[str, float] = {}
    for hit in hits:
        family = family_of(hit.code)
        sums[family] = sums.get(family, 0.0) + hit.points
    return sums


def caps(hits: Iterable[Hit]) -> list[Hit]:
    """One hit per family whose sum lies beyond its bounds, bringing it back to them."""
    out = []
    for family, total in sorted(family_sums(hits).items()):
        low, high = bounds(family)
        capped = max(low, min(high, total))
        if abs(capped - total) > 1e-9:
            code = CAP_CODE_PREFIX + family.upper().replace("-", "_")
            out.append(Hit(code, capped - total, f"{family} family capped at {capped:+.1f}"))
    return out
