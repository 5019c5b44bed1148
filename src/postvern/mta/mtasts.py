"""SMTP MTA Strict Transport Security (RFC 8461): which MX hosts a domain vouches for.

A domain publishes a TXT record at ``_mta-sts.<domain>`` and a policy file on
``https://mta-sts.<domain>/.well-known/mta-sts.txt`` naming its MX hosts; in ``enforce`` mode
a sender must deliver only to those hosts, only over TLS with a certificate valid for the MX
name, and keep the mail queued otherwise. The record and policy parsers and the MX matching
are pure functions (§3.1, §3.2, §4.1); :class:`STSResolver` discovers, fetches and caches
policies (§3.3, §5.1) in the queue database.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from postvern.dns import DNSError, DNSNameError, Resolver
from postvern.dns.resolver import name_text, to_name
from postvern.mta import httpsget

log = logging.getLogger(__name__)

# §3.1: the record's version, compared exactly.
TXT_VERSION = "STSv1"
# §3.1: sts-id = 1*32( ALPHA / DIGIT ).
MAX_ID_LENGTH = 32
# §3.2: max_age is at most 31557600 seconds (about one year).
MAX_MAX_AGE = 31_557_600
# §3.2 puts no bound on the number of mx patterns; the 64 KB body limit bounds memory, and a
# real policy names a handful. More than this is refused as not being a real policy.
MAX_MX_PATTERNS = 200
# §3.3: the well-known path and the host label in front of the policy domain.
POLICY_PATH = "/.well-known/mta-sts.txt"
POLICY_HOST_LABEL = "mta-sts"
TXT_LABEL = "_mta-sts"

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_FIELD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


class Mode(enum.StrEnum):
    """§5: what a sender does when an MX host fails the policy."""

    ENFORCE = "enforce"  # do not deliver; keep the message queued
    TESTING = "testing"  # deliver anyway, report the failure (TLSRPT, RFC 8460)
    NONE = "none"  # the domain has withdrawn its policy


class PolicyError(ValueError):
    """The TXT record or the policy text does not follow RFC 8461."""


class PolicyFetchError(Exception):
    """The policy could not be fetched (DNS, TLS, HTTP status, media type, size)."""


@dataclass(frozen=True, slots=True)
class Policy:
    mode: Mode
    mx: tuple[str, ...]  # patterns, lower-case A-labels: "mx.example.org", "*.example.org"
    max_age: int  # seconds

    def matches(self, host: str) -> bool:
        """Whether an MX host name is one the policy names (§4.1)."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


# --- §3.1 the TXT record --------------------------------------------------------------------


def parse_txt_records(records: list[bytes]) -> str | None:
    """The policy id from the TXT records at ``_mta-sts.<domain>``, or None.

    §3.1: records not starting with ``v=STSv1;`` are discarded; unless exactly one remains
    and it is valid, the domain is treated as having no policy record (None).
    """
    candidates = [r for r in records if r.startswith(b"v=STSv1")]
    if len(candidates) != 1:
        return None
    try:
        return parse_txt(candidates[0].decode("ascii"))
    except (PolicyError, UnicodeDecodeError):
        return None


def parse_txt(record: str) -> str:
    """``v=STSv1; id=20160831085700Z;`` → the id. Extension fields are allowed (§3.1)."""
    fields = [f.strip(" \t") for f in record.split(";")]
    if fields and fields[-1] == "":
        fields.pop()
    if not fields or fields[0] != f"v={TXT_VERSION}":
        raise PolicyError("record does not start with v=STSv1")
    policy_id = None
    for item in fields[1:]:
        name, eq, value = item.partition("=")
        if not eq or not _FIELD_NAME.fullmatch(name):
            raise PolicyError("malformed field in the record")
        if name == "id":
            if policy_id is not None or not _ID.fullmatch(value):
                raise PolicyError("missing, repeated or malformed id")
            policy_id = value
    if policy_id is None:
        raise PolicyError("record has no id")
    return policy_id


