"""Client addresses as the abuse layer counts them: one IPv4 address, or one IPv6 /64.

A single IPv6 host commonly holds a whole /64 (SLAAC subnets are /64, RFC 4291 §2.5.1; RFC
7934 asks networks to let hosts use many addresses), so counting per address would let it
walk through 2**64 fresh identities; every counter, ban and DNSBL cache entry is
therefore keyed by the /64. Greylisting groups a little wider (an IPv4 /24), so that a
sending farm retrying from a neighbouring address of its pool is still recognised.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# A /64 is the smallest network an IPv6 host can be expected to own (see the docstring).
IPV6_HOST_PREFIX = 64
# Greylisting treats the sending /24 (IPv4) or /64 (IPv6) as one client, since large
# senders retry from another address of the same pool (postgrey's long-standing default).
GREYLIST_IPV4_PREFIX = 24
GREYLIST_IPV6_PREFIX = 64


class AddressError(ValueError):
    """The text is not an IP address or network."""


def parse_ip(text: str) -> IPAddress:
    """An address, with IPv4-mapped IPv6 (``::ffff:192.0.2.1``) turned back into IPv4.

    Dual-stack listeners report IPv4 peers in the mapped form; without this the same client
    would be counted under two keys.
    """
    try:
        address = ipaddress.ip_address(text.strip().split("%", 1)[0])
    except ValueError:
        raise AddressError("not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_network(address: IPAddress) -> IPNetwork:
    """The network one client owns: the address itself (IPv4) or its /64 (IPv6)."""
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv4Network(address)
    return ipaddress.IPv6Network((address, IPV6_HOST_PREFIX), strict=False)


def client_key(ip: str | IPAddress) -> str:
    """The text every per-client counter and ban is keyed by ("192.0.2.1", "2001:db8::/64")."""
    address = parse_ip(ip) if isinstance(ip, str) else ip
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)
    return str(client_network(address))


def greylist_key(ip: str | IPAddress) -> str:
    """The sending network greylisting remembers: a /24 or a /64."""
    address = parse_ip(ip) if isinstance(ip, str) else ip
    prefix = (
        GREYLIST_IPV4_PREFIX if isinstance(address, ipaddress.IPv4Address) else GREYLIST_IPV6_PREFIX
    )
    return str(ipaddress.ip_network((address, prefix), strict=False))


def parse_network(text: str) -> IPNetwork:
    """An address or CIDR network as given by an operator, host bits ignored.

    A single address becomes its client network (an IPv6 address its /64), and an IPv6
    prefix longer than /64 is widened to /64: nothing narrower is ever counted or banned.
    """
    raw = text.strip()
    if "/" not in raw:
        return client_network(parse_ip(raw))
    try:
        network = ipaddress.ip_network(raw, strict=False)
    except ValueError:
        raise AddressError("not an IP network") from None
    if isinstance(network, ipaddress.IPv6Network):
        mapped = network.network_address.ipv4_mapped
        if mapped is not None and network.prefixlen >= 96:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96), strict=False)
        if network.prefixlen > IPV6_HOST_PREFIX:
            return network.supernet(new_prefix=IPV6_HOST_PREFIX)
    return network


def network_key(network: IPNetwork) -> str:
    """The key of a network: a host key for one client, else the CIDR text."""
    if isinstance(network, ipaddress.IPv4Network) and network.prefixlen == 32:
        return str(network.network_address)
    return str(network)


class Allowlist:
    """Networks exempt from every limit, ban, DNSBL and greylisting check.

    Entries are CIDR networks or single addresses; a malformed entry is a configuration
    error, raised at start rather than silently ignored.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        networks: list[IPNetwork] = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise AddressError(f"allowlist entry {entry!r} is not an IP network") from None
        self._networks = tuple(networks)

    def __len__(self) -> int:
        return len(self._networks)

    def __contains__(self, ip: object) -> bool:
        if not isinstance(ip, str | ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        try:
            address = parse_ip(ip) if isinstance(ip, str) else ip
        except AddressError:
            return False
        return any(address in network for network in self._networks)

    def covers(self, network: IPNetwork) -> bool:
        """Whether any part of ``network`` is allowlisted (so banning it would bite)."""
        return any(network.overlaps(entry) for entry in self._networks)
