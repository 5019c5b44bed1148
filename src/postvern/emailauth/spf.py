"""Sender Policy Framework (RFC 7208): is this IP allowed to send mail for this domain?

A domain publishes, in a DNS TXT record, the hosts that may use it in the SMTP MAIL FROM and
HELO identities; ``check_host()`` evaluates that policy for the connecting IP. The code is cut
along the RFC's steps: ``verify_mailfrom`` and ``verify_helo`` pick the identity (§2.3,
§2.4), ``check_host`` validates the domain (§4.3), ``lookup`` finds the record (§4.4, §4.5),
``parse_record`` checks its syntax (§4.6, §12), and ``_Evaluation`` runs the mechanisms and
modifiers (§5, §6) under the processing limits of §4.6.4, expanding macros (§7) as needed.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import ipaddress
import logging
import re
import time
import urllib.parse
from dataclasses import dataclass

from postvern.dns import DNSNameError, DNSTempError, Resolver

log = logging.getLogger(__name__)

# §4.6.4: terms that cause DNS queries (include, a, mx, ptr, exists, redirect) are limited to
# 10 per check_host() evaluation, including nested ones; this limit aims to prevent a record
# from making receivers flood a third party's DNS servers.
MAX_DNS_MECHANISMS = 10
# §4.6.4: lookups answering NXDOMAIN or no records are limited to two; a third is a
# permerror. This stops records built to make receivers query random names.
MAX_VOID_LOOKUPS = 2
# §4.6.4: an "mx" mechanism checks at most 10 MX names; more is a permerror.
MAX_MX_NAMES = 10
# §4.6.4: "ptr" and %{p} look up addresses for at most 10 PTR names; the rest are ignored.
MAX_PTR_NAMES = 10
# §4.6.4: a whole evaluation SHOULD be bounded in time and allow at least 20 seconds.
ELAPSED_LIMIT = 20.0
# §7.3: a name produced by macro expansion is cut from the left to the DNS maximum.
MAX_DOMAIN_LENGTH = 253
# RFC 1035 §2.3.4.
MAX_LABEL_LENGTH = 63
# An explanation ends up in an SMTP reply (RFC 5321 §4.5.3.1.5: 512-octet lines).
MAX_EXPLANATION_LENGTH = 400
# A macro's DIGIT transformer beyond this many digits keeps every part anyway (§7.3).
MAX_TRANSFORMER_DIGITS = 3

# §4.5: the version term, compared case-insensitively.
VERSION = b"v=spf1"
# Parsed records kept by their text (see ``_parsed``): a few hundred bytes each.
PARSED_RECORDS = 1024
# §7.1: macro letters, and those allowed only in explanation text.
MACRO_LETTERS = frozenset("slodipvh")
EXPLANATION_ONLY_LETTERS = frozenset("crt")
MACRO_DELIMITERS = frozenset(".-+,/_=")
# §7.1: what a receiver names itself in %{r} when nothing better is configured.
UNKNOWN_RECEIVER = "unknown"


class Status(enum.StrEnum):
    """The result of an SPF check (§2.6)."""

    NONE = "none"  # no SPF record, or no valid domain to check
    NEUTRAL = "neutral"  # the domain makes no assertion about this IP
    PASS = "pass"  # noqa: S105 (not a password) the IP is authorized
    FAIL = "fail"  # the IP is explicitly not authorized
    SOFTFAIL = "softfail"  # probably not authorized; a weak fail
    TEMPERROR = "temperror"  # a transient (DNS) error; try again later
    PERMERROR = "permerror"  # the record is broken; only its publisher can fix it


QUALIFIERS = {"+": Status.PASS, "-": Status.FAIL, "~": Status.SOFTFAIL, "?": Status.NEUTRAL}


class SPFError(Exception):
    """Base of the errors that end an evaluation."""


class TempError(SPFError):
    """A DNS lookup failed for now: the result is temperror."""


class PermError(SPFError):
    """The policy cannot be evaluated as published: the result is permerror."""


class RecordSyntaxError(PermError):
    """A term of the record does not follow the grammar of §12."""


class MacroSyntaxError(RecordSyntaxError):
    """A macro-string does not follow §7.1."""


class MultipleRecordsError(PermError):
    """The domain publishes more than one SPF record (§4.5)."""


class TooManyDNSLookupsError(PermError):
    """More than MAX_DNS_MECHANISMS terms needed DNS (§4.6.4)."""


class TooManyVoidLookupsError(PermError):
    """More than MAX_VOID_LOOKUPS lookups found nothing (§4.6.4)."""


class TooManyMXNamesError(PermError):
    """An "mx" mechanism found more than MAX_MX_NAMES MX records (§4.6.4)."""


class MissingRecordError(PermError):
    """An include or redirect names a domain without an SPF record (§5.2, §6.1)."""


@dataclass(frozen=True)
class Mechanism:
    """One directive (§5): a qualifier and a mechanism with its arguments."""

    qualifier: Status
    kind: str  # all, include, a, mx, ptr, ip4, ip6, exists
    text: str  # the term as written, for reporting which one matched
    domain_spec: str | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    cidr4: int = 32
    cidr6: int = 128


@dataclass(frozen=True)
class Record:
    directives: tuple[Mechanism, ...]
    redirect: str | None = None
    explanation: str | None = None


@dataclass(frozen=True)
class Result:
    """The outcome of one identity's check."""

    status: Status
    identity: str  # "mailfrom" or "helo"
    domain: str  # the domain whose policy was checked ("" if none could be)
    sender: str  # <sender> of check_host(): local-part@domain
    mechanism: str = ""  # the term that decided, if any
    explanation: str | None = None  # from exp= (§6.2), only for fail
    reason: str = ""  # why, in words, for logs and headers


