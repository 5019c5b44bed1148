"""An asyncio DNS stub resolver for the mail server, on top of dnspython.

Every mail check asks DNS something (SPF, DKIM keys, DMARC policies, MX hosts, DNSBLs), and
each needs to tell three outcomes apart: the name or data does not exist (an answer, cached
like any other), the lookup failed for now (``DNSTempError``: retry later, never treat as
"no record"), and the name cannot be a DNS name at all (``DNSNameError``).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver
import dns.reversename

from postvern.dns.cache import TTLCache

if TYPE_CHECKING:
    from postvern.config import Settings

# Answers are kept no longer than a day whatever their TTL says, so a mistaken or hostile
# TTL cannot pin a record in memory (RFC 8767 §4 suggests a cap of one to seven days).
MAX_POSITIVE_TTL = 86400
# RFC 2308 §5: negative answers may be cached for the SOA minimum, which "SHOULD" not exceed
# three hours; one hour keeps newly published records (a fresh DKIM key) visible sooner.
MAX_NEGATIVE_TTL = 3600
# A negative answer without an SOA in the authority section gives no TTL; RFC 2308 §5 says
# such answers SHOULD NOT be cached, a minute is the compromise that still absorbs floods.
DEFAULT_NEGATIVE_TTL = 60
# A lost UDP packet is retried after at most this many seconds within the overall timeout.
RETRY_INTERVAL = 2.0
# RFC 6891 payload size from the 2020 DNS flag day: avoids IP fragmentation of UDP answers.
EDNS_PAYLOAD = 1232


class DNSError(Exception):
    """Base class of resolver errors."""


class DNSTempError(DNSError):
    """The lookup failed for now (SERVFAIL, REFUSED, network error, malformed answer)."""


class DNSTimeout(DNSTempError):
    """No answer came back within the resolver's timeout."""


class DNSNameError(DNSError, ValueError):
    """The text cannot be a DNS name (label over 63 octets, empty label, bad IDNA...)."""


@dataclass(frozen=True)
class Answer:
    """What one query returned; ``rdatas`` is empty for NXDOMAIN and for NODATA."""

    name: str
    rdtype: str
    rdatas: tuple[dns.rdata.Rdata, ...]
    nxdomain: bool
    # The upstream resolver validated the answer with DNSSEC (AD bit, RFC 4035 §3.2.3).
    authentic: bool


@dataclass(frozen=True)
class TLSARecord:
    usage: int
    selector: int
    mtype: int
    data: bytes


@dataclass(frozen=True)
class TLSAAnswer:
    records: list[TLSARecord]
    # Only an authentic answer may be used for DANE (RFC 7672 §2.2).
    authentic: bool


def to_name(text: str) -> dns.name.Name:
    """Parse a host or domain name (Unicode names become A-labels) as an absolute name."""
    relative = text[:-1] if text.endswith(".") else text
    if not relative:
        raise DNSNameError("empty DNS name")
    try:
        return dns.name.from_text(relative + ".")
    except (dns.exception.DNSException, UnicodeError, ValueError) as e:
        raise DNSNameError(f"not a valid DNS name: {type(e).__name__}") from None


def name_text(name: dns.name.Name) -> str:
    """A name as lower-case ASCII text without the trailing dot; the root is ``""``."""
    return name.to_text(omit_final_dot=True).lower() if name != dns.name.root else ""