# --- §3.2 the policy file -------------------------------------------------------------------


def parse_policy(text: bytes) -> Policy:
    """Parse the policy body: ``key: value`` lines separated by CRLF or LF (§3.2).

    ``version``, ``mode`` and ``max_age`` are required; ``mx`` too unless the mode is none.
    Unknown keys are extensions and ignored; a repeated singular key is an error.
    """
    if len(text) > httpsget.MAX_BODY:
        raise PolicyError("policy larger than 64 KB")
    try:
        lines = text.decode("utf-8").replace("\r\n", "\n").split("\n")
    except UnicodeDecodeError:
        raise PolicyError("policy is not UTF-8 text") from None
    singular: dict[str, str] = {}
    patterns: list[str] = []
    for line in lines:
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        key, value = key.strip(), value.strip(" \t")
        if not colon or not _FIELD_NAME.fullmatch(key):
            raise PolicyError("malformed policy line")
        if key == "mx":
            patterns.append(_mx_pattern(value))
            if len(patterns) > MAX_MX_PATTERNS:
                raise PolicyError("too many mx patterns")
        elif key in ("version", "mode", "max_age"):
            if key in singular:
                raise PolicyError(f"repeated {key} field")
            singular[key] = value
    return _policy(singular, patterns)


def _policy(fields: dict[str, str], patterns: list[str]) -> Policy:
    if fields.get("version") != TXT_VERSION:
        raise PolicyError("policy version is not STSv1")
    try:
        mode = Mode(fields.get("mode", ""))
    except ValueError:
        raise PolicyError("policy mode is not enforce, testing or none") from None
    max_age_text = fields.get("max_age", "")
    # §3.2: max_age = 1*10DIGIT, at most 31557600.
    if not max_age_text.isdigit() or len(max_age_text) > 10:
        raise PolicyError("policy max_age is not a number")
    max_age = min(int(max_age_text), MAX_MAX_AGE)
    if mode is not Mode.NONE and not patterns:
        raise PolicyError("policy names no mx")
    return Policy(mode, tuple(patterns), max_age)


def _mx_pattern(value: str) -> str:
    """An mx value: a host name, or ``*.`` followed by one (§3.2, §4.1)."""
    wildcard = value.startswith("*.")
    base = value[2:] if wildcard else value
    if not base or "*" in base:
        raise PolicyError("malformed mx pattern")
    try:
        name = name_text(to_name(base))
    except DNSNameError:
        raise PolicyError("malformed mx pattern") from None
    return f"*.{name}" if wildcard else name


def mx_matches(pattern: str, host: str) -> bool:
    """§4.1: exact match, or ``*.example.org`` matching exactly one more leftmost label."""
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern


def policy_host(domain: str) -> str:
    return f"{POLICY_HOST_LABEL}.{domain}"


# --- §3.3, §5.1 discovery, fetch and cache --------------------------------------------------


@dataclass(frozen=True, slots=True)
class CachedPolicy:
    policy_id: str
    policy: Policy
    expires: float  # unix time: fetched + max_age


class PolicyStore(Protocol):
    """Where fetched policies are kept across restarts (the queue database)."""

    async def get_policy(self, domain: str) -> CachedPolicy | None: ...

    async def put_policy(self, domain: str, cached: CachedPolicy) -> None: ...


