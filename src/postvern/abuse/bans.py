"""Bans: which client networks are refused at the door, until when, and why.

A ban is what fail2ban would add to a firewall, kept inside the server: repeated failed
logins or recipient enumeration ban the client network for ``ban_seconds``, doubling with
every repeat offence up to ``ban_max_seconds``. The :class:`BanIndex` answers "is this
address banned?" from memory without awaiting anything, so listeners can ask it the moment
a connection is accepted, before any work is spent on it.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from postvern.abuse.network import (
    AddressError,
    IPAddress,
    IPNetwork,
    client_key,
    network_key,
    parse_ip,
    parse_network,
)

# A repeat offender's record outlives its ban by this long, so that coming back next week
# still doubles the ban. fail2ban's "recidive" jail looks back one day; botnets that rotate
# through their addresses return on a scale of weeks.
OFFENCE_MEMORY_SECONDS = 30 * 86400
# 2**40 base bans is past any cap anyone configures; bounding the exponent keeps the
# arithmetic small whatever the offence count.
MAX_DOUBLINGS = 40
# Operator bans of networks wider than one client are checked one by one at every
# connection; past this many, an operator wants a firewall, not this list.
MAX_WIDE_BANS = 10_000
# Operator input: the longest ban that can be typed (ten years), and the longest reason.
MAX_BAN_SECONDS = 10 * 365 * 86400
MAX_REASON = 200

_DURATION_PART = re.compile(r"(\d+)([smhdw]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class BanError(ValueError):
    """An operator's ban request cannot be carried out (bad address, duration, allowlisted)."""


@dataclass(frozen=True, slots=True)
class Ban:
    """One banned network.

    ``network`` is its key: an IPv4 address, an IPv6 /64, or a wider CIDR network an
    operator banned. Times are seconds since the epoch, so they survive restarts.
    ``offences`` counts bans within the offence memory; ``updated`` orders copies of the
    same record from different nodes (the newer one wins).
    """

    network: str
    until: float
    reason: str
    offences: int
    created: float
    updated: float

    def active(self, now: float) -> bool:
        return self.until > now


@dataclass(frozen=True, slots=True)
class BanPolicy:
    base_seconds: float
    max_seconds: float
    memory_seconds: float = OFFENCE_MEMORY_SECONDS

    def __post_init__(self) -> None:
        if self.base_seconds <= 0 or self.max_seconds < self.base_seconds:
            raise ValueError("ban_seconds must be positive and at most ban_max_seconds")

    def duration(self, offences: int) -> float:
        """The ban for the n-th offence: the base, doubled per repeat, capped."""
        doublings = min(max(offences - 1, 0), MAX_DOUBLINGS)
        return float(min(self.base_seconds * 2**doublings, self.max_seconds))

    def remembered(self, ban: Ban, now: float) -> bool:
        """Whether ``ban`` still counts as a previous offence at ``now``."""
        return ban.until + self.memory_seconds > now

    def offend(self, previous: Ban | None, network: str, reason: str, now: float) -> Ban:
        """The ban for a new offence, given the network's earlier record if any."""
        offences = 1
        if previous is not None and self.remembered(previous, now):
            offences = previous.offences + 1
        until = max(now + self.duration(offences), previous.until if previous else 0.0)
        return Ban(network, until, reason, offences, now, now)


def utc_text(epoch: float) -> str:
    """A time as operators and clients read it: ``2025-06-01 14:03:00Z``."""
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(epoch))


def parse_duration(text: str) -> int:
    """Seconds from ``"3600"``, ``"10m"``, ``"2h"``, ``"7d"``, ``"1w"`` or ``"1h30m"``."""
    raw = text.strip().lower()
    if not raw or not re.fullmatch(r"(\d+[smhdw]?)+", raw):
        raise BanError(f"{text!r} is not a duration (e.g. 3600, 10m, 2h, 7d)")
    total = sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(raw))
    if not 0 < total <= MAX_BAN_SECONDS:
        raise BanError("a ban lasts between one second and ten years")
    return total


def operator_network(text: str) -> IPNetwork:
    """An operator's address or CIDR network, or BanError."""
    try:
        return parse_network(text)
    except AddressError:
        raise BanError(f"{text!r} is not an IP address or network") from None


class BanIndex:
    """Every ban record in memory: one dict lookup per client, then the few wide bans."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._clients: dict[str, Ban] = {}
        self._wide: dict[str, tuple[IPNetwork, Ban]] = {}

    def __len__(self) -> int:
        return len(self._clients) + len(self._wide)

    def __iter__(self) -> Iterator[Ban]:
        yield from self._clients.values()
        yield from (ban for _, ban in self._wide.values())

    def lookup(self, ip: str) -> Ban | None:
        """The active ban covering ``ip``, or None (also for text that is not an address)."""
        try:
            address = parse_ip(ip)
        except AddressError:
            return None
        return self.lookup_parsed(address, client_key(address))

    def lookup_parsed(self, address: IPAddress, key: str) -> Ban | None:
        """:meth:`lookup` for an address already parsed, with its ``client_key``."""
        now = self._clock()
        ban = self._clients.get(key)
        if ban is not None and ban.active(now):
            return ban
        for network, wide in self._wide.values():
            if wide.active(now) and address in network:
                return wide
        return None

    def get(self, key: str) -> Ban | None:
        """The record under ``key``, active or only remembered."""
        found = self._clients.get(key)
        if found is None and key in self._wide:
            found = self._wide[key][1]
        return found

    def put(self, ban: Ban) -> bool:
        """Store ``ban`` unless a newer copy is held; True if it changed anything."""
        current = self.get(ban.network)
        if current is not None and current.updated > ban.updated:
            return False
        if current == ban:
            return False
        network = parse_network(ban.network)
        if network_key(network) != ban.network:
            raise BanError("ban key is not in canonical form")
        if _is_client(network):
            self._clients[ban.network] = ban
        else:
            if ban.network not in self._wide and len(self._wide) >= MAX_WIDE_BANS:
                raise BanError(f"more than {MAX_WIDE_BANS} network bans; use a firewall")
            self._wide[ban.network] = (network, ban)
        return True

    def remove(self, key: str) -> Ban | None:
        removed = self._clients.pop(key, None)
        if removed is None and key in self._wide:
            removed = self._wide.pop(key)[1]
        return removed

    def replace_all(self, bans: list[Ban]) -> None:
        self._clients.clear()
        self._wide.clear()
        for ban in bans:
            self.put(ban)

    def forgotten(self, policy: BanPolicy, now: float) -> list[str]:
        """Keys of records past their offence memory: they can be dropped everywhere."""
        return [ban.network for ban in self if not policy.remembered(ban, now)]


def _is_client(network: IPNetwork) -> bool:
    if isinstance(network, ipaddress.IPv4Network):
        return network.prefixlen == 32
    return network.prefixlen == 64