@dataclass(frozen=True)
class _Verdict:
    status: Status
    mechanism: str = ""
    explanation: str | None = None


# -- syntax (§4.6, §7.1, §12): pure functions, no DNS -------------------------------------

_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9._-]*)=(.*)", re.DOTALL)
_MECHANISM_NAME = re.compile(r"[A-Za-z0-9]+")
_DUAL_CIDR = re.compile(r"(?:/(\d+))?(?://(\d+))?")
_DOMAIN_AND_CIDR = re.compile(r"(.*?)((?:/\d+)?(?://\d+)?)", re.DOTALL)
_TOPLABEL = re.compile(
    r"(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*)|(?:[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9])"
)
_MACRO_EXPAND = re.compile(r"%\{([A-Za-z])(\d*)([rR]?)([.\-+,/_=]*)\}")


@dataclass(frozen=True)
class _Macro:
    letter: str  # lower case
    url_escape: bool  # the letter was upper case (§7.3)
    digits: int | None
    reverse: bool
    delimiters: str


@dataclass(frozen=True)
class _Escape:
    """``%%``, ``%_`` or ``%-``: a macro-expand that stands for fixed text."""

    text: str


_Token = str | _Macro | _Escape


def tokenize_macro_string(text: str, *, explanation: bool = False) -> list[_Token]:
    """Split a macro-string (§7.1) into literals and macros, or raise MacroSyntaxError.

    Literals are visible ASCII except ``%`` (and also spaces in explanation text); the
    escapes ``%%``, ``%_`` and ``%-`` become their literal text.
    """
    allowed = MACRO_LETTERS | EXPLANATION_ONLY_LETTERS if explanation else MACRO_LETTERS
    tokens: list[_Token] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "%":
            if not ("\x21" <= char <= "\x7e" or (explanation and char == " ")):
                raise MacroSyntaxError("character not allowed in a macro-string")
            literal.append(char)
            i += 1
            continue
        if literal:
            tokens.append("".join(literal))
            literal = []
        escape = {"%": "%", "_": " ", "-": "%20"}.get(text[i + 1 : i + 2])
        if escape is not None:
            tokens.append(_Escape(escape))
            i += 2
            continue
        match = _MACRO_EXPAND.match(text, i)
        if match is None:
            raise MacroSyntaxError("'%' not followed by '{', '%', '_' or '-'")
        letter, digits, reverse, delimiters = match.groups()
        if letter.lower() not in allowed:
            raise MacroSyntaxError(f"macro letter {letter!r} not allowed here")
        if digits and not digits.strip("0"):
            raise MacroSyntaxError("a macro's DIGIT transformer must not be zero")
        tokens.append(
            _Macro(
                letter=letter.lower(),
                url_escape=letter.isupper(),
                digits=_transformer_digits(digits),
                reverse=bool(reverse),
                delimiters=delimiters or ".",
            )
        )
        i = match.end()
    if literal:
        tokens.append("".join(literal))
    return tokens


