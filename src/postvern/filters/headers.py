"""Header and structure rules: the form of a message, which a sender's software gives away.

Mail from a real mail program has one Date and one From, a Message-ID of the form RFC 5322
§3.6.4 gives, a Received chain whose times run forward, and a text part a reader can read.
Bulk senders that hide who they are break these in every era, whatever words they send,
which is why SpamAssassin's and rspamd's header rules still earn their points twenty years
on. Each rule here is one such fact, with a few points; this family is one voice of the
verdict (postvern.filters.families), never enough to junk a message on its own.

Rules that need the trace of an SMTP delivery (a missing Date, a Date far from the time the
message arrived) look only at messages with a Received field: a message stored by other
means (a news post, an archive's excerpt) was never required to carry them.
"""

from __future__ import annotations

import email.utils
import ipaddress
import itertools
import re
from datetime import UTC, datetime, timedelta

from postvern.filters.content import Content
from postvern.filters.extract import Extracted
from postvern.filters.verdict import Hit

# Points on the SpamAssassin-like scale (5 = junk). Each is a fraction of the junk score:
# the rules are evidence to agree with another family, not verdicts.
POINTS = {
    # RFC 5322 §3.6: Date, From, Sender, Reply-To, To, Cc, Message-ID, Subject occur at most
    # once. A second one is a template's mistake or an attempt to show one filter one value
    # and the reader another.
    "HDR_DUPLICATE": 2.0,
    "HDR_FROM_MISSING": 1.5,  # §3.6: From is mandatory
    "HDR_DATE_MISSING": 1.0,  # §3.6: Date is mandatory
    "HDR_DATE_MALFORMED": 1.0,  # not §3.3's date-time (nor the obsolete forms)
    "HDR_DATE_FUTURE": 1.5,  # written more than a day after it arrived
    "HDR_DATE_PAST": 1.0,  # written days before it arrived: a pre-built batch
    "HDR_MSGID_MISSING": 0.5,  # §3.6.4 SHOULD; every mail program writes one
    "HDR_MSGID_MALFORMED": 1.0,  # not "<left@right>"
    "RCVD_TIME_DISORDER": 1.0,  # a hop received the message long before the one before it
    # The client that handed the message to the Internet: a home connection's address
    # (its reverse name spells the address, or says dsl, dynamic, pool...) sends mail only
    # when a bot or a badly run server does (SpamAssassin's RDNS_DYNAMIC, HELO_DYNAMIC_*).
    "RCVD_DYNAMIC_CLIENT": 1.0,
    "RCVD_NO_RDNS": 0.5,  # the client's address has no reverse name (RDNS_NONE)
    "RCVD_HELO_NOT_FQDN": 1.0,  # RFC 5321 §4.1.1.1: EHLO names a fully-qualified domain
    # To: undisclosed-recipients (RFC 5322 §3.6.3's empty group), no other recipient: a
    # copy sent blind to many (SpamAssassin's UNDISC_RECIPS).
    "HDR_TO_UNDISCLOSED": 1.0,
    # Content-Type without MIME-Version (RFC 2045 §4 requires it): hand-made MIME.
    "MIME_NO_VERSION": 0.5,
    "MIME_HTML_ONLY_SHORT": 1.0,  # HTML without a text part, and little to read
    "MIME_IMAGE_ONLY": 2.0,  # pictures and almost no text: text a filter cannot read
    "MIME_BASE64_TEXT": 1.0,  # plain ASCII text sent as base64
    "BULK_NO_LIST_UNSUB": 1.0,  # bulk mail without RFC 2369's List-Unsubscribe
}

