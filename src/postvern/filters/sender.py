"""Who sent a message, as authentication showed it: the keys of sender reputation.

Reputation must rest on identities a spammer cannot borrow: a From address counts only when
DMARC verified its domain, a signing domain only when its DKIM signature verified. At
delivery the pipeline knows these from its own checks; when a user later marks a stored
message, they are read back from the Authentication-Results field this server added
(RFC 8601; forged fields claiming our authserv-id were removed at delivery, §5).
"""

from __future__ import annotations

import email.parser
import email.utils
import ipaddress
import re
from dataclasses import dataclass
from email.policy import compat32

from postvern.filters.urls import registrable_domain

# DKIM signatures per message whose domains count: more is a signature-stuffing trick.
MAX_DKIM_DOMAINS = 5


@dataclass(frozen=True, slots=True)
class SenderIdentity:
    """The authenticated identities of a message's sender."""

    from_addr: str = ""
    from_verified: bool = False  # DMARC passed: the From domain is the sender's
    dkim_domains: tuple[str, ...] = ()  # d= of DKIM signatures that verified
    spf_domain: str = ""  # MAIL FROM (or HELO) domain when SPF passed
    ip: str = ""

    def keys(self) -> list[tuple[str, str]]:
        """(kind, key) pairs under which marks on this sender are counted."""
        keys: list[tuple[str, str]] = []
        if self.from_addr and self.from_verified:
            keys.append(("addr", self.from_addr.lower()))
            keys.append(("dom", registrable_domain(self.from_addr.rpartition("@")[2].lower())))
        for domain in sorted(set(self.dkim_domains))[:MAX_DKIM_DOMAINS]:
            keys.append(("dkim", domain.lower().rstrip(".")))
        if self.spf_domain:
            keys.append(("spf", self.spf_domain.lower().rstrip(".")))
        network = ip_network_key(self.ip)
        if network:
            keys.append(network)
        return keys


def ip_network_key(ip: str) -> tuple[str, str] | None:
    """("ip24", "192.0.2.0/24") or ("ip48", "2001:db8::/48"): the range a sender controls."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if address.version == 4:
        return "ip24", str(ipaddress.ip_network(f"{address}/24", strict=False))
    return "ip48", str(ipaddress.ip_network(f"{address}/48", strict=False))


_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")
_PROPERTY = re.compile(r'([\w.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s;]+)')


def parse_resinfo(resinfo: str) -> tuple[str, str, dict[str, str]]:
    """(method, result, {ptype.property: value}) of one RFC 8601 resinfo."""
    text = resinfo
    for _ in range(5):  # comments nest; a few passes remove any real one
        text = _COMMENT.sub(" ", text)
    pairs = [(k.lower(), v.strip('"')) for k, v in _PROPERTY.findall(text)]
    if not pairs:
        return "", "", {}
    (method, result), properties = pairs[0], dict(pairs[1:])
    return method, result.lower(), properties


def identity_from_message(raw: bytes, authserv_id: str) -> SenderIdentity:
    """The identity recorded in our Authentication-Results field of a stored message."""
    from postvern.emailauth.results import our_resinfos

    from_addr = _from_address(raw)
    dkim: list[str] = []
    spf_domain = ""
    from_verified = False
    ip = ""
    for resinfo in our_resinfos(raw, authserv_id):
        method, result, props = parse_resinfo(resinfo)
        if method == "dkim" and result == "pass":
            domain = props.get("header.d") or props.get("header.i", "").rpartition("@")[2]
            if domain:
                dkim.append(domain.lower())
        elif method == "spf" and result == "pass":
            sender = props.get("smtp.mailfrom") or props.get("smtp.helo", "")
            spf_domain = sender.rpartition("@")[2].lower()
        elif method == "dmarc" and result == "pass":
            header_from = props.get("header.from", "").lower()
            from_verified = bool(header_from) and from_addr.endswith("@" + header_from)
        if "smtp.remote-ip" in props:
            ip = props["smtp.remote-ip"]
        elif method == "iprev" and "policy.iprev" in props:
            ip = props["policy.iprev"]
    return SenderIdentity(
        from_addr=from_addr,
        from_verified=from_verified,
        dkim_domains=tuple(dict.fromkeys(dkim)),
        spf_domain=spf_domain,
        ip=ip,
    )


def _from_address(raw: bytes) -> str:
    try:
        headers = email.parser.BytesHeaderParser(policy=compat32).parsebytes(raw)
        addr = email.utils.parseaddr(str(headers.get("From", "")))[1].strip().lower()
    except Exception:  # a header the stdlib cannot read has no address to trust
        return ""
    return addr if addr.count("@") == 1 else ""
