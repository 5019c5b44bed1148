"""What the abuse layer answers when it says no, with the SMTP codes each RFC allows there.

A :class:`Refusal` carries an SMTP reply code and RFC 3463 enhanced status for the SMTP
listeners, and a protocol-neutral :class:`Reason` and text for IMAP and POP3, whose own
wording ("[UNAVAILABLE]", "[LOGIN-DELAY]") is the listener's to choose. The codes follow the
per-command lists of RFC 5321 §4.3.2, so a client always meets a reply it expects.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

# Text that reaches a reply (an operator's ban reason, a DNSBL's TXT record) is cut to this
# many characters: RFC 5321 §4.5.3.1.5 limits a reply line to 512 octets with the codes.
MAX_TEXT = 200
# RFC 5321 §4.2: reply text is printable US-ASCII. Anything else (above all CR and LF from
# a hostile TXT record) is replaced, so nothing can inject a second reply line.
_UNSAFE = re.compile(r"[^\x20-\x7e]")


class Reason(enum.StrEnum):
    """Why a client was refused, independent of protocol."""

    BANNED = "banned"  # the address is banned (auth failures, enumeration, operator)
    RATE_LIMITED = "rate-limited"  # a counter is over its limit; try again later
    LISTED = "listed"  # a DNS blocklist lists the address
    GREYLISTED = "greylisted"  # first sight of this (network, sender, recipient)


@dataclass(frozen=True, slots=True)
class Refusal:
    """One refusal.

    ``code`` and ``enhanced_status`` form the SMTP reply ``"<code> <status> <text>"``.
    ``close`` means the listener replies and closes the connection at once (421, RFC 5321
    §3.8). A 554 at connection opening does not close: RFC 5321 §3.1 has the server wait
    for QUIT and answer 503 to anything else. ``retry_after`` is the number of seconds
    after which trying again can succeed, where known (a ban's end, a greylisting delay).
    """

    code: int
    enhanced_status: str
    text: str
    reason: Reason
    close: bool = False
    retry_after: float | None = None

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def smtp_line(self) -> str:
        return f"{self.code} {self.enhanced_status} {self.text}"


def clean_text(text: str, limit: int = MAX_TEXT) -> str:
    """Untrusted text made safe for a reply line: printable ASCII, one line, bounded."""
    return " ".join(_UNSAFE.sub(" ", text[: limit * 4]).split())[:limit]


def _retry(seconds: float) -> float:
    return max(0.0, seconds)


# Connection opening (RFC 5321 §3.1, §4.3.2): 220 to accept, 421 to refuse for now and
# close, 554 to refuse for good. 4.7.0 is RFC 3463's "other or undefined security status".


def banned(until_text: str, reason: str, seconds_left: float) -> Refusal:
    return Refusal(
        421,
        "4.7.0",
        clean_text(f"Your address is blocked until {until_text} ({reason})"),
        Reason.BANNED,
        close=True,
        retry_after=_retry(seconds_left),
    )


def too_many_connections(window: str) -> Refusal:
    return Refusal(
        421,
        "4.7.0",
        f"Too many connections from your address this {window}; try again later",
        Reason.RATE_LIMITED,
        close=True,
    )


def enumeration_banned(seconds: float) -> Refusal:
    return Refusal(
        421,
        "4.7.0",
        "Too many unknown recipients from your address; blocked for now",
        Reason.BANNED,
        close=True,
        retry_after=_retry(seconds),
    )


def listed(zone: str, detail: str) -> Refusal:
    """RFC 5782 §2.1 practice: name the list, so the sender knows where to ask for removal.

    554 is the only permanent refusal RFC 5321 §3.1 allows in place of the greeting; 5.7.1
    is RFC 3463's "delivery not authorized, message refused".
    """
    text = f"Your address is listed at {zone}"
    if detail:
        text += f": {detail}"
    return Refusal(554, "5.7.1", clean_text(text), Reason.LISTED)


# Within a transaction: MAIL may be answered 451 (not 450), RCPT 450 or 451, the end of
# DATA 450 or 451 (RFC 5321 §4.3.2). 4.7.1 is "delivery not authorized" for now.


def over_limit_mail(what: str) -> Refusal:
    """At MAIL or at the end of DATA, where 451 is allowed in both places."""
    return Refusal(451, "4.7.1", f"Too many {what}; try again later", Reason.RATE_LIMITED)


def over_limit_rcpt(what: str) -> Refusal:
    """At RCPT: 450, "mailbox unavailable ... temporarily blocked for policy reasons"."""
    return Refusal(450, "4.7.1", f"Too many {what}; try again later", Reason.RATE_LIMITED)


def greylisted(delay: float) -> Refusal:
    """RFC 6647 §2: a temporary failure, given at RCPT where the whole triplet is known."""
    minutes = max(1, round(delay / 60))
    return Refusal(
        451,
        "4.7.1",
        f"Greylisted: please try again in {minutes} minute{'s' if minutes != 1 else ''}",
        Reason.GREYLISTED,
        retry_after=_retry(delay),
    )
