"""DNS blocklists (RFC 5782): ask lists of known spam sources about a connecting client.

A list publishes an A record under the client's reversed address (``2.2.0.192.zone``) when
it lists the client, and usually a TXT record saying why. Lookups run concurrently with a
deadline; a list that fails or is slow never refuses mail (fail open), it is only logged.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from postvern.abuse.network import IPAddress, parse_ip
from postvern.abuse.personal import subject
from postvern.abuse.refusal import clean_text
from postvern.dns import DNSError, DNSNameError, Resolver
from postvern.dns.cache import TTLCache
from postvern.dns.resolver import to_name

log = logging.getLogger(__name__)

# Every list is asked at connect time, so its answer delays the greeting: two seconds for
# all lists together (they are asked in parallel) keeps a slow list from stalling the MX.
DEFAULT_TIMEOUT = 2.0
# Answers are kept five minutes: a flood from one client asks the list once, and a client
# that gets itself delisted waits at most that long.
CACHE_SECONDS = 300.0
# One entry per (list, address); bounded so a scan from many addresses cannot grow memory.
MAX_CACHE_ENTRIES = 10_000
# RFC 5782 §2.1, §2.3: a listing is an A record in 127.0.0.0/8 (127.0.0.2 by convention);
# anything else means the list or the path to it is broken (a resolver that answers every
# name, a list that was shut down and wildcarded).
LISTED = ipaddress.IPv4Network("127.0.0.0/8")
# Lists use 127.255.255.0/24 to report errors about the query rather than the client
# (Spamhaus: .252 bad query name, .254 query through a public resolver, .255 over quota).
# They are not listings; counting them as such would refuse the whole Internet.
ERROR_CODES = ipaddress.IPv4Network("127.255.255.0/24")
# Addresses no public list can list; asking about them only tells the list operator about
# the internal network.
NOT_LISTABLE = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
)


class DNSBLConfigError(ValueError):
    """A configured list zone is not a valid DNS name."""


class ListError(Exception):
    """The list answered with an error code or a non-listing address."""


@dataclass(frozen=True, slots=True)
class Listing:
    """A client is on ``zone``: the return codes, and the list's reason (may be empty)."""

    zone: str
    codes: tuple[str, ...]
    detail: str


def query_name(address: IPAddress, zone: str) -> str:
    """RFC 5782 §2.1 (IPv4 octets) and §2.4 (IPv6 nibbles), reversed, before the zone."""
    if isinstance(address, ipaddress.IPv4Address):
        labels = str(address).split(".")
    else:
        labels = list(address.exploded.replace(":", ""))
    return ".".join(reversed(labels)) + "." + zone


def listing_codes(addresses: Sequence[str]) -> tuple[str, ...]:
    """The listing codes among A answers; ListError if the list reports an error instead."""
    codes: list[str] = []
    for text in addresses:
        address = ipaddress.IPv4Address(text)
        if address in ERROR_CODES or address not in LISTED:
            raise ListError(f"list answered {text}, which is not a listing")
        codes.append(text)
    return tuple(codes)


# RFC 5782 §5: every IPv4 list MUST list 127.0.0.2, so that a checker can be tested.
TEST_POINT = ipaddress.IPv4Address("127.0.0.2")


def listable(address: IPAddress) -> bool:
    if address == TEST_POINT:
        return True
    return not any(address in network for network in NOT_LISTABLE)


class DNSBL:
    """Ask each of ``zones`` about a client; the first listing in configuration order wins."""

    def __init__(
        self,
        resolver: Resolver,
        zones: Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        cache_seconds: float = CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.zones = tuple(_check_zone(z) for z in zones)
        self._resolver = resolver
        self._timeout = timeout
        self._cache_seconds = cache_seconds
        self._cache: TTLCache[tuple[str, str], tuple[Listing | None]] = TTLCache(
            MAX_CACHE_ENTRIES, clock
        )

    async def check(self, ip: str) -> Listing | None:
        """The first listing of ``ip``, or None (also when every list failed)."""
        address = parse_ip(ip)
        if not self.zones or not listable(address):
            return None
        results = await asyncio.gather(*(self._ask(address, zone) for zone in self.zones))
        return next((r for r in results if r is not None), None)

    async def _ask(self, address: IPAddress, zone: str) -> Listing | None:
        key = (zone, str(address))
        cached = self._cache.get(key)
        if cached is not None:
            return cached[0]
        try:
            async with asyncio.timeout(self._timeout):
                result = await self._lookup(address, zone)
        except (TimeoutError, DNSError, ListError) as e:
            # Fail open: a broken list must not stop mail. Not cached, so it is asked again.
            log.warning(
                "DNSBL lookup failed; not refusing",
                extra={**subject(ip=str(address)), "zone": zone, "error": _describe(e)},
            )
            return None
        self._cache.put(key, (result,), self._cache_seconds)
        return result

    async def _lookup(self, address: IPAddress, zone: str) -> Listing | None:
        name = query_name(address, zone)
        answer = await self._resolver.query(name, "A")
        addresses = [r.address for r in answer.rdatas]  # type: ignore[attr-defined]
        codes = listing_codes(addresses)
        if not codes:
            return None
        try:
            texts = await self._resolver.txt(name)
        except DNSError:
            texts = []  # the listing stands without its explanation
        detail = clean_text(" ".join(t.decode("ascii", "replace") for t in texts))
        log.info("DNSBL listing", extra={**subject(ip=str(address)), "zone": zone})
        return Listing(zone, codes, detail)


def _check_zone(zone: str) -> str:
    text = zone.strip().rstrip(".").lower()
    try:
        to_name(text)
    except DNSNameError:
        raise DNSBLConfigError(f"DNSBL zone {zone!r} is not a DNS name") from None
    if "." not in text:
        raise DNSBLConfigError(f"DNSBL zone {zone!r} must have at least two labels")
    return text


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timeout"
    return str(error) or type(error).__name__
