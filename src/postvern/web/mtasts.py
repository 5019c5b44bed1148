"""The MTA-STS policy we publish for our own domains (RFC 8461 §3.2).

Senders that honour MTA-STS fetch it from ``https://mta-sts.<domain>/.well-known/mta-sts.txt``
and then deliver to us only over TLS with a valid certificate for a listed MX host. The id
in the ``_mta-sts`` TXT record must change whenever the policy changes, and only then: it is
derived from the policy text itself.
"""

from __future__ import annotations

import hashlib

POLICY_PATH = "/.well-known/mta-sts.txt"
# RFC 8461 §3.2: max_age up to 31557600; a week is the common choice (Google, Mox).
DEFAULT_MAX_AGE = 604800
MODES = ("enforce", "testing", "none")


def policy_text(mx_hosts: list[str], mode: str, max_age: int = DEFAULT_MAX_AGE) -> str:
    if mode not in MODES:
        raise ValueError(f"MTA-STS mode must be one of {', '.join(MODES)}")
    lines = ["version: STSv1", f"mode: {mode}"]
    lines += [f"mx: {host}" for host in mx_hosts]
    lines.append(f"max_age: {max_age}")
    return "\r\n".join(lines) + "\r\n"


def policy_id(text: str) -> str:
    """1-32 alphanumerics (RFC 8461 §3.1), stable for a given policy."""
    return hashlib.sha256(text.encode()).hexdigest()[:20]