UNIQUE_FIELDS = ("date", "from", "sender", "reply-to", "to", "cc", "message-id", "subject")
# A Date this far after the message arrived was not written by a clock that was right.
# Clocks drift by minutes; a day covers every time zone written wrongly.
MAX_DATE_AHEAD = timedelta(days=1)
# Mail is written and sent within hours; a queue that retries for days (RFC 5321 §4.5.4.1
# suggests giving up after 4-5 days) is the longest honest delay.
MAX_DATE_BEHIND = timedelta(days=5)
# Hops of a Received chain may disagree by clock skew; by more than this, a line is forged.
MAX_HOP_SKEW = timedelta(hours=6)
# Received fields read for their times (a long chain's oldest hops add nothing).
MAX_RECEIVED = 20
# §3.6.4: msg-id = "<" id-left "@" id-right ">" (white space and comments around it).
_MSGID = re.compile(r"^\s*<[^<>@\s]+@[^<>@\s]+>\s*(?:\([^()]*\)\s*)?$")
# "from HELO (reverse-name [address])" as Postfix, Sendmail, Exim and Google write it.
_RECEIVED_FROM = re.compile(
    r"^\s*from\s+(\S+)\s+\(([^()\[]*?)\s*\[(?:IPv6:)?([0-9a-fA-F:.]+)\]", re.IGNORECASE
)
# A reverse name that spells its address, or names a consumer access network.
_DYNAMIC_NAME = re.compile(
    r"\d{1,3}[-.]\d{1,3}[-.]\d{1,3}[-.]\d{1,3}|(?:^|[.-])(?:dsl|adsl|xdsl|dyn|dynamic|dhcp"
    r"|pool|ppp|pppoe|dial|dialup|cable|broadband|customer|client|residential|dip)\d*(?:[.-]|$)",
    re.IGNORECASE,
)
# HTML with fewer visible characters than this says almost nothing in words.
SHORT_HTML_CHARS = 400
# Text of an image-only message: a line or two ("see the picture below").
IMAGE_ONLY_MAX_WORDS = 15
# Bulk mail says how to stop it; RFC 2369 and RFC 8058 put that in List-Unsubscribe, which
# every list manager and every honest bulk sender writes (Gmail and Yahoo require it of
# bulk senders since 2024). Mail with any RFC 2369 field came through list software.
_OPT_OUT = re.compile(
    r"\bunsubscri|\bopt[ -]?out\b|\bto be removed\b|\bremove you from\b|\bremoved from (?:our|this)"
    r"|\bdésinscri|\bdésabonn|\babmelden\b|\bcancelar (?:la )?suscripci|\bdescadastr"
    r"|\bdisiscriv",
    re.IGNORECASE,
)
# Opt-out wording is looked for in the first and the last part of the text only, where
# senders put it (a discussion quoting "unsubscribe" in its middle is not bulk).
OPT_OUT_SCAN_CHARS = 2000
# Every _OPT_OUT match in ASCII text holds one of these in lower case (in other text, case
# folding has its exceptions, and the pattern is asked directly).
_OPT_OUT_ASCII_NEEDLES = (
    "unsubscri", "opt", "remove", "abmelden", "cancelar", "descadastr", "disiscriv"
)  # fmt: skip


def _may_opt_out(text: str) -> bool:
    """False when *text* cannot match _OPT_OUT: a substring test per needle costs a
    fraction of the case-insensitive pattern's scan, and most mail says no such thing."""
    if not text.isascii():
        return True
    lowered = text.lower()
    return any(needle in lowered for needle in _OPT_OUT_ASCII_NEEDLES)


def check_headers(content: Content) -> list[Hit]:
    """The header and structure rules that match *content*."""
    msg = content.message
    if not msg.fields:
        return []  # no header at all: not a message this family can judge
    hits: list[Hit] = []
    names = [name for name, _ in msg.fields]
    duplicated = [f for f in UNIQUE_FIELDS if names.count(f) > 1]
    if duplicated:
        hits.append(_hit("HDR_DUPLICATE", f"{duplicated[0]} appears {names.count(duplicated[0])}x"))
    to = _first(msg, "to") or ""
    if "undisclosed" in to.lower() and "@" not in to and "cc" not in msg.header_names:
        hits.append(_hit("HDR_TO_UNDISCLOSED", "To: undisclosed recipients"))
    # (Only in a message with a From: an archive's excerpt is not a sender's MIME.)
    if (
        msg.from_addr
        and "content-type" in msg.header_names
        and "mime-version" not in msg.header_names
    ):
        hits.append(_hit("MIME_NO_VERSION", "Content-Type without MIME-Version"))
    received = [v for n, v in msg.fields if n == "received"][:MAX_RECEIVED]
    if received:
        hits += _trace_rules(msg, received)
    hits += _structure_rules(content)
    if msg.from_addr:
        hits += _bulk_rules(content)
    return hits


def _hit(code: str, detail: str) -> Hit:
    return Hit(code, POINTS[code], detail)


def _first(msg: Extracted, name: str) -> str | None:
    return next((v for n, v in msg.fields if n == name), None)