def _transformer_digits(digits: str) -> int | None:
    if not digits:
        return None
    if len(digits) > MAX_TRANSFORMER_DIGITS:
        return 10**MAX_TRANSFORMER_DIGITS
    return int(digits)


def check_domain_spec(spec: str) -> None:
    """§7.1: domain-spec = macro-string domain-end, where domain-end is a macro or a toplabel."""
    if not spec:
        raise RecordSyntaxError("empty domain-spec")
    tokens = tokenize_macro_string(spec)
    tail = tokens[-1]
    if not isinstance(tail, str):
        return  # ends in a macro-expand (the escapes %%, %_ and %- are ones too)
    tail = tail[:-1] if tail.endswith(".") else tail
    dot = tail.rfind(".")
    if dot < 0 or not _TOPLABEL.fullmatch(tail[dot + 1 :]):
        raise RecordSyntaxError("domain-spec does not end in a valid top label")


def _cidr(digits: str | None, maximum: int, default: int) -> int:
    if digits is None:
        return default
    # §5.6 ABNF: no leading zeros, and the length must fit the address family.
    if (len(digits) > 1 and digits[0] == "0") or len(digits) > 3 or int(digits) > maximum:
        raise RecordSyntaxError("invalid CIDR length")
    return int(digits)


def _parse_mechanism(term: str) -> Mechanism:
    qualifier = QUALIFIERS.get(term[0])
    rest = term[1:] if qualifier else term
    qualifier = qualifier or Status.PASS
    match = _MECHANISM_NAME.match(rest)
    if match is None:
        raise RecordSyntaxError("unknown term")
    kind, args = match.group().lower(), rest[match.end() :]
    if kind == "all":
        if args:
            raise RecordSyntaxError("'all' takes no argument")
        return Mechanism(qualifier, kind, term)
    if kind in ("include", "exists"):
        if not args.startswith(":"):
            raise RecordSyntaxError(f"'{kind}' needs ':domain'")
        check_domain_spec(args[1:])
        return Mechanism(qualifier, kind, term, domain_spec=args[1:])
    if kind == "ptr":
        if args and not args.startswith(":"):
            raise RecordSyntaxError("'ptr' takes only ':domain'")
        spec = args[1:] if args else None
        if spec is not None:
            check_domain_spec(spec)
        return Mechanism(qualifier, kind, term, domain_spec=spec)
    if kind in ("a", "mx"):
        return _parse_a_or_mx(qualifier, kind, term, args)
    if kind in ("ip4", "ip6"):
        return _parse_ip(qualifier, kind, term, args)
    raise RecordSyntaxError("unknown mechanism")


def _parse_a_or_mx(qualifier: Status, kind: str, term: str, args: str) -> Mechanism:
    spec: str | None = None
    cidrs = args
    if args.startswith(":"):
        match = _DOMAIN_AND_CIDR.fullmatch(args[1:])
        assert match is not None  # the pattern matches any string
        spec, cidrs = match.group(1), match.group(2)
        check_domain_spec(spec)
    dual = _DUAL_CIDR.fullmatch(cidrs)
    if dual is None:
        raise RecordSyntaxError(f"bad argument to '{kind}'")
    return Mechanism(
        qualifier,
        kind,
        term,
        domain_spec=spec,
        cidr4=_cidr(dual.group(1), 32, 32),
        cidr6=_cidr(dual.group(2), 128, 128),
    )


