"""MX selection (RFC 5321 §5.1, RFC 7505): which hosts to try for a domain, in which order.

The MX records are tried in order of preference, hosts of equal preference in random order
so that load spreads; a domain without MX records is its own mail host (the "implicit MX");
a null MX says the domain takes no mail at all, which is a permanent failure at once. Names
that can only point back at this machine ("localhost", our own name) are never used.
:func:`order_mx` is the pure part; :func:`mx_hosts` and :func:`host_addresses` ask DNS.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

from postvern.dns import DNSNameError, DNSTempError, Resolver
from postvern.dns.resolver import name_text, to_name

# RFC 5321 §5.1 lets a client limit the MX hosts it tries; Postfix tries 5 addresses per
# attempt. Ten hosts and four addresses each bound one attempt's DNS queries and connects.
MAX_MX_HOSTS = 10
MAX_ADDRESSES_PER_HOST = 4

# RFC 6761 §6.3: "localhost" and names under it always mean this machine; routing mail to them
# would deliver to ourselves (or to whatever listens locally) instead of the recipient.
_LOCALHOST_NAMES = frozenset({"localhost", "localhost.localdomain"})
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")  # RFC 1122 §3.2.1.3: "this host"


class RouteError(Exception):
    """No route to the domain now; ``permanent`` says whether retrying can help."""

    permanent = False
    status = "4.4.3"  # RFC 3463: directory server failure (DNS)

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class RouteTempError(RouteError):
    """DNS failed for now (SERVFAIL, timeout): retry later."""


class NullMX(RouteError):
    """RFC 7505 §3: the domain publishes a null MX: it accepts no mail."""

    permanent = True
    status = "5.1.10"  # RFC 7505 §4.2


class NoSuchDomain(RouteError):
    """The domain does not exist (NXDOMAIN) or has neither MX nor address records."""

    permanent = True
    status = "5.1.2"  # RFC 3463: bad destination system address


class NoUsableMX(RouteError):
    """Every MX name was refused ("localhost", ".") or resolves to no usable address."""

    permanent = True
    status = "5.4.4"  # RFC 3463: unable to route


class MailLoop(RouteError):
    """RFC 5321 §5.1: our own name is the most preferred MX; delivering would loop."""

    permanent = True
    status = "5.4.6"  # RFC 3463: routing loop detected


@dataclass(frozen=True, slots=True)
class MXHost:
    name: str  # lower-case A-label host name, no trailing dot
    preference: int
    implicit: bool = False  # the domain itself, used because it has no MX (§5.1)


def refused_host(name: str) -> bool:
    """Host names never used as a mail exchanger: the root (".") and localhost names."""
    name = name.lower().rstrip(".")
    return not name or name in _LOCALHOST_NAMES or name.endswith(".localhost")


def order_mx(
    records: list[tuple[int, str]], local_names: frozenset[str], rng: random.Random
) -> list[MXHost]:
    """Sort MX records for trying: preference order, equal preference shuffled (§5.1).

    Raises :class:`NullMX` for a null MX (RFC 7505 §3: a single MX whose host is ".") and
    :class:`MailLoop` when our own name is the best remaining choice. Our own name and every
    less preferred host are dropped (§5.1: "it MUST discard ... all less preferred").
    """
    if len(records) == 1 and records[0][1] == "":
        raise NullMX("the domain accepts no mail (null MX)")
    by_preference: dict[int, list[str]] = {}
    for preference, host in records:
        by_preference.setdefault(preference, []).append(host.lower().rstrip("."))
    ordered: list[MXHost] = []
    for preference in sorted(by_preference):
        names = by_preference[preference]
        if local_names.intersection(names):
            if not ordered:
                raise MailLoop("mail for the domain loops back to this server")
            break
        rng.shuffle(names)
        ordered += [MXHost(n, preference) for n in names if not refused_host(n)]
    if not ordered:
        raise NoUsableMX("no usable MX host (only localhost or null names)")
    return ordered[:MAX_MX_HOSTS]


async def mx_hosts(
    resolver: Resolver, domain: str, local_names: frozenset[str], rng: random.Random
) -> list[MXHost]:
    """The MX hosts to try for ``domain``, best first (the implicit MX if it has none)."""
    try:
        answer = await resolver.query(domain, "MX")
    except DNSTempError as e:
        raise RouteTempError(f"MX lookup failed: {e}") from None
    except DNSNameError:
        raise NoSuchDomain("not a valid domain name") from None
    if answer.nxdomain:
        raise NoSuchDomain("the domain does not exist")
    records = [
        (r.preference, name_text(r.exchange))  # type: ignore[attr-defined]
        for r in answer.rdatas
    ]
    if not records:
        # §5.1: no MX records: the domain is treated as its own MX with preference 0.
        name = name_text(to_name(domain))
        if refused_host(name) or name in local_names:
            raise NoUsableMX("the domain names this machine")
        return [MXHost(name, 0, implicit=True)]
    return order_mx(records, local_names, rng)


async def host_addresses(
    resolver: Resolver, host: str, *, allow_loopback: bool = False
) -> list[str]:
    """The addresses to connect to for one MX host: IPv4 first, then IPv6.

    Addresses no remote mail server can have are dropped: unspecified, "this network"
    (0.0.0.0/8), multicast, broadcast, and loopback unless ``allow_loopback`` (tests, where
    every server lives on 127.0.0.x). A hostile domain whose MX points at 127.0.0.1 would
    otherwise make this server deliver to itself or to whatever listens locally.
    IPv4 goes first because receivers check the sender's reverse DNS and many IPv6 sending
    addresses lack it; Postfix's "smtp_address_preference = any" shows both orders work.
    """
    try:
        found = await resolver.a(host) + await resolver.aaaa(host)
    except DNSTempError as e:
        raise RouteTempError(f"address lookup for {host} failed: {e}") from None
    except DNSNameError:
        return []
    usable = [a for a in found if usable_address(a, allow_loopback=allow_loopback)]
    return usable[:MAX_ADDRESSES_PER_HOST]


def usable_address(address: str, *, allow_loopback: bool = False) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.is_loopback and not allow_loopback:
        return False
    if isinstance(ip, ipaddress.IPv4Address) and (ip in _THIS_NETWORK or ip == _BROADCAST):
        return False
    return not (ip.is_unspecified or ip.is_multicast)
