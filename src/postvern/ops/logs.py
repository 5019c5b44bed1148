"""Logs that name no one: client addresses and accounts are anonymised before they are written.

Code that logs about a person passes the address or account only as ``extra=`` fields
(``ip``, ``account``; see :func:`postvern.abuse.subject`), never inside the message text. This
formatter prints those fields last, after anonymising them: an IPv4 address keeps its /24, an
IPv6 address its /48 (enough to see a network misbehave, not to name a subscriber), and an
account becomes a keyed pseudonym that changes every day, so one day's lines can be read
together but cannot be linked to the next day's or to the account without the server key.
With ``[log] anonymise = false`` (a private server whose owner wants full logs) they are
printed as they are.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import logging

PERSONAL_FIELDS = ("ip", "account")
# Other ``extra=`` fields worth printing (all free of personal data by construction).
CONTEXT_FIELDS = ("protocol", "service", "zone", "seconds", "error")
IPV4_KEEP_BITS = 24
IPV6_KEEP_BITS = 48
PSEUDONYM_CHARS = 12


def anonymise_ip(text: str) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return "invalid"
    bits = IPV4_KEEP_BITS if address.version == 4 else IPV6_KEEP_BITS
    return str(ipaddress.ip_network(f"{address}/{bits}", strict=False))


class AnonymisingFormatter(logging.Formatter):
    def __init__(self, key: bytes, *, anonymise: bool = True) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._key = key
        self.anonymise = anonymise

    def _pseudonym(self, account: str) -> str:
        day = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d").encode()
        mac = hmac.new(self._key, day + b"\0" + account.casefold().encode(), hashlib.sha256)
        return mac.hexdigest()[:PSEUDONYM_CHARS]

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = []
        for name in PERSONAL_FIELDS:
            value = getattr(record, name, None)
            if value is None:
                continue
            if self.anonymise:
                value = anonymise_ip(str(value)) if name == "ip" else self._pseudonym(str(value))
            fields.append(f"{name}={value}")
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                fields.append(f"{name}={value}")
        return f"{line} [{' '.join(fields)}]" if fields else line


def configure(level: str, key: bytes, *, anonymise: bool) -> None:
    """Send the server's log to stderr (journald or the service manager keeps it)."""
    handler = logging.StreamHandler()
    handler.setFormatter(AnonymisingFormatter(key, anonymise=anonymise))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