def _parse_ip(qualifier: Status, kind: str, term: str, args: str) -> Mechanism:
    if not args.startswith(":"):
        raise RecordSyntaxError(f"'{kind}' needs an address")
    address, slash, length = args[1:].partition("/")
    maximum = 32 if kind == "ip4" else 128
    if slash and not re.fullmatch(r"\d+", length):
        raise RecordSyntaxError("invalid CIDR length")
    bits = _cidr(length if slash else None, maximum, maximum)
    try:
        ip = ipaddress.IPv4Address(address) if kind == "ip4" else ipaddress.IPv6Address(address)
    except ValueError:
        raise RecordSyntaxError(f"invalid {kind} address") from None
    network = ipaddress.ip_network(f"{ip}/{bits}", strict=False)
    return Mechanism(qualifier, kind, term, network=network)


def parse_record(text: str) -> Record:
    """Parse a whole SPF record (§4.6): any syntax error anywhere is a permerror."""
    version, terms = text[: len(VERSION)], text[len(VERSION) :]
    if version.lower() != VERSION.decode() or terms[:1] not in ("", " "):
        raise RecordSyntaxError("not an SPF version 1 record")
    directives: list[Mechanism] = []
    modifiers: dict[str, str] = {}
    for term in terms.split(" "):
        if not term:
            continue  # §4.6.1: terms are separated by one or more spaces
        modifier = _MODIFIER.fullmatch(term)
        if modifier is None:
            directives.append(_parse_mechanism(term))
            continue
        name, value = modifier.group(1).lower(), modifier.group(2)
        if name in ("redirect", "exp"):
            # §6: these two MUST NOT appear more than once each.
            if name in modifiers:
                raise RecordSyntaxError(f"'{name}' appears more than once")
            check_domain_spec(value)
            modifiers[name] = value
        else:
            # §6: unknown modifiers are ignored, but must still be valid macro-strings.
            tokenize_macro_string(value, explanation=True)
    return Record(tuple(directives), modifiers.get("redirect"), modifiers.get("exp"))


def select_record(txts: list[bytes]) -> str | None:
    """§4.5: the one record starting with "v=spf1"; others are not SPF's business."""
    candidates = [
        txt
        for txt in txts
        if txt[: len(VERSION)].lower() == VERSION and txt[len(VERSION) :][:1] in (b"", b" ")
    ]
    if not candidates:
        return None
    if len(candidates) > 1:
        raise MultipleRecordsError("more than one SPF record")
    try:
        return candidates[0].decode("ascii")
    except UnicodeDecodeError:
        raise RecordSyntaxError("SPF record is not 7-bit ASCII (§3.1)") from None


async def lookup(resolver: Resolver, domain: str) -> Record | None:
    """§4.4: the domain's SPF record, None if it has none; TempError or PermError otherwise.

    NXDOMAIN and "no TXT records" both mean none (§4.3); only TXT is queried (§3.1).
    """
    try:
        txts = await resolver.txt(domain)
    except DNSNameError:
        return None
    except DNSTempError as e:
        raise TempError(str(e)) from None
    text = select_record(txts)
    return _parsed(text) if text is not None else None


@functools.lru_cache(maxsize=PARSED_RECORDS)
def _parsed(text: str) -> Record:
    """``parse_record``, kept for records seen before: a sender domain's record changes
    seldom and comes back with every message (its ip4:/ip6: networks alone cost ~30 µs
    each to build). Records are frozen, so sharing one is safe; a syntax error is not
    kept and raises again."""
    return parse_record(text)


# -- names ---------------------------------------------------------------------------------


def valid_domain(domain: str) -> bool:
    """§4.3: a multi-label domain with no empty or over-long label (and not a literal)."""
    name = domain[:-1] if domain.endswith(".") else domain
    if not name or name.startswith("[") or len(name) > MAX_DOMAIN_LENGTH:
        return False
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return False
    labels = name.split(".")
    return len(labels) >= 2 and all(0 < len(label) <= MAX_LABEL_LENGTH for label in labels)


def _truncate_domain(name: str) -> str:
    """§7.3: drop labels from the left until the name fits in MAX_DOMAIN_LENGTH."""
    name = name[:-1] if name.endswith(".") else name
    while len(name) > MAX_DOMAIN_LENGTH and "." in name:
        name = name.split(".", 1)[1]
    return name


