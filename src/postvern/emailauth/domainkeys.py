"""DomainKeys (RFC 4870, Historic): checking DomainKey-Signature header fields.

DomainKeys, DKIM's predecessor, lets the domain of a message's sending address (Sender,
else From) sign its header fields and body with an RSA key published at
<selector>._domainkey.<domain>. Old mail still carries it, so we report it for the reader
(Authentication-Results method "domainkeys", RFC 8601 §2.7.1); it never counts for DMARC,
whose authenticated identifiers are SPF's and DKIM's only (RFC 7489 §3). Keys are fetched
through our async resolver first; canonicalisation and RSA then run in a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import enum
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from dkim.util import InvalidTagValueList, parse_tag_value

from postvern.dns import DNSNameError, DNSTempError, Resolver
from postvern.emailauth.headers import (
    MAX_HEADER_FIELDS,
    Field,
    HeaderBlock,
    ParsedMessage,
)

FIELD_NAME = "DomainKey-Signature"
# Signatures checked per message. Each costs a DNS query and an RSA operation; RFC 4870
# sets no bound, so we keep DKIM's (RFC 6376 §6.1 lets verifiers limit what they evaluate).
MAX_SIGNATURES = 10
# Names in one h= list. Real signers list a dozen; a longer list only multiplies the work.
MAX_SIGNED_NAMES = 200
# A pass under a shorter key proves little: 512-bit RSA is factored in hours. RFC 4870
# signers commonly used 512- and 768-bit keys, so measuring old corpora passes 512.
MIN_RSA_BITS = 1024
# DomainKeys signers used keys of 512 to 2048 bits; a larger key only costs us CPU.
MAX_RSA_BITS = 4096

SIMPLE, NOFWS = "simple", "nofws"
CRLF = b"\r\n"
# RFC 1035 §2.3.4: 63-octet labels, 253-octet names (underscores appear in real ones).
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?")
MAX_DOMAIN_LENGTH = 253
_SELECTOR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9_-]+)*")
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")
_WSP = re.compile(rb"[ \t]+")
_FWS = re.compile(rb"[ \t\r\n]+")


class Status(enum.StrEnum):
    """Per-signature result (RFC 8601 §2.7.1, which DomainKeys shares with DKIM)."""

    PASS = "pass"  # noqa: S105 (not a password) the signature verified
    FAIL = "fail"  # the signature did not verify, or the key's g= refuses the sender
    NEUTRAL = "neutral"  # not evaluated (over the limit), or failed under a testing key
    POLICY = "policy"  # refused by local policy (key too short)
    TEMPERROR = "temperror"  # the key could not be fetched for now
    PERMERROR = "permerror"  # the signature, its sending address or its key is unusable


class DomainKeysError(Exception):
    """A signature that cannot be checked; the message names the reason, never the data."""


class SignatureError(DomainKeysError):
    """The DomainKey-Signature field, or the sending address it must cover, is unusable."""


class KeyRecordError(DomainKeysError):
    """The key record at <selector>._domainkey.<domain> is unusable (or revoked)."""


@dataclass(frozen=True)
class Result:
    """The verdict on one DomainKey-Signature header field."""

    status: Status
    domain: str = ""  # d=
    selector: str = ""  # s=
    sender: str = ""  # the sending address the signature was checked against
    sender_field: str = ""  # "sender" or "from": which signed field that address came from
    testing: bool = False  # the key record says t=y
    reason: str = ""
    key_bits: int | None = None


@dataclass(frozen=True)
class Signature:
    """A DomainKey-Signature whose tags are usable (RFC 4870 §3.3)."""

    position: int  # index of the field in the header block
    domain: str  # d=, lower-case
    selector: str  # s=
    canonicalization: str  # SIMPLE or NOFWS
    signed_names: tuple[str, ...] | None  # h=, lower-case; None: every field below this one
    data: bytes  # b=, decoded

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


@dataclass(frozen=True)
class KeyRecord:
    """A usable DomainKeys key record (RFC 4870 §3.2.3)."""

    public_key: rsa.RSAPublicKey
    granularity: str  # g=, "" when absent or empty (any local-part)
    testing: bool  # t=y


# -- the signature field (RFC 4870 §3.3) -----------------------------------------------------


def _tags(value: bytes) -> dict[bytes, bytes]:
    try:
        return parse_tag_value(re.sub(rb"\r?\n", b"", value))
    except InvalidTagValueList:
        raise SignatureError("tag list syntax") from None


def read_signature(position: int, value: bytes) -> Signature:
    """The usable signature in a DomainKey-Signature field value, or SignatureError."""
    tags = _tags(value)
    for tag in (b"b", b"d", b"s"):
        if not tags.get(tag):
            raise SignatureError(f"required tag {tag.decode()}= missing")
    _check_algorithm_and_query(tags)
    canonicalization = tags.get(b"c", SIMPLE.encode()).lower().decode("ascii", "replace")
    if canonicalization not in (SIMPLE, NOFWS):
        raise SignatureError("unknown canonicalization (c=)")
    domain = tags[b"d"].decode("ascii", "replace").lower().rstrip(".")
    selector = tags[b"s"].decode("ascii", "replace")
    if len(domain) > MAX_DOMAIN_LENGTH or not all(_LABEL.fullmatch(p) for p in domain.split(".")):
        raise SignatureError("invalid domain (d=)")
    if not _SELECTOR.fullmatch(selector):
        raise SignatureError("invalid selector (s=)")
    return Signature(position, domain, selector, canonicalization, _signed_names(tags), _data(tags))


def _check_algorithm_and_query(tags: dict[bytes, bytes]) -> None:
    """a= and q=: RFC 4870 defines only rsa-sha1 and dns."""
    if tags.get(b"a", b"rsa-sha1").lower() != b"rsa-sha1":
        raise SignatureError("unknown algorithm (a=)")
    if b"q" in tags:
        if tags[b"q"].lower() != b"dns":
            raise SignatureError("unknown query method (q=)")
    elif b"a" in tags:
        # RFC 4870 §3.3 requires q=. Early signers wrote neither a= nor q= and verifiers
        # (libdomainkeys, Mail::DKIM since 2007) took both defaults; a signature that spells
        # out a= but not q= matches no such signer, so it is held to the RFC.
        raise SignatureError("required tag q= missing")


def _signed_names(tags: dict[bytes, bytes]) -> tuple[str, ...] | None:
    if b"h" not in tags:
        return None
    names = [n.strip().lower().decode("ascii", "replace") for n in tags[b"h"].split(b":")]
    names = [n for n in names if n]
    # §3.3: h= must name the field that identifies the sending domain, so it is never empty.
    if not names:
        raise SignatureError("h= is empty")
    if len(names) > MAX_SIGNED_NAMES:
        raise SignatureError(f"h= lists more than {MAX_SIGNED_NAMES} names")
    return tuple(names)


def _data(tags: dict[bytes, bytes]) -> bytes:
    text = re.sub(rb"\s+", b"", tags[b"b"])
    if not _BASE64.fullmatch(text):
        raise SignatureError("b= is not base64")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise SignatureError("b= is not base64") from None


# -- what the signature covers (RFC 4870 §3.3 h=, §3.4 canonicalization) ---------------------


def presented_fields(below: Sequence[Field], signed_names: Sequence[str] | None) -> list[Field]:
    """The header fields the signer presented, in the order it presented them.

    Only fields below the signature count (§3.3 h=: "subsequent to the DomainKey-Signature").
    Without h=, that is all of them in message order. With h=, fields follow the h= order; a
    name listed n times takes its last n-1 fields one by one from the bottom, and its first
    mention every remaining field of that name, so all occurrences are included as §3.3 asks
    (the reading Mail::DKIM implements).
    """
    if signed_names is None:
        return list(below)
    by_name: dict[str, list[Field]] = {}
    for field in below:
        by_name.setdefault(field.name.lower(), []).append(field)
    mentions = Counter(signed_names)
    groups: list[list[Field]] = []
    for name in reversed(signed_names):
        mentions[name] -= 1
        pool = by_name.get(name, [])
        taken = pool[-1:] if mentions[name] else pool[:]
        del pool[len(pool) - len(taken) :]
        groups.append(taken)
    return [field for group in reversed(groups) for field in group]


def canonicalize(fields: Sequence[bytes], body: bytes, method: str) -> bytes:
    """The bytes the signature covers (§3.4): the presented fields, then the body.

    ``fields`` are raw header fields (name, colon, value with its folding); ``body`` is
    everything after the empty line. Lines are taken to end in CRLF as on the wire (RFC 5322
    §2.1), so a message stored with bare LF reads as if it had CRLF. "simple" changes
    nothing else; "nofws" drops every space and tab, and unfolds the header fields.
    """
    lines = [_crlf(f) for f in fields]
    body = _crlf(body)
    if method == NOFWS:
        lines = [_FWS.sub(b"", line) + CRLF for line in lines]
        body = _BARE_CR.sub(b"", _WSP.sub(b"", body))
    else:
        lines = [line if line.endswith(CRLF) else line + CRLF for line in lines]
    return b"".join(lines) + _canonical_body(body)


def _crlf(data: bytes) -> bytes:
    return _BARE_LF.sub(CRLF, data)


def _canonical_body(body: bytes) -> bytes:
    """§3.4: empty lines at the end are not signed; the empty line separating the body from
    the header fields is, but only when some non-empty body line follows it."""
    end = len(body)
    while body.endswith(CRLF, 0, end):  # a scan, not a copy per line: bodies may be long
        end -= 2
    if end == 0:
        return b""
    return CRLF + body[:end] + (CRLF if end < len(body) else b"")


def sending_address(presented: Sequence[Field]) -> tuple[str, str]:
    """(field name, address): Sender if signed, else From (RFC 4870 §3.1).

    §3.3 requires h= to include the field that identified the sending domain, so the
    identifying field is sought among the signed ones: a Sender added downstream outside the
    signature (by a list, say) does not change whose signature it is.
    """
    for name in ("sender", "from"):
        fields = [f for f in presented if f.name.lower() == name]
        if not fields:
            continue
        if len(fields) > 1:
            # RFC 5322 §3.6: at most one Sender and exactly one From.
            raise SignatureError(f"more than one {name.title()} field is signed")
        try:
            parsed = email.utils.getaddresses([fields[0].text()])
        except (ValueError, IndexError, TypeError):  # the stdlib parser on hostile input
            parsed = []
        addresses = [a for _, a in parsed if a]
        if len(addresses) != 1 or "@" not in addresses[0]:
            raise SignatureError(f"signed {name.title()} field has no single address")
        return name, addresses[0]
    raise SignatureError("neither Sender nor From is signed")


def identify(block: HeaderBlock, signature: Signature) -> tuple[list[Field], str, str]:
    """(presented fields, field name, sending address), checked against d= (§3.3): the
    sending domain must be d= or a subdomain of it. SignatureError otherwise."""
    if len(block.fields) >= MAX_HEADER_FIELDS:
        raise SignatureError("header block too large to check")
    if block.malformed:
        raise SignatureError("malformed header block")
    below = block.fields[signature.position + 1 :]
    presented = presented_fields(below, signature.signed_names)
    field_name, address = sending_address(presented)
    if not _within(_domain_of(address), signature.domain):
        raise SignatureError(f"{field_name.title()} domain is not within d=")
    return presented, field_name, address


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].strip().rstrip(".").lower()


def _within(domain: str, signing_domain: str) -> bool:
    """§3.3 d=: the sending domain itself or one of its parent domains."""
    return domain == signing_domain or domain.endswith("." + signing_domain)


# -- the key record (RFC 4870 §3.2.3) --------------------------------------------------------


def parse_key_record(record: bytes) -> KeyRecord:
    """The usable key in a TXT record, or KeyRecordError (revoked keys included)."""
    try:
        tags = parse_tag_value(record)
    except InvalidTagValueList:
        raise KeyRecordError("key record syntax") from None
    if tags.get(b"k", b"rsa").lower() != b"rsa":
        raise KeyRecordError("key type is not rsa (k=)")
    _check_dkim_restrictions(tags)
    public = re.sub(rb"\s+", b"", tags.get(b"p", b""))
    if not public:
        raise KeyRecordError("key revoked (empty p=)")
    try:
        key = serialization.load_der_public_key(base64.b64decode(public, validate=True))
    except (binascii.Error, ValueError, UnsupportedAlgorithm):
        raise KeyRecordError("p= is not a public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise KeyRecordError("p= is not an RSA key")
    flags = [f.strip().lower() for f in tags.get(b"t", b"").split(b":")]
    granularity = tags.get(b"g", b"").decode("utf-8", "replace")
    return KeyRecord(key, granularity, b"y" in flags)


def _check_dkim_restrictions(tags: dict[bytes, bytes]) -> None:
    """DomainKeys and DKIM share the record format at one name (RFC 4871 §3.6.1 extended it),
    so a record written for DKIM may limit its use; a DomainKeys signature must respect that."""
    if b"v" in tags and tags[b"v"] != b"DKIM1":
        raise KeyRecordError("key record version is not DKIM1")
    hashes_allowed = [h.strip().lower() for h in tags.get(b"h", b"sha1").split(b":")]
    if b"sha1" not in hashes_allowed:
        raise KeyRecordError("key does not allow sha1 (h=)")
    services = [s.strip().lower() for s in tags.get(b"s", b"*").split(b":")]
    if b"*" not in services and b"email" not in services:
        raise KeyRecordError("key is not for email (s=)")


def granularity_matches(pattern: str, local_part: str) -> bool:
    """g= against the sending address's local-part (§3.2.3: an exact, case-sensitive match).

    An empty g= restricts nothing (§3.2.3: only a non-zero-length value constrains). A "*"
    matches any run of characters, as RFC 4871 §3.6.1 defined for the shared record: a key
    published for DKIM with g=jl*g is read as its publisher meant it.
    """
    if not pattern:
        return True
    return star_fullmatch(pattern, local_part)


def star_fullmatch(pattern: str, text: str) -> bool:
    """``text`` is all of ``pattern``, where "*" matches any run of characters (g= of
    RFC 4870 §3.2.3 and RFC 4871 §3.6.1; nothing else is special).

    Not a regular expression: ".*" pieces from a hostile record (g=*a*a*a*a*a*a*a*a*b)
    backtrack over a long local-part for minutes, holding the interpreter for every
    connection. Each literal piece is found once, left to right, so this is linear in the
    text per piece: the first piece leads, the last one ends, the leftmost fit of each one
    between them leaves the most room for the rest.
    """
    first, *rest = pattern.split("*")
    if not rest:
        return text == pattern
    *middle, last = rest
    if len(text) < len(first) + len(last) or not text.startswith(first):
        return False
    if not text.endswith(last):
        return False
    position, end = len(first), len(text) - len(last)
    for piece in middle:
        found = text.find(piece, position, end)
        if found < 0:
            return False
        position = found + len(piece)
    return True


# -- verification -----------------------------------------------------------------------------


async def _fetch_key(resolver: Resolver, name: str) -> bytes | Status:
    """The key record, or the status a failed fetch gives (no key: permanent)."""
    try:
        records = await resolver.txt(name)
    except DNSNameError:
        return Status.PERMERROR
    except DNSTempError:
        return Status.TEMPERROR
    # Several records at one name: take the first, as DKIM verifiers may (RFC 6376 §6.1.2).
    return records[0] if records else Status.PERMERROR


def _label(value: bytes) -> Result:
    """A result naming d= and s= even when the rest of the signature is unusable."""
    try:
        tags = parse_tag_value(re.sub(rb"\r?\n", b"", value))
    except InvalidTagValueList:
        return Result(Status.NEUTRAL)
    domain = tags.get(b"d", b"").decode("ascii", "replace").lower()
    return Result(Status.NEUTRAL, domain, tags.get(b"s", b"").decode("ascii", "replace"))


async def verify(
    message: bytes | ParsedMessage, resolver: Resolver, *, min_rsa_bits: int = MIN_RSA_BITS
) -> list[Result]:
    """Check every DomainKey-Signature (up to MAX_SIGNATURES); one Result each, top first."""
    parsed = ParsedMessage.of(message)
    block, message = parsed.block, parsed.raw
    entries: list[tuple[Result, Signature | None]] = []
    for position, field in enumerate(block.fields):
        if field.name.lower() != FIELD_NAME.lower():
            continue
        label = _label(field.value)
        if len(entries) >= MAX_SIGNATURES:
            over = f"not evaluated: more than {MAX_SIGNATURES} signatures"
            entries.append((replace(label, reason=over), None))
            continue
        try:
            signature = read_signature(position, field.value)
            identify(block, signature)  # no lookup for a signature that cannot pass
            entries.append((label, signature))
        except SignatureError as e:
            entries.append((replace(label, status=Status.PERMERROR, reason=str(e)), None))
    if not entries:
        return []  # no DomainKey-Signature: the usual case, no thread needed
    names = sorted({s.key_name for _, s in entries if s is not None})
    fetched = await asyncio.gather(*(_fetch_key(resolver, name) for name in names))
    keys = dict(zip(names, fetched, strict=True))
    return await asyncio.to_thread(_check_all, message, block, entries, keys, min_rsa_bits)


def _check_all(
    message: bytes,
    block: HeaderBlock,
    entries: list[tuple[Result, Signature | None]],
    keys: dict[str, bytes | Status],
    min_rsa_bits: int,
) -> list[Result]:
    """Worker-thread part: canonicalisation and RSA, never any DNS."""
    results = []
    for label, signature in entries:
        if signature is None:
            results.append(label)
            continue
        key = keys[signature.key_name]
        if isinstance(key, Status):
            reason = "key lookup failed for now" if key is Status.TEMPERROR else "no key record"
            results.append(replace(label, status=key, reason=reason))
            continue
        try:
            results.append(check(message, block, signature, key, min_rsa_bits))
        except DomainKeysError as e:
            results.append(replace(label, status=Status.PERMERROR, reason=str(e)))
    return results


def check(
    message: bytes,
    block: HeaderBlock,
    signature: Signature,
    record: bytes,
    min_rsa_bits: int = MIN_RSA_BITS,
) -> Result:
    """One signature against its fetched key record (RFC 4870 §3.7); DomainKeysError when
    the signature, its sending address or the key cannot be used."""
    presented, field_name, address = identify(block, signature)
    result = Result(Status.NEUTRAL, signature.domain, signature.selector, address, field_name)
    key = parse_key_record(record)
    result = replace(result, testing=key.testing, key_bits=key.public_key.key_size)
    if key.public_key.key_size < min_rsa_bits:
        reason = f"RSA key of {key.public_key.key_size} bits is too short"
        return replace(result, status=Status.POLICY, reason=reason)
    if key.public_key.key_size > MAX_RSA_BITS:
        raise KeyRecordError(f"RSA key longer than {MAX_RSA_BITS} bits")
    if not granularity_matches(key.granularity, address.rpartition("@")[0]):
        # §3.2.3 g=: a sending address that does not match "constitutes a failed verification".
        return _failed(result, "sending address does not match the key's g=")
    raw = [message[f.start : f.end] for f in presented]
    data = canonicalize(raw, message[block.body_start :], signature.canonicalization)
    try:
        # RSA with SHA-1 (§3.2.2) is broken for new signatures; it is accepted here only
        # because DomainKeys results are informational and never feed DMARC.
        key.public_key.verify(signature.data, data, padding.PKCS1v15(), hashes.SHA1())  # noqa: S303  # nosec B303
    except InvalidSignature:
        return _failed(result, "signature did not verify")
    return replace(result, status=Status.PASS, reason="good signature")


def _failed(result: Result, reason: str) -> Result:
    """A failure; under a testing key (t=y) §3.2.3 says unverified mail MUST NOT be treated
    differently from verified mail, so it is reported neutral."""
    if result.testing:
        return replace(result, status=Status.NEUTRAL, reason=f"{reason} (testing key)")
    return replace(result, status=Status.FAIL, reason=reason)