class STSResolver:
    """The MTA-STS policy in force for a recipient domain, if any (§5.1).

    The TXT record is looked up for every delivery (the DNS cache keeps that cheap); the
    policy is fetched only when there is no valid cached one or the record's id changed.
    A domain whose TXT record disappears keeps its cached policy until max_age runs out, so
    an attacker who strips the record cannot downgrade a domain that was seen before.
    """

    def __init__(
        self,
        resolver: Resolver,
        store: PolicyStore,
        context: ssl.SSLContext,
        *,
        port: int = 443,
        timeout: float = httpsget.FETCH_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._resolver = resolver
        self._store = store
        self._context = context
        self._port = port
        self._timeout = timeout
        self._clock = clock
        self._locks: dict[str, list[Any]] = {}
        self.fetches = 0  # policies fetched over HTTPS since start (for metrics and tests)

    async def policy_for(self, domain: str) -> Policy | None:
        """The policy to apply to delivery to ``domain``; None: no MTA-STS (opportunistic).

        Never raises for the domain's faults: §3.3 says a policy that cannot be fetched is
        treated as absent unless a valid one is cached.
        """
        async with self._domain_lock(domain):
            cached = await self._valid_cached(domain)
            policy_id = await self._txt_id(domain)
            if policy_id is None or (cached is not None and cached.policy_id == policy_id):
                return _effective(cached)
            fresh = await self._refresh(domain, policy_id)
            return _effective(fresh or cached)

    @contextlib.asynccontextmanager
    async def _domain_lock(self, domain: str) -> AsyncIterator[None]:
        """One discovery per domain at a time, so parallel deliveries fetch a policy once.
        The lock lives only while someone holds or awaits it: the map cannot grow."""
        entry = self._locks.setdefault(domain, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[domain]

    async def _valid_cached(self, domain: str) -> CachedPolicy | None:
        cached = await self._store.get_policy(domain)
        if cached is None or cached.expires <= self._clock():
            return None
        return cached

    async def _txt_id(self, domain: str) -> str | None:
        try:
            records = await self._resolver.txt(f"{TXT_LABEL}.{domain}")
        except DNSError as e:
            # §5.1: a failed lookup is not a signal; the cached policy (if any) still applies.
            log.info("mta-sts: TXT lookup for %s failed: %s", domain, e)
            return None
        return parse_txt_records(records)

    async def _refresh(self, domain: str, policy_id: str) -> CachedPolicy | None:
        try:
            policy = await self.fetch(domain)
        except (PolicyFetchError, PolicyError) as e:
            log.warning("mta-sts: policy for %s not usable: %s", domain, e)
            return None
        cached = CachedPolicy(policy_id, policy, self._clock() + policy.max_age)
        await self._store.put_policy(domain, cached)
        log.info("mta-sts: %s policy id %s, mode %s", domain, policy_id, policy.mode)
        return cached

    async def fetch(self, domain: str) -> Policy:
        """Fetch and parse the policy file over HTTPS with certificate validation (§3.3)."""
        host = policy_host(domain)
        addresses = await self._addresses(host)
        self.fetches += 1
        last_error = "no address"
        for address in addresses:
            try:
                response = await httpsget.fetch(
                    address, self._port, host, POLICY_PATH, self._context, time_limit=self._timeout
                )
            except httpsget.HTTPError as e:
                last_error = str(e)
                continue
            return _policy_from(response)
        raise PolicyFetchError(f"cannot fetch the policy from {host}: {last_error}")

    async def _addresses(self, host: str) -> list[str]:
        try:
            return await self._resolver.a(host) + await self._resolver.aaaa(host)
        except DNSError as e:
            raise PolicyFetchError(f"cannot resolve {host}: {e}") from None


def _policy_from(response: httpsget.Response) -> Policy:
    # §3.3: only a 200 counts, and redirects MUST NOT be followed.
    if response.status != 200:
        raise PolicyFetchError(f"policy host answered HTTP {response.status}")
    # §3.2: the policy is served as text/plain.
    if response.media_type != "text/plain":
        raise PolicyFetchError("policy is not served as text/plain")
    return parse_policy(response.body)


def _effective(cached: CachedPolicy | None) -> Policy | None:
    """A cached mode "none" policy means the domain withdrew MTA-STS (§8.3)."""
    if cached is None or cached.policy.mode is Mode.NONE:
        return None
    return cached.policy