def _is_subdomain(name: str, domain: str) -> bool:
    name, domain = name.lower().rstrip("."), domain.lower().rstrip(".")
    return name == domain or name.endswith("." + domain)


def _client_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(ip)
    # §5: an IPv4-mapped IPv6 address MUST be treated as the IPv4 address it carries.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# -- evaluation (§4.6, §5, §6) -------------------------------------------------------------


class _Evaluation:
    """State shared by one check_host() and everything it includes or redirects to."""

    def __init__(
        self,
        resolver: Resolver,
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
        sender: str,
        helo: str,
        receiver: str,
    ) -> None:
        self.resolver = resolver
        self.ip = ip
        self.sender = sender
        self.local, _, self.sender_domain = sender.rpartition("@")
        self.helo = helo
        self.receiver = receiver
        self.dns_terms = 0
        self.void_lookups = 0

    # limits -------------------------------------------------------------------------------

    def _count_dns_term(self) -> None:
        self.dns_terms += 1
        if self.dns_terms > MAX_DNS_MECHANISMS:
            raise TooManyDNSLookupsError(f"more than {MAX_DNS_MECHANISMS} DNS lookups")

    def _count_void(self, found: list[str] | list[bytes] | list[tuple[int, str]]) -> None:
        if not found:
            self.void_lookups += 1
            if self.void_lookups > MAX_VOID_LOOKUPS:
                raise TooManyVoidLookupsError(f"more than {MAX_VOID_LOOKUPS} void lookups")

    # DNS ----------------------------------------------------------------------------------

    async def _addresses(self, name: str) -> list[str]:
        """A or AAAA, matching the client's address family (§5.3)."""
        try:
            if isinstance(self.ip, ipaddress.IPv4Address):
                return await self.resolver.a(name)
            return await self.resolver.aaaa(name)
        except DNSNameError:
            return []  # a name DNS cannot hold has no addresses (§4.3 by analogy)
        except DNSTempError as e:
            raise TempError(str(e)) from None

    async def _validated_names(self, *, count_void: bool = False) -> list[str]:
        """§5.5: PTR names of the client IP whose addresses include it again."""
        try:
            names = await self.resolver.ptr(str(self.ip))
        except (DNSTempError, DNSNameError):
            return []  # §5.5: a DNS error on the PTR lookup means no match
        if count_void:
            self._count_void(names)
        validated = []
        for name in names[:MAX_PTR_NAMES]:
            try:
                addresses = await self._addresses(name)
            except TempError:
                continue  # §5.5: a DNS error on the address lookup skips that name
            if any(ipaddress.ip_address(a) == self.ip for a in addresses):
                validated.append(name)
        return validated

    # macros (§7) --------------------------------------------------------------------------

    async def expand(self, spec: str, domain: str, *, explanation: bool = False) -> str:
        tokens = tokenize_macro_string(spec, explanation=explanation)
        out = []
        for token in tokens:
            if isinstance(token, str):
                out.append(token)
            elif isinstance(token, _Escape):
                out.append(token.text)
            else:
                out.append(self._transform(token, await self._macro_value(token.letter, domain)))
        return "".join(out)

    async def expand_domain(self, spec: str | None, domain: str) -> str:
        if spec is None:
            return domain
        return _truncate_domain(await self.expand(spec, domain))

    async def _macro_value(self, letter: str, domain: str) -> str:
        ip = self.ip
        if letter == "s":
            return self.sender
        if letter == "l":
            return self.local
        if letter == "o":
            return self.sender_domain
        if letter == "d":
            return domain
        if letter == "i":
            if isinstance(ip, ipaddress.IPv4Address):
                return str(ip)
            return ".".join(ip.exploded.replace(":", ""))
        if letter == "c":
            return str(ip)
        if letter == "v":
            return "in-addr" if isinstance(ip, ipaddress.IPv4Address) else "ip6"
        if letter == "h":
            return self.helo
        if letter == "r":
            return self.receiver
        if letter == "t":
            return str(int(time.time()))
        return await self._p_macro(domain)

    async def _p_macro(self, domain: str) -> str:
        """§7.3: a validated name, one within <domain> if there is one; else "unknown"."""
        names = await self._validated_names()
        for name in names:
            if _is_subdomain(name, domain):
                return name
        return names[0] if names else "unknown"

    @staticmethod
    def _transform(macro: _Macro, value: str) -> str:
        parts = re.split("[" + re.escape(macro.delimiters) + "]", value)
        if macro.reverse:
            parts.reverse()
        if macro.digits is not None:
            parts = parts[-macro.digits :]
        result = ".".join(parts)
        if macro.url_escape:
            result = urllib.parse.quote(result, safe="")
        return result

    # check_host (§4) ----------------------------------------------------------------------

    async def check_host(self, domain: str, *, want_explanation: bool = True) -> _Verdict:
        if not valid_domain(domain):
            return _Verdict(Status.NONE)
        record = await lookup(self.resolver, domain)
        if record is None:
            return _Verdict(Status.NONE)
        return await self.evaluate(record, domain, want_explanation)

    async def evaluate(self, record: Record, domain: str, want_explanation: bool) -> _Verdict:
        for mechanism in record.directives:
            if await self._matches(mechanism, domain):
                explanation = None
                if mechanism.qualifier is Status.FAIL and want_explanation:
                    explanation = await self._explanation(record, domain)
                return _Verdict(mechanism.qualifier, mechanism.text, explanation)
        if record.redirect is not None:
            # §6.1: redirect applies only when no mechanism matched; its exp= replaces ours.
            self._count_dns_term()
            target = await self.expand_domain(record.redirect, domain)
            verdict = await self.check_host(target, want_explanation=want_explanation)
            if verdict.status is Status.NONE:
                raise MissingRecordError("redirect target has no SPF record")
            return verdict
        return _Verdict(Status.NEUTRAL)  # §4.7: the default result

    async def _matches(self, mechanism: Mechanism, domain: str) -> bool:
        kind = mechanism.kind
        if kind == "all":
            return True
        if kind in ("ip4", "ip6"):
            return mechanism.network is not None and self.ip in mechanism.network
        self._count_dns_term()
        target = await self.expand_domain(mechanism.domain_spec, domain)
        if kind == "include":
            return await self._include(target)
        if kind == "a":
            addresses = await self._addresses(target)
            self._count_void(addresses)
            return self._in_any(addresses, mechanism)
        if kind == "mx":
            return await self._mx(target, mechanism)
        if kind == "ptr":
            return await self._ptr(target)
        return await self._exists(target)

    async def _include(self, target: str) -> bool:
        """§5.2: only a pass matches; none is a permerror, errors propagate."""
        verdict = await self.check_host(target, want_explanation=False)
        if verdict.status is Status.NONE:
            raise MissingRecordError("include target has no SPF record")
        return verdict.status is Status.PASS

    async def _mx(self, target: str, mechanism: Mechanism) -> bool:
        try:
            hosts = await self.resolver.mx(target)
        except DNSNameError:
            hosts = []
        except DNSTempError as e:
            raise TempError(str(e)) from None
        self._count_void(hosts)
        if len(hosts) > MAX_MX_NAMES:
            raise TooManyMXNamesError(f"more than {MAX_MX_NAMES} MX records")
        for _, host in hosts:
            # RFC 7505: a null MX ("." → "") names no host; nothing to look up.
            if host and self._in_any(await self._addresses(host), mechanism):
                return True
        return False

    async def _ptr(self, target: str) -> bool:
        names = await self._validated_names(count_void=True)
        return any(_is_subdomain(name, target) for name in names)

    async def _exists(self, target: str) -> bool:
        # §5.7: always an A query, whatever the client's address family.
        try:
            addresses = await self.resolver.a(target)
        except DNSNameError:
            addresses = []
        except DNSTempError as e:
            raise TempError(str(e)) from None
        self._count_void(addresses)
        return bool(addresses)

    def _in_any(self, addresses: list[str], mechanism: Mechanism) -> bool:
        bits = mechanism.cidr4 if isinstance(self.ip, ipaddress.IPv4Address) else mechanism.cidr6
        for address in addresses:
            network = ipaddress.ip_network(f"{address}/{bits}", strict=False)
            if self.ip in network:
                return True
        return False

    async def _explanation(self, record: Record, domain: str) -> str | None:
        """§6.2: any problem with exp= means no explanation, never a different result."""
        if record.explanation is None:
            return None
        try:
            target = await self.expand_domain(record.explanation, domain)
            txts = await self.resolver.txt(target)
            if len(txts) != 1:
                return None
            text = await self.expand(txts[0].decode("ascii"), domain, explanation=True)
        except (SPFError, DNSTempError, DNSNameError, UnicodeDecodeError):
            return None
        return text[:MAX_EXPLANATION_LENGTH]


