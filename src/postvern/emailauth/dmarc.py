"""Domain-based Message Authentication, Reporting and Conformance (RFC 7489).

DMARC ties SPF and DKIM to the address a reader sees, the RFC 5322 From: a message passes
when SPF or DKIM passes for a domain aligned with the From domain, and the From domain's
owner publishes, at _dmarc.<domain>, what receivers should do with mail that does not pass.
Record parsing and alignment are pure functions; only policy discovery touches DNS.
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import functools
import random
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from publicsuffixlist import PublicSuffixList

from postvern.dns import DNSNameError, DNSTempError, Resolver
from postvern.emailauth import dkim, spf
from postvern.emailauth.headers import ParsedMessage

# RFC 7489 §6.1: policy records live under this label.
RECORD_LABEL = "_dmarc"
# §6.3: "v=DMARC1" must be the first tag, exactly.
VERSION = "DMARC1"
_DMARC_START = re.compile(r"v\s*=\s*DMARC1\s*(;|$)")
# A From field naming more domains than this is not evaluated further: each costs DNS
# lookups, and §6.6.1 notes such messages are typically rejected anyway.
MAX_FROM_DOMAINS = 5


class Status(enum.StrEnum):
    """DMARC result (RFC 7489 §11.2, RFC 8601 §2.7.7)."""

    NONE = "none"  # no policy published
    PASS = "pass"  # noqa: S105 (not a password) aligned SPF or DKIM pass
    FAIL = "fail"  # neither passed aligned
    TEMPERROR = "temperror"  # the policy could not be fetched for now
    PERMERROR = "permerror"  # the policy or the From field is unusable


class Policy(enum.StrEnum):
    """Requested handling of failing mail (§6.3 p= and sp=)."""

    NONE = "none"
    QUARANTINE = "quarantine"
    REJECT = "reject"


# §6.6.4: mail not sampled by pct= gets the next less strict policy.
_SOFTER = {Policy.REJECT: Policy.QUARANTINE, Policy.QUARANTINE: Policy.NONE}
_STRICTNESS = {Policy.NONE: 0, Policy.QUARANTINE: 1, Policy.REJECT: 2}


class RecordError(ValueError):
    """A DMARC record without a usable p= (and no rua= to fall back on, §6.6.3 step 6)."""


@dataclass(frozen=True)
class Record:
    policy: Policy
    subdomain_policy: Policy | None = None
    strict_dkim: bool = False  # adkim=s
    strict_spf: bool = False  # aspf=s
    pct: int = 100
    rua: tuple[str, ...] = ()


@dataclass(frozen=True)
class Result:
    status: Status
    from_domain: str = ""
    policy_domain: str = ""  # where the record was found ("" if none)
    record: Record | None = None
    requested: Policy = Policy.NONE  # p= or sp=, whichever applies
    disposition: Policy = Policy.NONE  # what to do, after pct= sampling
    spf_aligned: bool = False
    dkim_aligned: str = ""  # d= of the aligned passing signature, if any
    # Failed, but an SPF or DKIM temperror on an aligned identity might have passed.
    uncertain: bool = False
    reason: str = ""


# -- record (§6.3) --------------------------------------------------------------------------


def _tags(text: str) -> list[tuple[str, str]]:
    pairs = []
    for spec in text.split(";"):
        if spec.strip():
            name, sep, val = spec.partition("=")
            if not sep:
                raise RecordError("tag without '='")
            pairs.append((name.strip(), val.strip()))
    return pairs


def _policy(text: str | None) -> Policy | None:
    try:
        return Policy(text.lower()) if text is not None else None
    except ValueError:
        return None


def parse_record(text: str) -> Record | None:
    """A record, None if the text is not DMARC; RecordError if it is but has no usable p=."""
    try:
        tags = _tags(text)
    except RecordError:
        return None
    if not tags or tags[0] != ("v", VERSION):
        return None
    values = dict(reversed(tags))  # the first occurrence of a tag wins
    uris = (u.strip() for u in values.get("rua", "").split(","))
    rua = tuple(u for u in uris if u.lower().startswith("mailto:"))
    policy = _policy(values.get("p"))
    subdomain = _policy(values.get("sp"))
    if policy is None or ("sp" in values and subdomain is None):
        if not rua:
            raise RecordError("record has no valid p= (or an invalid sp=) and no rua=")
        policy, subdomain = Policy.NONE, None  # §6.6.3 step 6.1
    pct = values.get("pct", "100")
    return Record(
        policy=policy,
        subdomain_policy=subdomain,
        strict_dkim=values.get("adkim", "r").lower() == "s",
        strict_spf=values.get("aspf", "r").lower() == "s",
        pct=int(pct) if pct.isdigit() and int(pct) <= 100 else 100,  # §6.3: default on error
        rua=rua,
    )


# -- domains and alignment (§3.2, §3.1) ------------------------------------------------------


# Parsing the list once: many messages arriving together after a start would otherwise
# each parse their own copy in a worker thread (several MiB each) before the cache fills.
_PSL_LOCK = threading.Lock()


@functools.cache
def _public_suffixes() -> PublicSuffixList:
    # The list ships inside the publicsuffixlist package: no network access, ever.
    with _PSL_LOCK:
        return _parsed_once()


@functools.cache
def _parsed_once() -> PublicSuffixList:
    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """§3.2: the registered domain (public suffix plus one label) per the Public Suffix List."""
    domain = domain.lower().rstrip(".")
    return _public_suffixes().privatesuffix(domain) or domain


def aligned(identifier: str, from_domain: str, strict: bool) -> bool:
    """§3.1: the same domain (strict), or the same organizational domain (relaxed)."""
    a, b = identifier.lower().rstrip("."), from_domain.lower().rstrip(".")
    if not a or not b:
        return False
    return a == b if strict else organizational_domain(a) == organizational_domain(b)


def from_domains(message: bytes | ParsedMessage) -> list[str] | str:
    """The RFC 5322.From domains (A-labels), or the reason there are none usable."""
    fields = ParsedMessage.of(message).block.get_all("From")
    if len(fields) != 1:
        # §6.6.1: RFC 5322 requires exactly one From field; anything else is not mail we
        # can attribute to a domain.
        return f"message has {len(fields)} From fields"
    addresses = email.utils.getaddresses([fields[0].text()])
    domains = []
    for _, address in addresses:
        _, at, domain = address.rpartition("@")
        domain = domain.strip().rstrip(".").lower()
        if not at or not domain:
            return "From has no address with a domain"
        try:
            domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
        except UnicodeError:
            return "From domain is not a valid domain name"
        if domain not in domains:
            domains.append(domain)
    return domains or "From has no address"


# -- policy discovery (§6.6.3) ---------------------------------------------------------------


async def _records_at(resolver: Resolver, domain: str) -> list[str]:
    try:
        txts = await resolver.txt(f"{RECORD_LABEL}.{domain}")
    except DNSNameError:
        return []
    return [t.decode("utf-8", "replace") for t in txts]


async def discover(resolver: Resolver, from_domain: str) -> tuple[Record | None, str]:
    """(record, domain it was found at); DNSTempError and RecordError propagate."""
    candidates = [from_domain]
    organizational = organizational_domain(from_domain)
    if organizational != from_domain:
        candidates.append(organizational)
    for domain in candidates:
        texts = [t for t in await _records_at(resolver, domain) if _DMARC_START.match(t)]
        if len(texts) > 1:
            return None, ""  # step 4: several records, so no DMARC processing
        if texts:
            return parse_record(texts[0]), domain
    return None, ""


# -- evaluation (§6.6.2, §6.6.4) -------------------------------------------------------------


async def evaluate(
    message: bytes | ParsedMessage,
    spf_result: spf.Result,
    dkim_results: Sequence[dkim.Result],
    resolver: Resolver,
    *,
    sample: Callable[[], float] = random.random,
) -> Result:
    """DMARC for a received message, given its SPF (MAIL FROM identity) and DKIM results.

    ``sample`` draws in [0, 1) for pct= (§6.6.4); tests inject a fixed value.
    """
    domains = from_domains(message)
    if isinstance(domains, str):
        return Result(Status.PERMERROR, reason=domains)
    if not _public_suffixes.cache_info().currsize:
        await asyncio.to_thread(_public_suffixes)  # parsing the list takes ~0.1 s: not on the loop
    results = [
        await _evaluate_domain(d, spf_result, dkim_results, resolver, sample)
        for d in domains[:MAX_FROM_DOMAINS]
    ]
    return _combine(results)


def _combine(results: list[Result]) -> Result:
    """§6.6.1: several From domains: the strictest failing policy wins."""
    if len(results) == 1:
        return results[0]
    failing = [r for r in results if r.status is Status.FAIL]
    if failing:
        return max(failing, key=lambda r: _STRICTNESS[r.disposition])
    for status in (Status.TEMPERROR, Status.PERMERROR, Status.NONE):
        for r in results:
            if r.status is status:
                return r
    return results[0]


async def _evaluate_domain(
    from_domain: str,
    spf_result: spf.Result,
    dkim_results: Sequence[dkim.Result],
    resolver: Resolver,
    sample: Callable[[], float],
) -> Result:
    try:
        record, policy_domain = await discover(resolver, from_domain)
    except DNSTempError:
        unknown = _identifier_result(from_domain, spf_result, dkim_results, None)
        return replace(unknown, status=Status.TEMPERROR, reason="policy lookup failed for now")
    except RecordError as e:
        return Result(Status.PERMERROR, from_domain, reason=str(e))
    if record is None:
        unpublished = _identifier_result(from_domain, spf_result, dkim_results, None)
        return replace(unpublished, reason="no DMARC policy")
    base = _identifier_result(from_domain, spf_result, dkim_results, record)
    is_subdomain = policy_domain != from_domain
    requested = (record.subdomain_policy or record.policy) if is_subdomain else record.policy
    if base.spf_aligned or base.dkim_aligned:
        return replace(
            base,
            status=Status.PASS,
            policy_domain=policy_domain,
            requested=requested,
            reason="aligned SPF pass" if base.spf_aligned else "aligned DKIM pass",
        )
    disposition = requested
    if sample() * 100 >= record.pct:
        disposition = _SOFTER.get(requested, Policy.NONE)
    return replace(
        base,
        status=Status.FAIL,
        policy_domain=policy_domain,
        requested=requested,
        disposition=disposition,
        reason="no aligned SPF or DKIM pass",
    )


def _identifier_result(
    from_domain: str,
    spf_result: spf.Result,
    dkim_results: Sequence[dkim.Result],
    record: Record | None,
) -> Result:
    """§3.1 alignment of the SPF domain and each DKIM d= with the From domain (status none).

    Without a record the alignment mode is unknown, so only strict alignment counts.
    """
    strict_spf = record.strict_spf if record else True
    strict_dkim = record.strict_dkim if record else True
    spf_ok = spf_result.status is spf.Status.PASS and aligned(
        spf_result.domain, from_domain, strict_spf
    )
    dkim_domain = next(
        (
            r.domain
            for r in dkim_results
            if r.status is dkim.Status.PASS and aligned(r.domain, from_domain, strict_dkim)
        ),
        "",
    )
    # A temporary failure on an identifier that would align (relaxed: the loosest a record
    # may ask for) could have been a pass: the verdict is not final.
    uncertain = (
        spf_result.status is spf.Status.TEMPERROR and aligned(spf_result.domain, from_domain, False)
    ) or any(
        r.status is dkim.Status.TEMPERROR and aligned(r.domain, from_domain, False)
        for r in dkim_results
    )
    return Result(
        Status.NONE,
        from_domain,
        record=record,
        spf_aligned=spf_ok,
        dkim_aligned=dkim_domain,
        uncertain=uncertain,
    )