def _trace_rules(msg: Extracted, received: list[str]) -> list[Hit]:
    """Rules for a message that came over SMTP (it has a Received chain)."""
    hits: list[Hit] = []
    if "from" not in msg.header_names:
        hits.append(_hit("HDR_FROM_MISSING", "no From field"))
    message_id = _first(msg, "message-id")
    if message_id is None:
        hits.append(_hit("HDR_MSGID_MISSING", "no Message-ID field"))
    elif not _MSGID.match(message_id):
        hits.append(_hit("HDR_MSGID_MALFORMED", f"Message-ID {message_id.strip()!r}"))
    times = [t for t in map(_received_time, received) if t is not None]
    date = _first(msg, "date")
    if date is None:
        hits.append(_hit("HDR_DATE_MISSING", "no Date field"))
    else:
        written = parse_date(date)
        if written is None:
            hits.append(_hit("HDR_DATE_MALFORMED", f"Date {date.strip()!r}"))
        elif times:
            arrived = times[0]  # the newest hop: the topmost field
            if written - arrived > MAX_DATE_AHEAD:
                hits.append(_hit("HDR_DATE_FUTURE", f"dated {_span(written - arrived)} ahead"))
            elif arrived - written > MAX_DATE_BEHIND:
                hits.append(_hit("HDR_DATE_PAST", f"dated {_span(arrived - written)} before"))
    hits += _client_rules(received)
    # Fields are added at the top, so each hop's time should be no earlier than the next.
    for newer, older in itertools.pairwise(times):
        if older - newer > MAX_HOP_SKEW:
            hits.append(_hit("RCVD_TIME_DISORDER", f"a hop {_span(older - newer)} early"))
            break
    return hits


def _client_rules(received: list[str]) -> list[Hit]:
    """Rules on the newest hop from a public address: the client that handed the message to
    the receiving organisation (hops inside it use private addresses). Older hops are the
    sender's own business: a person at home submits through a dynamic address."""
    for field_value in received:  # newest first
        found = _RECEIVED_FROM.match(field_value)
        if not found:
            continue
        helo, rdns, address = found.group(1), found.group(2).strip(), found.group(3)
        try:
            if not ipaddress.ip_address(address).is_global:
                continue
        except ValueError:
            continue
        hits = []
        name = rdns.split()[0].lower() if rdns.split() else ""
        # Only Postfix's explicit "unknown": other software writes no name for other
        # reasons too (Ecartis puts the port and EHLO there).
        if name == "unknown":
            hits.append(_hit("RCVD_NO_RDNS", f"{address} has no reverse name"))
        elif _DYNAMIC_NAME.search(name):
            hits.append(_hit("RCVD_DYNAMIC_CLIENT", f"sent from {name}"))
        helo = helo.strip("[]")
        if "." not in helo and ":" not in helo:
            hits.append(_hit("RCVD_HELO_NOT_FQDN", f"EHLO {helo}"))
        return hits
    return []


def _structure_rules(content: Content) -> list[Hit]:
    msg = content.message
    hits: list[Hit] = []
    if msg.ascii_text_in_base64:
        hits.append(_hit("MIME_BASE64_TEXT", "ASCII text sent as base64"))
    if msg.report_type:
        return hits  # a bounce's form is its MTA's
    images = sum(t.startswith("image/") for t in msg.leaf_types) + msg.html.lower().count("<img")
    # (Words are counted only for mail with images: most has none, and a long text costs.)
    text_words = len(msg.text.split()) + len(content.html.text.split()) if images else 0
    if images and text_words <= IMAGE_ONLY_MAX_WORDS:
        hits.append(_hit("MIME_IMAGE_ONLY", f"{images} image(s), {text_words} words"))
    elif (
        "text/html" in msg.leaf_types
        and "text/plain" not in msg.leaf_types
        and len(content.html.text.strip()) < SHORT_HTML_CHARS
    ):
        hits.append(_hit("MIME_HTML_ONLY_SHORT", f"{len(content.html.text.strip())} characters"))
    return hits


def _bulk_rules(content: Content) -> list[Hit]:
    msg = content.message
    if any(name.startswith("list-") for name in msg.header_names):
        return []  # list software's mail: it says how to leave in its own fields
    text = content.visible_text
    ends = text[:OPT_OUT_SCAN_CHARS] + "\n" + text[-OPT_OUT_SCAN_CHARS:]
    # (Precedence: bulk alone is not counted: lists older than RFC 2369 wrote it.)
    if _may_opt_out(ends) and _OPT_OUT.search(ends):
        return [_hit("BULK_NO_LIST_UNSUB", "bulk mail without List-Unsubscribe")]
    return []


def parse_date(value: str) -> datetime | None:
    """An RFC 5322 date-time as an aware datetime (a date without a zone is read as UTC,
    RFC 5322 §4.3's "-0000"); None when it is not one."""
    try:
        parsed = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def _received_time(value: str) -> datetime | None:
    """The date-time after the last ";" of a Received field (RFC 5321 §4.4)."""
    _, semicolon, when = value.rpartition(";")
    return parse_date(when) if semicolon else None


def _span(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours / 24:.0f} days" if hours >= 48 else f"{hours:.0f} hours"