# -- entry points --------------------------------------------------------------------------


async def expand_macros(
    spec: str,
    resolver: Resolver,
    *,
    ip: str,
    sender: str,
    domain: str,
    helo: str = "",
    receiver: str = UNKNOWN_RECEIVER,
    explanation: bool = False,
) -> str:
    """§7: expand a macro-string as check_host() would; raises MacroSyntaxError.

    ``resolver`` is only queried for %{p}.
    """
    evaluation = _Evaluation(resolver, _client_ip(ip), sender, helo, receiver)
    return await evaluation.expand(spec, domain, explanation=explanation)


def _sender(local: str, domain: str) -> str:
    # §4.3: a sender without a local-part uses "postmaster".
    return f"{local or 'postmaster'}@{domain}"


async def check_host(
    resolver: Resolver,
    ip: str,
    domain: str,
    sender: str,
    helo: str,
    *,
    identity: str = "mailfrom",
    receiver: str = UNKNOWN_RECEIVER,
) -> Result:
    """RFC 7208 §4: evaluate ``domain``'s policy for ``ip``; never raises for bad input.

    ``sender`` is <sender> of §4.1 (local-part@domain, see ``verify_mailfrom``); ``receiver``
    is this host's name for the %{r} macro.
    """
    started = time.monotonic()
    try:
        client = _client_ip(ip)
    except ValueError:
        return Result(Status.NONE, identity, domain, sender, reason="client IP is not an IP")
    evaluation = _Evaluation(resolver, client, sender, helo, receiver)
    try:
        async with asyncio.timeout(ELAPSED_LIMIT):
            verdict = await evaluation.check_host(domain)
    except TempError as e:
        verdict, reason = _Verdict(Status.TEMPERROR), str(e)
    except TimeoutError:
        verdict, reason = _Verdict(Status.TEMPERROR), "evaluation took too long (§4.6.4)"
    except PermError as e:
        verdict, reason = _Verdict(Status.PERMERROR), str(e)
    else:
        reason = _describe(verdict)
    log.debug(
        "spf check done",
        extra={"status": str(verdict.status), "ms": int((time.monotonic() - started) * 1000)},
    )
    return Result(
        verdict.status,
        identity,
        domain,
        sender,
        mechanism=verdict.mechanism,
        explanation=verdict.explanation,
        reason=reason,
    )


def _describe(verdict: _Verdict) -> str:
    if verdict.status is Status.NONE:
        return "no SPF record"
    if verdict.mechanism:
        return f"matched {verdict.mechanism}"
    return "no mechanism matched"


async def verify_mailfrom(
    resolver: Resolver, *, ip: str, mail_from: str, helo: str, receiver: str = UNKNOWN_RECEIVER
) -> Result:
    """§2.4: check MAIL FROM; a null reverse-path checks postmaster@<HELO> instead (§2.3)."""
    if mail_from:
        local, _, domain = mail_from.rpartition("@")
        return await check_host(
            resolver, ip, domain, _sender(local, domain), helo, receiver=receiver
        )
    return await check_host(
        resolver, ip, helo, _sender("", helo), helo, identity="mailfrom", receiver=receiver
    )


async def verify_helo(
    resolver: Resolver, *, ip: str, helo: str, receiver: str = UNKNOWN_RECEIVER
) -> Result:
    """§2.3: check the HELO identity on its own (its domain as postmaster@<HELO>)."""
    return await check_host(
        resolver, ip, helo, _sender("", helo), helo, identity="helo", receiver=receiver
    )
