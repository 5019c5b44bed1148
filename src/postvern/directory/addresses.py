"""Mail addresses as the directory keys them: lower-case local part, IDNA A-label domain.

Local parts are matched case-insensitively, as Postfix, Dovecot and every large provider do,
even though RFC 5321 §2.4 allows a server to treat them as case-sensitive: users do not expect
``Alice@`` and ``alice@`` to be two people. Non-ASCII local parts (RFC 6531) are kept and
compared in Unicode Normalization Form C, as RFC 6532 §3.1 asks: ``josé`` typed on a Mac
(NFD: ``e`` + U+0301) and on any other keyboard (NFC: U+00E9) is one address. Every path that
names an address — ``user add``, lookups, RCPT TO, logins — comes through here.
"""

from __future__ import annotations

import re
import unicodedata

# RFC 5321 §4.5.3.1: local part ≤ 64 octets, domain ≤ 255.
MAX_LOCALPART = 64
MAX_DOMAIN = 255
SUBADDRESS_SEPARATOR = "+"

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_LOCAL_ATOM = re.compile(r"^[\w!#$%&'*+/=?^`{|}~.-]+$", re.UNICODE)


class AddressError(ValueError):
    """Not a usable mail address (the message says which part is wrong)."""


def normalise_domain(domain: str) -> str:
    domain = domain.strip().rstrip(".").lower()
    if not domain:
        raise AddressError("empty domain")
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise AddressError(f"invalid domain: {domain!r}") from None
    if len(ascii_domain) > MAX_DOMAIN or not all(
        _LABEL.match(label) for label in ascii_domain.split(".")
    ):
        raise AddressError(f"invalid domain: {domain!r}")
    return ascii_domain


def normalise_localpart(localpart: str) -> str:
    # NFC after lower-casing: lower() keeps combining marks, and NFC then composes them, so
    # the NFD and NFC spellings of a name end up the same (RFC 6532 §3.1).
    localpart = unicodedata.normalize("NFC", localpart.lower())
    if not localpart or len(localpart.encode()) > MAX_LOCALPART:
        raise AddressError("local part must be 1 to 64 octets")
    if not _LOCAL_ATOM.match(localpart) or localpart.startswith(".") or ".." in localpart:
        raise AddressError(f"invalid local part: {localpart!r}")
    return localpart


def split_address(address: str) -> tuple[str, str]:
    """``Alice@Example.ORG`` → (``alice``, ``example.org``)."""
    local, sep, domain = address.strip().rpartition("@")
    if not sep:
        raise AddressError(f"not an address: {address!r}")
    return normalise_localpart(local), normalise_domain(domain)


def normalise_address(address: str) -> str:
    local, domain = split_address(address)
    return f"{local}@{domain}"


def base_localpart(localpart: str) -> str:
    """``user+tag`` → ``user`` (subaddressing, RFC 5233)."""
    return localpart.split(SUBADDRESS_SEPARATOR, 1)[0] or localpart