class Resolver:
    """Async lookups with a shared answer cache.

    ``nameservers`` is a list of ``(address, port)``; None uses the system configuration
    (``/etc/resolv.conf``). ``timeout`` bounds each lookup as a whole, in seconds.
    ``cache_size`` is the most answers kept; 0 disables the cache.
    """

    def __init__(
        self,
        nameservers: list[tuple[str, int]] | None = None,
        timeout: float = 5.0,
        cache_size: int = 4096,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        try:
            resolver = dns.asyncresolver.Resolver(configure=nameservers is None)
        except dns.exception.DNSException as e:
            raise DNSError(f"no usable system resolver configuration: {e}") from None
        if nameservers is not None:
            if not nameservers:
                raise DNSError("the nameserver list is empty")
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers
            ]
        resolver.lifetime = timeout
        resolver.timeout = min(timeout, RETRY_INTERVAL)
        resolver.use_edns(0, 0, EDNS_PAYLOAD)
        # RFC 6840 §5.7: setting AD in a query asks the resolver to report validation.
        resolver.flags = dns.flags.RD | dns.flags.AD
        self._resolver = resolver
        self._cache: TTLCache[tuple[str, str], Answer] = TTLCache(cache_size, clock)
        self.timeout = timeout

    @classmethod
    def from_settings(cls, settings: Settings) -> Resolver:
        """The resolver ``[dns]`` describes (no nameservers listed: the system's)."""
        return cls(settings.nameservers or None, settings.dns.timeout, settings.dns.cache_size)

    def clear_cache(self) -> None:
        self._cache.clear()

    async def query(self, name: str, rdtype: str) -> Answer:
        """One lookup; raises DNSTempError (or DNSTimeout) and DNSNameError, never NXDOMAIN."""
        # The cache is keyed by the name as given (lower-cased, without the final dot), so a hit
        # costs no parse: every message asks for the same few names again and again. Two
        # spellings of one name (Unicode and A-label) are two entries, which costs a lookup,
        # never a wrong answer; a name that does not parse is never stored.
        key = (name.lower().removesuffix("."), rdtype)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        answer, ttl = await self._lookup(to_name(name), rdtype)
        self._cache.put(key, answer, ttl)
        return answer

    async def _lookup(self, qname: dns.name.Name, rdtype: str) -> tuple[Answer, float]:
        text = name_text(qname)
        try:
            result = await self._resolver.resolve(
                qname, rdtype, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN as e:
            response = e.responses().get(qname) if e.responses() else None
            negative = Answer(text, rdtype, (), True, _authentic(response))
            return negative, _negative_ttl(response)
        except dns.resolver.LifetimeTimeout:
            raise DNSTimeout(f"{rdtype} lookup timed out") from None
        except dns.resolver.NoNameservers:
            raise DNSTempError(f"{rdtype} lookup failed (SERVFAIL or REFUSED)") from None
        except (dns.exception.DNSException, OSError) as e:
            raise DNSTempError(f"{rdtype} lookup failed: {type(e).__name__}") from None
        rdatas = tuple(result.rrset) if result.rrset is not None else ()
        answer = Answer(text, rdtype, rdatas, False, _authentic(result.response))
        if rdatas:
            ttl = min(max(0.0, result.expiration - time.time()), MAX_POSITIVE_TTL)
        else:
            ttl = _negative_ttl(result.response)
        return answer, ttl

    async def txt(self, name: str) -> list[bytes]:
        """Each TXT record with its strings joined (RFC 7208 §3.3, RFC 6376 §3.6.2.2)."""
        answer = await self.query(name, "TXT")
        return [b"".join(r.strings) for r in answer.rdatas]  # type: ignore[attr-defined]

    async def a(self, name: str) -> list[str]:
        answer = await self.query(name, "A")
        return [r.address for r in answer.rdatas]  # type: ignore[attr-defined]

    async def aaaa(self, name: str) -> list[str]:
        answer = await self.query(name, "AAAA")
        return [r.address for r in answer.rdatas]  # type: ignore[attr-defined]

    async def mx(self, name: str) -> list[tuple[int, str]]:
        """(preference, host) sorted by preference; a null MX (RFC 7505) has host ``""``."""
        answer = await self.query(name, "MX")
        hosts = [(r.preference, name_text(r.exchange)) for r in answer.rdatas]  # type: ignore[attr-defined]
        return sorted(hosts, key=lambda pair: pair[0])

    async def ptr(self, ip: str) -> list[str]:
        """The names an address points back to, in the order the answer gave them."""
        try:
            reverse = dns.reversename.from_address(str(ipaddress.ip_address(ip)))
        except ValueError:
            raise DNSNameError("not an IP address") from None
        answer = await self.query(reverse.to_text(), "PTR")
        return [name_text(r.target) for r in answer.rdatas]  # type: ignore[attr-defined]

    async def tlsa(self, name: str) -> TLSAAnswer:
        answer = await self.query(name, "TLSA")
        records = [
            TLSARecord(r.usage, r.selector, r.mtype, r.cert)  # type: ignore[attr-defined]
            for r in answer.rdatas
        ]
        return TLSAAnswer(records, answer.authentic)

    async def exists(self, name: str) -> bool:
        """Whether the name exists at all (NODATA counts as existing, NXDOMAIN does not)."""
        answer = await self.query(name, "A")
        return not answer.nxdomain


def _authentic(response: dns.message.Message | None) -> bool:
    return response is not None and bool(response.flags & dns.flags.AD)


def _negative_ttl(response: dns.message.Message | None) -> float:
    """RFC 2308 §5: the lesser of the SOA's TTL and its MINIMUM field."""
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                soa_minimum = rrset[0].minimum
                return float(min(rrset.ttl, soa_minimum, MAX_NEGATIVE_TTL))
    return float(DEFAULT_NEGATIVE_TTL)
