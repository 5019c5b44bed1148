"""Logs that name no one: client addresses and accounts are anonymised before they are written.

Code that logs about a person passes the address or account only as ``extra=`` fields
(``ip``, ``account``; see :func:`postvern.abuse.subject`), never inside the message text. This
formatter prints those fields last, after anonymising them: an IPv4 address keeps its /24, an
IPv6 address its /48 (enough to see a network misbehave, not to name a subscriber), and an
account becomes a keyed pseudonym that changes every day, so one day's lines can be read
together but cannot be linked to the next day's or to the account without the server key.
With ``[log] anonymise = false`` (a private server whose owner wants full logs) they are
printed as they are.

The server gives the formatter its daily keys (:class:`postvern.ops.retention.DailyKeys`)
instead of one key: then the network as well becomes a pseudonym (``ip=n-…``), each keyed
with a random key of the line's UTC day that is destroyed after the retention period, so old
lines can no longer be linked to anyone; :func:`search_needles` recomputes them for
``postvern logs search``. ``[log] format = "json"`` prints one JSON object per line.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import logging
from collections.abc import Callable

PERSONAL_FIELDS = ("ip", "account")
# Other ``extra=`` fields worth printing (all free of personal data by construction).
CONTEXT_FIELDS = ("protocol", "service", "zone", "seconds", "error")
IPV4_KEEP_BITS = 24
IPV6_KEEP_BITS = 48
PSEUDONYM_CHARS = 12
# The daily key of a line's UTC day (retention.DailyKeys.key).
DayKeys = Callable[[datetime.date], bytes]


def pseudonym(key: bytes, field: str, value: str) -> str:
    """The keyed name of an account or a network for one day's key; ``n-`` marks networks."""
    if field == "ip":
        text = anonymise_ip(value)
        mac = hmac.new(key, b"ip\0" + text.encode(), hashlib.sha256)
        return "n-" + mac.hexdigest()[:PSEUDONYM_CHARS]
    mac = hmac.new(key, b"account\0" + value.casefold().encode(), hashlib.sha256)
    return mac.hexdigest()[:PSEUDONYM_CHARS]


def anonymise_ip(text: str) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return "invalid"
    bits = IPV4_KEEP_BITS if address.version == 4 else IPV6_KEEP_BITS
    return str(ipaddress.ip_network(f"{address}/{bits}", strict=False))


class AnonymisingFormatter(logging.Formatter):
    def __init__(
        self, key: bytes | DayKeys, *, anonymise: bool = True, json_lines: bool = False
    ) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._key = key
        self.anonymise = anonymise
        self.json_lines = json_lines

    def _personal(self, record: logging.LogRecord, name: str, value: str) -> str:
        if not self.anonymise:
            return value
        if isinstance(self._key, bytes):
            return anonymise_ip(value) if name == "ip" else self._pseudonym(value)
        day = datetime.datetime.fromtimestamp(record.created, datetime.UTC).date()
        return pseudonym(self._key(day), name, value)

    def _pseudonym(self, account: str) -> str:
        assert isinstance(self._key, bytes)
        day = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d").encode()
        mac = hmac.new(self._key, day + b"\0" + account.casefold().encode(), hashlib.sha256)
        return mac.hexdigest()[:PSEUDONYM_CHARS]

    def format(self, record: logging.LogRecord) -> str:
        values: dict[str, object] = {}
        for name in PERSONAL_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                values[name] = self._personal(record, name, str(value))
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                values[name] = value
        if self.json_lines:
            return self._json(record, values)
        line = super().format(record)
        fields = [f"{name}={value}" for name, value in values.items()]
        return f"{line} [{' '.join(fields)}]" if fields else line

    def _json(self, record: logging.LogRecord, values: dict[str, object]) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        line: dict[str, object] = {
            "time": moment.isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **{k: v if isinstance(v, (int, float)) else str(v) for k, v in values.items()},
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(
    level: str,
    key: bytes | DayKeys,
    *,
    anonymise: bool,
    json_lines: bool = False,
    extra: list[logging.Handler] | None = None,
) -> None:
    """Send the server's log to stderr (journald or the service manager keeps it) and to the
    ``extra`` handlers (retention.DailyFileHandler), all through one formatter."""
    formatter = AnonymisingFormatter(key, anonymise=anonymise, json_lines=json_lines)
    handlers: list[logging.Handler] = [logging.StreamHandler(), *(extra or [])]
    for handler in handlers:
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
