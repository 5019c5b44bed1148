"""Wanted-mail evidence: signs that the user asked for a message, whatever its words.

A model trained on other people's mail cannot know what one user wants; three facts say it
better than any word can:

* a post of a mailing list the message proves it came through: a List-Id (RFC 2919) and
  RFC 2369's List-* fields, with a DKIM signature (or an ARC seal, RFC 8617) of the list's
  own domain — a spammer can write the fields, but not sign as the list;
* a reply in a thread the user is part of: In-Reply-To or References (RFC 5322 §3.6.4)
  name a Message-ID the user sent;
* a sender the user has written to.

The last two are learned from the user's Sent folder (:class:`Correspondence`), kept inside
the encrypted mailbox beside the junk model (postvern.filters.learning), and applied where
that model is: when the spool is imported at unlock. A correspondent is never junked on
content alone: the credit outweighs the content model's whole voice
(postvern.filters.families).
"""

from __future__ import annotations

import email.parser
import email.utils
import json
import re
import zlib
from dataclasses import dataclass, field
from email.policy import compat32

from postvern.filters.content import Content
from postvern.filters.extract import Extracted
from postvern.filters.urls import registrable_domain
from postvern.filters.verdict import Hit

POINTS = {
    # The list vouches for its post; lists carry spam now and then, so the credit is small.
    "WANTED_LIST_VERIFIED": -1.5,
    # An answer to the user's own message: the strongest sign of wanted mail there is.
    "WANTED_THREAD_REPLY": -4.5,
    # Someone the user wrote to: more than the content model's cap, so words alone never
    # junk them. Unverified (DMARC did not pass), a From address can be borrowed; half.
    "WANTED_CORRESPONDENT": -4.5,
}
UNVERIFIED_SHARE = 0.5
# RFC 2369 fields besides List-Id that list software writes.
LIST_FIELDS = ("list-unsubscribe", "list-post", "list-help", "list-subscribe", "list-archive")
# Bounds on what one mailbox keeps: years of one person's sent mail.
MAX_CORRESPONDENTS = 20_000
MAX_SENT_IDS = 50_000
# Message-IDs read from one References field (a long thread lists hundreds).
MAX_REFERENCES = 100
# Recipients counted per sent message: a message to more is an announcement, not a letter.
MAX_RECIPIENTS_COUNTED = 50
# The serialised form is refused past this size (a corrupt or hostile blob).
MAX_BYTES = 8 * 1024 * 1024
_MAGIC = b"PVWM1"
_MSGID = re.compile(r"<([^<>\s]{1,250})>")
_LIST_ID = re.compile(r"<([^<>\s]+)>")


class CorrespondenceError(ValueError):
    """Serialised correspondence bytes are corrupt, too large or of an unknown version."""


