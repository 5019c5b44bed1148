"""A user's own filing rules, applied to their copy after the message's shared verdict.

The filter scores a message once for all its recipients; each user may then file their copy
differently, with the settings they keep in the account portal (accounts/settings.py):

* the **block list** (an address, or a domain with its subdomains) sends the copy to Junk;
* the **allow list** keeps it out of Junk — but only when the sender is authenticated
  (DMARC pass for the From domain, or mail submitted by one of our users), because a From
  header alone is forged at will and an allow list must not become a way in for phishing;
* the **Junk threshold** replaces the server's ([filters] spam_junk_score) for their copy.

Neither list overrides a refusal: viruses, dangerous attachments and spam above the reject
score never reach this point. A rule that changed the outcome says so in a header field of
the copy, so the user can see why a message is where it is (RFC 5322 §3.6.8 optional field).
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass

from postvern.accounts.settings import Settings
from postvern.accounts.store import AccountStore
from postvern.directory.db import Directory

RULE_HEADER = b"X-Postvern-Filed"


@dataclass(frozen=True, slots=True)
class Sender:
    """Who sent a message, as the rules see it: addresses lower-cased."""

    envelope: str  # MAIL FROM ("" for the null sender)
    header_from: str | None  # the one From address, None if there is not exactly one
    authenticated: bool  # DMARC pass, or submitted by an authenticated user of ours

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(a for a in dict.fromkeys((self.header_from, self.envelope)) if a)


def sender_of(from_fields: list[str], mail_from: str, authenticated: bool) -> Sender:
    """The sender from the message's From field values (unfolded text) and the envelope."""
    header_from = None
    if len(from_fields) == 1:
        addresses = [a for _, a in email.utils.getaddresses(from_fields) if "@" in a]
        if len(addresses) == 1:
            header_from = addresses[0].strip().lower()
    return Sender(mail_from.strip().lower(), header_from, authenticated)


def matches(entry: str, address: str) -> bool:
    """An entry is an address (exact) or a domain (itself and its subdomains)."""
    if "@" in entry:
        return entry == address
    domain = address.rpartition("@")[2]
    return domain == entry or domain.endswith("." + entry)


@dataclass(frozen=True, slots=True)
class SharedVerdict:
    """The verdict every recipient shares: the filter's and DMARC's."""

    junk: bool  # the server's own decision: filed in Junk unless a user rule says otherwise
    score: float | None  # the filter's points, None when no filter ran
    quarantined: bool  # DMARC asked for quarantine (RFC 7489 §6.3 p=quarantine)


@dataclass(frozen=True, slots=True)
class Filing:
    junk: bool
    header: bytes  # the RULE_HEADER field when a rule decided, else b""


class UserRules:
    """Synchronous (SQLite): the pipeline calls it from its worker threads."""

    def __init__(self, directory: Directory) -> None:
        self.settings = Settings(AccountStore(directory))

    def file(self, user_id: str, shared: SharedVerdict, sender: Sender) -> Filing:
        for entry in self.settings.sender_list(user_id, "block"):
            if any(matches(entry, a) for a in sender.addresses):
                return Filing(True, _field(f"Junk (your block list: {entry})"))
        if sender.authenticated:
            for entry in self.settings.sender_list(user_id, "allow"):
                if any(matches(entry, a) for a in sender.addresses):
                    header = _field(f"Inbox (your allow list: {entry})") if shared.junk else b""
                    return Filing(False, header)
        threshold = self.settings.get(user_id).junk_threshold
        if threshold is None or shared.score is None:
            return Filing(shared.junk, b"")
        # DMARC's quarantine is the domain owner's word, not a score: no threshold undoes it.
        junk = shared.quarantined or shared.score >= threshold
        if junk == shared.junk:
            return Filing(junk, b"")
        where = "Junk" if junk else "Inbox"
        text = f"{where} (your Junk threshold {threshold:g}, score {shared.score:.1f})"
        return Filing(junk, _field(text))


def _field(text: str) -> bytes:
    # The entry is an address or a domain we normalised: ASCII or UTF-8 (RFC 6532).
    return RULE_HEADER + b": " + text.encode() + b"\r\n"