@dataclass
class Correspondence:
    """Whom the user wrote to and which Message-IDs they sent (both bounded, oldest dropped)."""

    addresses: dict[str, int] = field(default_factory=dict)  # lower-cased addr -> messages
    sent_ids: dict[str, None] = field(default_factory=dict)  # insertion-ordered set

    def learn_sent(self, raw: bytes) -> None:
        """Count a message the user sent (from their Sent folder)."""
        headers = email.parser.BytesHeaderParser(policy=compat32).parsebytes(raw)
        fields = [str(v) for name in ("To", "Cc", "Bcc") for v in headers.get_all(name) or []]
        recipients = {
            a.strip().lower() for _, a in email.utils.getaddresses(fields) if a.count("@") == 1
        }
        if len(recipients) <= MAX_RECIPIENTS_COUNTED:
            for address in recipients:
                self.addresses[address] = self.addresses.pop(address, 0) + 1
        for message_id in _MSGID.findall(str(headers.get("Message-ID", "")))[:1]:
            self.sent_ids.pop(message_id, None)
            self.sent_ids[message_id] = None
        _bound(self.addresses, MAX_CORRESPONDENTS)
        _bound(self.sent_ids, MAX_SENT_IDS)

    def __bool__(self) -> bool:
        return bool(self.addresses or self.sent_ids)

    def to_bytes(self) -> bytes:
        document = {"addresses": self.addresses, "sent_ids": list(self.sent_ids)}
        data = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
        return _MAGIC + zlib.compress(data, 6)

    @classmethod
    def from_bytes(cls, data: bytes) -> Correspondence:
        if len(data) > MAX_BYTES or not data.startswith(_MAGIC):
            raise CorrespondenceError("not a postvern correspondence record")
        try:
            inflater = zlib.decompressobj()
            text = inflater.decompress(data[len(_MAGIC) :], 8 * MAX_BYTES)
            if inflater.unconsumed_tail or not inflater.eof:
                raise CorrespondenceError("correspondence record too large or truncated")
            document = json.loads(text)
            addresses = document["addresses"]
            sent = document["sent_ids"]
            if not isinstance(addresses, dict) or not isinstance(sent, list):
                raise CorrespondenceError("corrupt correspondence record")
            out = cls(
                addresses={str(k): int(v) for k, v in addresses.items()},
                sent_ids=dict.fromkeys(str(i) for i in sent),
            )
        except CorrespondenceError:
            raise
        except (zlib.error, ValueError, KeyError, TypeError) as exc:
            raise CorrespondenceError("corrupt correspondence record") from exc
        if len(out.addresses) > MAX_CORRESPONDENTS or len(out.sent_ids) > MAX_SENT_IDS:
            raise CorrespondenceError("correspondence record past its bounds")
        return out


def _bound(table: dict[str, int] | dict[str, None], limit: int) -> None:
    while len(table) > limit:
        del table[next(iter(table))]


@dataclass(frozen=True, slots=True)
class Authenticated:
    """What authentication proved about the sender (from postvern.filters.AuthSummary)."""

    signers: tuple[str, ...] = ()  # DKIM d= that verified, and ARC sealers of a valid chain
    from_verified: bool = False  # DMARC passed
    from_failed: bool = False  # DMARC failed: the From address is someone else's


def check_wanted(
    content: Content, auth: Authenticated, correspondence: Correspondence | None
) -> list[Hit]:
    """The wanted-mail evidence that applies to *content*."""
    msg = content.message
    hits = _list_hits(msg, auth)
    if correspondence:
        hits += _thread_hits(msg, correspondence)
        hits += _correspondent_hits(msg, auth, correspondence)
    return hits


def list_domain(msg: Extracted) -> str:
    """The registrable domain of the List-Id (RFC 2919 §3: "<list-label.domain>"), or ""."""
    value = next((v for n, v in msg.fields if n == "list-id"), "")
    found = _LIST_ID.search(value)
    if not found or "." not in found.group(1):
        return ""
    return registrable_domain(found.group(1).lower().rstrip("."))


def _list_hits(msg: Extracted, auth: Authenticated) -> list[Hit]:
    domain = list_domain(msg)
    if not domain or not any(f in msg.header_names for f in LIST_FIELDS):
        return []
    if not any(registrable_domain(s) == domain for s in auth.signers):
        return []
    code = "WANTED_LIST_VERIFIED"
    return [Hit(code, POINTS[code], f"a post of a list at {domain}, signed by it")]


def _thread_hits(msg: Extracted, correspondence: Correspondence) -> list[Hit]:
    named = []
    for name in ("in-reply-to", "references"):
        for _, value in (f for f in msg.fields if f[0] == name):
            named += _MSGID.findall(value)[-MAX_REFERENCES:]
    if any(i in correspondence.sent_ids for i in named):
        code = "WANTED_THREAD_REPLY"
        return [Hit(code, POINTS[code], "answers a message you sent")]
    return []


def _correspondent_hits(
    msg: Extracted, auth: Authenticated, correspondence: Correspondence
) -> list[Hit]:
    if not msg.from_addr or auth.from_failed or msg.from_addr not in correspondence.addresses:
        return []
    code = "WANTED_CORRESPONDENT"
    share = 1.0 if auth.from_verified else UNVERIFIED_SHARE
    what = "verified" if auth.from_verified else "unverified"
    return [Hit(code, POINTS[code] * share, f"you wrote to this sender ({what})")]
