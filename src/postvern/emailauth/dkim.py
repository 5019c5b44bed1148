"""DomainKeys Identified Mail (RFC 6376): verifying and making message signatures.

A DKIM signature lets a domain take responsibility for a message: it signs chosen header
fields and a hash of the body with a key published at <selector>._domainkey.<domain>.
Verification fetches every key through our async resolver first, then checks each body hash
against the message's canonical body (``emailauth.canon``: computed once per canonicalisation
and shared by every signature) and has dkimpy hash the header fields and check the signature
itself, in a worker thread, so no blocking DNS and no RSA ever run on the event loop. dkimpy
only ever sees the header block; the body is never split into lines.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import functools
import hashlib
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dkim
import dkim.crypto
import nacl.exceptions
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy
from dkim.util import InvalidTagValueList, parse_tag_value

from postvern.dns import DNSNameError, DNSTempError, Resolver
from postvern.emailauth import canon, dkim_draft00
from postvern.emailauth.domainkeys import star_fullmatch
from postvern.emailauth.headers import ParsedMessage

# Signatures verified per message. Each costs a DNS query and a public-key operation, so an
# attacker could stack hundreds; RFC 6376 §6.1 lets verifiers limit what they evaluate.
MAX_SIGNATURES = 10
# RFC 8301 §3.2: verifiers MUST NOT consider signatures with RSA keys under 1024 bits valid.
MIN_RSA_BITS = 1024
# RFC 6008 §4: header.b carries the first characters of b= (at least 8) to tell apart
# signatures from one domain and selector.
HEADER_B_LENGTH = 12
# Parsed public keys kept, by their k= and p=: senders sign with a few keys each, and dkimpy
# parses an RSA key's ASN.1 in Python. Bounded: a key costs a few hundred bytes.
PUBLIC_KEY_CACHE = 512
# Slack for signers' clocks when judging t= and x= (as dkimpy allows: ten hours).
CLOCK_SKEW = 36000
# RSA key size for new signing keys: RFC 8301 §3.2 asks signers for at least 2048 bits.
NEW_RSA_BITS = 2048
# Header fields signed by default (RFC 6376 §5.4.1), when present.
SIGNED_HEADERS = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding", "in-reply-to",
    "references", "list-id", "list-help", "list-unsubscribe", "list-unsubscribe-post",
    "list-subscribe", "list-post", "list-owner", "list-archive", "autocrypt",
)  # fmt: skip
# Signed once more than they occur, so none can be added without breaking the signature
# (RFC 6376 §8.15, "oversigning").
OVERSIGNED_HEADERS = ("from", "reply-to", "subject", "date", "to", "cc", "message-id")
ALGORITHMS = ("rsa-sha256", "ed25519-sha256")

_KEY_TYPES = {b"rsa-sha1": b"rsa", b"rsa-sha256": b"rsa", b"ed25519-sha256": b"ed25519"}
_HASHES = {b"rsa-sha1": b"sha1", b"rsa-sha256": b"sha256", b"ed25519-sha256": b"sha256"}
_SELECTOR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9_-]+)*")

# dkimpy logs the message's own tag values at error level; keep it out of our logs.
QUIET_LOGGER = logging.getLogger("postvern.emailauth.dkimpy")
QUIET_LOGGER.addHandler(logging.NullHandler())
QUIET_LOGGER.propagate = False


class Status(enum.StrEnum):
    """Per-signature result (RFC 8601 §2.7.1)."""

    PASS = "pass"  # noqa: S105 (not a password) the signature verified
    FAIL = "fail"  # the signature or the body hash did not verify
    NEUTRAL = "neutral"  # not evaluated (over the signature limit)
    POLICY = "policy"  # verified or not, refused by local policy (RFC 8301 algorithms, key size)
    TEMPERROR = "temperror"  # the key could not be fetched for now
    PERMERROR = "permerror"  # the signature or its key record is unusable


class SigningError(Exception):
    """The key or the message cannot make a signature."""


@dataclass(frozen=True)
class VerifyPolicy:
    """What this verifier accepts beyond the RFCs' syntax."""

    min_rsa_bits: int = MIN_RSA_BITS
    # RFC 8301 §3.1: verifiers MUST NOT consider rsa-sha1 signatures valid.
    allow_rsa_sha1: bool = False
    # Signatures from the drafts before RFC 4871 (no v=, or v=0.5), which RFC 6376 §3.5
    # makes invalid; draft-00 ones (no bh= either) go to the legacy dkim_draft00 module.
    allow_draft_versions: bool = False
    # RFC 4871 §3.6.1 key granularity (g=), which RFC 6376 dropped (see its Appendix C):
    # when set, the local-part of i= must match the key's g= pattern.
    rfc4871_granularity: bool = False


# The profile of 2007-era verifiers (drafts, RFC 4871): rsa-sha1, 512-bit keys, draft
# signatures and g= honoured. Only for measuring conformance against old corpora.
LEGACY_POLICY = VerifyPolicy(
    min_rsa_bits=512, allow_rsa_sha1=True, allow_draft_versions=True, rfc4871_granularity=True
)
# The drafts' version values (draft-ietf-dkim-base-05 used "0.5"; earlier ones had no v=).
_DRAFT_VERSIONS = (None, b"0.5")


@dataclass(frozen=True)
class Result:
    """The verdict on one DKIM-Signature header field."""

    status: Status
    domain: str = ""  # d=
    selector: str = ""  # s=
    algorithm: str = ""  # a=
    identity: str = ""  # i= (the AUID), "@" + d= when absent
    header_b: str = ""  # first HEADER_B_LENGTH characters of b=
    reason: str = ""
    key_bits: int | None = None


@dataclass
class _Signature:
    index: int
    tags: dict[bytes, bytes] | None
    result: Result
    draft00: bool = False  # LEGACY: a draft-ietf-dkim-base-00 signature (no bh=)

    @property
    def key_name(self) -> str:
        assert self.tags is not None
        return f"{self.result.selector}._domainkey.{self.result.domain}"


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value else ""


def _read_signature(index: int, value: bytes, policy: VerifyPolicy, now: float) -> _Signature:
    """Parse and check the tags (RFC 6376 §3.5, §6.1.1): only a usable one costs a lookup."""
    try:
        tags = parse_tag_value(re.sub(rb"\r?\n", b"", value))
    except InvalidTagValueList:
        return _Signature(index, None, Result(Status.PERMERROR, reason="tag list syntax"))
    b_value = re.sub(rb"\s+", b"", tags.get(b"b", b""))
    result = Result(
        Status.NEUTRAL,
        domain=_text(tags.get(b"d")).lower(),
        selector=_text(tags.get(b"s")),
        algorithm=_text(tags.get(b"a")).lower(),
        identity=_text(tags.get(b"i")) or "@" + _text(tags.get(b"d")),
        header_b=_text(b_value[:HEADER_B_LENGTH]),
    )
    problem = signature_problem(tags, now, policy.allow_draft_versions)
    if not problem and not _SELECTOR.fullmatch(result.selector):
        problem = "invalid s= selector"
    if problem:
        return _Signature(index, None, _with(result, Status.PERMERROR, problem))
    if tags[b"a"].lower() == b"rsa-sha1" and not policy.allow_rsa_sha1:
        refused = _with(result, Status.POLICY, "rsa-sha1 is not accepted (RFC 8301 §3.1)")
        return _Signature(index, None, refused)
    draft00 = policy.allow_draft_versions and dkim_draft00.is_draft00(tags)
    return _Signature(index, tags, result, draft00)


def _with(result: Result, status: Status, reason: str, key_bits: int | None = None) -> Result:
    return Result(
        status,
        result.domain,
        result.selector,
        result.algorithm,
        result.identity,
        result.header_b,
        reason,
        key_bits if key_bits is not None else result.key_bits,
    )


async def _fetch_key(resolver: Resolver, name: str) -> bytes | Status:
    """RFC 6376 §6.1.2 step 2: the key record, or the status a failed fetch gives."""
    try:
        records = await resolver.txt(name)
    except DNSNameError:
        return Status.PERMERROR
    except DNSTempError:
        return Status.TEMPERROR
    # Several records at one name: RFC 6376 §6.1.2 lets the verifier pick one; take the first.
    return records[0] if records else Status.PERMERROR


async def verify(
    message: bytes | ParsedMessage, resolver: Resolver, *, policy: VerifyPolicy = VerifyPolicy()
) -> list[Result]:
    """Verify every DKIM-Signature (up to MAX_SIGNATURES); one Result each, top first."""
    parsed = ParsedMessage.of(message)
    block = parsed.block
    now = time.time()
    signatures = [
        _read_signature(i, f.value, policy, now)
        for i, f in enumerate(block.get_all("DKIM-Signature"))
    ]
    evaluated, skipped = signatures[:MAX_SIGNATURES], signatures[MAX_SIGNATURES:]
    over = f"not evaluated: more than {MAX_SIGNATURES} signatures"
    names = sorted({s.key_name for s in evaluated if s.tags is not None})
    fetched = await asyncio.gather(*(_fetch_key(resolver, name) for name in names))
    keys = dict(zip(names, fetched, strict=True))
    if not signatures:
        return []
    results = await asyncio.to_thread(_verify_all, parsed, evaluated, keys, policy)
    return results + [_with(s.result, Status.NEUTRAL, over) for s in skipped]


def _verify_all(
    parsed: ParsedMessage,
    signatures: list[_Signature],
    keys: dict[str, bytes | Status],
    policy: VerifyPolicy,
) -> list[Result]:
    """Worker-thread part: all the CPU work and dkimpy, never any DNS."""
    try:
        # Only the header block: dkimpy would otherwise split the whole body into lines.
        verifier = dkim.DKIM(parsed.header_bytes, logger=QUIET_LOGGER, minkey=policy.min_rsa_bits)
    except Exception:  # dkimpy's parser fails in assorted ways on malformed header blocks
        verifier = None
    results = []
    for signature in signatures:
        if signature.tags is None:
            results.append(signature.result)
        elif verifier is None:
            results.append(_with(signature.result, Status.PERMERROR, "malformed header block"))
        else:
            key = keys[signature.key_name]
            results.append(_verify_one(verifier, parsed, signature, key, policy))
    return results


@functools.lru_cache(maxsize=PUBLIC_KEY_CACHE)
def _public_key(name: str, record: bytes) -> tuple[Any, int, bytes, bool, _OpenSSLRSA | None]:
    """dkimpy's parsed key (key, bits, k=, s=tlsrpt), and for an RSA key the same key for
    OpenSSL (None if it will not take it); raises what dkimpy raises."""
    pk, bits, ktag, tlsrpt = dkim.evaluate_pk(name, record)
    fast = _OpenSSLRSA.of(pk) if ktag == b"rsa" else None
    return pk, bits, ktag, tlsrpt, fast


class _OpenSSLRSA:
    """An RSA public key that checks rsa-sha256 signatures with OpenSSL (``cryptography``)
    instead of dkimpy's arithmetic in Python, which took more CPU than the rest of DKIM.

    dkimpy is handed this object as if it were an Ed25519 key (``ktag`` ed25519): it then
    hashes the header fields exactly as before and calls ``verify(digest, signature)``,
    which raises nacl's BadSignatureError for a bad signature, as an Ed25519 key does.
    OpenSSL's RSASSA-PKCS1-v1_5 check (RFC 8017 §8.2.2) and dkimpy's agree on every
    signature as long as it is as long as the modulus and below it; any other signature
    goes to dkimpy's own code, so results (and reasons) stay dkimpy's byte for byte.
    """

    __slots__ = ("_dkimpy", "_key", "_modulus", "_size")

    def __init__(self, dkimpy_key: dict[str, int], key: rsa.RSAPublicKey) -> None:
        self._dkimpy = dkimpy_key
        self._key = key
        self._modulus = dkimpy_key["modulus"]
        self._size = (self._modulus.bit_length() + 7) // 8

    @classmethod
    def of(cls, dkimpy_key: Any) -> _OpenSSLRSA | None:
        try:
            n, e = dkimpy_key["modulus"], dkimpy_key["publicExponent"]
            if n.bit_length() < MIN_RSA_BITS:
                return None  # legacy short keys: dkimpy's digest-length errors apply
            return cls(dkimpy_key, rsa.RSAPublicNumbers(e, n).public_key())
        except (KeyError, TypeError, ValueError):
            return None

    def verify(self, digest: bytes, signature: bytes) -> None:
        if len(signature) == self._size and int.from_bytes(signature, "big") < self._modulus:
            try:
                self._key.verify(signature, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
            except InvalidSignature:
                raise nacl.exceptions.BadSignatureError from None
            return
        try:
            valid = dkim.crypto.RSASSA_PKCS1_v1_5_verify(_Digest(digest), signature, self._dkimpy)
        except (TypeError, dkim.crypto.DigestTooLargeError) as e:
            raise dkim.KeyFormatError(f"digest too large for modulus: {e}") from None
        if not valid:
            raise nacl.exceptions.BadSignatureError


class _Digest:
    """A finished SHA-256 as dkimpy's RSA code reads a hash object."""

    __slots__ = ("_digest",)
    name = "sha256"

    def __init__(self, digest: bytes) -> None:
        self._digest = digest

    def digest(self) -> bytes:
        return self._digest


def _body_hash_problem(parsed: ParsedMessage, tags: dict[bytes, bytes]) -> str | None:
    """RFC 6376 §6.1.3 step 3: "" when bh= matches the canonical body, else why not;
    None when bh= cannot be read (a permerror, as dkimpy's decoding error is)."""
    try:
        expected = base64.b64decode(re.sub(rb"\s+", b"", tags[b"bh"]))
    except (binascii.Error, ValueError):
        return None
    body = parsed.canonical_body(canon.body_method(tags.get(b"c")))
    length = int(tags[b"l"]) if b"l" in tags else None
    return "" if canon.body_hash(body, tags[b"a"], length) == expected else "body hash"


def _verify_one(
    verifier: dkim.DKIM,
    parsed: ParsedMessage,
    signature: _Signature,
    key: bytes | Status,
    policy: VerifyPolicy,
) -> Result:
    result, tags = signature.result, signature.tags
    assert tags is not None
    if isinstance(key, Status):
        reason = "key lookup failed for now" if key is Status.TEMPERROR else "no key record"
        return _with(result, key, reason)
    algorithm = tags[b"a"].lower()
    public_key, problem = key_record_problem(key, algorithm, tags, policy.rfc4871_granularity)
    if problem:
        return _with(result, Status.PERMERROR, problem)
    try:
        parsed_key = _public_key(signature.key_name, public_key)
    except Exception as e:  # dkimpy's key parsing: any failure means an unusable key
        return _with(result, Status.PERMERROR, f"key record: {_short(e)}")
    key_bits = parsed_key[1]
    if algorithm != b"ed25519-sha256" and key_bits < policy.min_rsa_bits:
        return _with(result, Status.POLICY, f"RSA key of {key_bits} bits is too short", key_bits)
    raw_headers = [h for h in verifier.headers if h[0].lower() == b"dkim-signature"]
    if signature.draft00:
        header = raw_headers[signature.index]
        return _verify_draft00(parsed, header, signature, public_key, key_bits)
    body = _body_hash_problem(parsed, tags)
    if body is None:
        return _with(result, Status.PERMERROR, "verifier: bh= is not base64", key_bits)
    if body:
        return _with(result, Status.FAIL, "body hash did not verify", key_bits)
    signed = [h.lower() for h in re.split(rb"\s*:\s*", tags[b"h"].strip())]
    try:
        # The body hash matched above; dkimpy hashes the header fields and checks the
        # signature with the checked record reduced to k= and p= (parsed once, cached).
        header = raw_headers[signature.index]
        pk, bits, ktag, tlsrpt, fast = parsed_key
        if fast is not None and algorithm == b"rsa-sha256":
            pk, ktag = fast, b"ed25519"  # see _OpenSSLRSA
        verifier.pk, verifier.keysize, verifier.ktag, verifier.seqtlsrpt = pk, bits, ktag, tlsrpt
        without_bh = {k: v for k, v in tags.items() if k != b"bh"}
        valid = verifier.verify_sig_process(without_bh, signed, header, None)
    except dkim.ValidationError as e:
        return _with(result, Status.FAIL, f"verifier: {_short(e)}", key_bits)
    except Exception as e:  # whatever else dkimpy trips over, the signature is unusable
        return _with(result, Status.PERMERROR, f"verifier: {_short(e)}", key_bits)
    if not valid:
        return _with(result, Status.FAIL, "signature did not verify", key_bits)
    return _with(result, Status.PASS, "good signature", key_bits)


def _verify_draft00(
    parsed: ParsedMessage,
    header: tuple[bytes, bytes],
    signature: _Signature,
    key: bytes,
    key_bits: int,
) -> Result:
    """LEGACY_POLICY only: a draft-00 signature, one hash over the whole message."""
    assert signature.tags is not None
    result = signature.result
    try:
        verifier = dkim.DKIM(parsed.raw, logger=QUIET_LOGGER)  # legacy: the whole message
        valid = dkim_draft00.verify(verifier.headers, verifier.body, header, signature.tags, key)
    except dkim_draft00.Draft00Error as e:
        return _with(result, Status.PERMERROR, str(e), key_bits)
    if not valid:
        return _with(result, Status.FAIL, "draft-00 signature did not verify", key_bits)
    return _with(result, Status.PASS, "good draft-00 signature (legacy)", key_bits)


def _dkim_quoted_printable(value: bytes) -> bytes:
    """RFC 6376 §2.11: =XX hex escapes, whitespace ignored."""
    value = re.sub(rb"\s+", b"", value)
    return re.sub(rb"=([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), value)


def signature_problem(tags: dict[bytes, bytes], now: float, drafts: bool = False) -> str:
    """RFC 6376 §3.5 and §6.1.1 checks of a signature's tags; "" when it may be verified."""
    version = tags.get(b"v")
    if version != b"1" and not (drafts and version in _DRAFT_VERSIONS):
        return "v= is not 1"
    # draft-ietf-dkim-base-00 had no body hash; only a draft-accepting policy gets this far.
    hashed = (b"b",) if drafts and dkim_draft00.is_draft00(tags) else (b"b", b"bh")
    for tag in (b"a", *hashed, b"d", b"h", b"s"):
        if tag not in tags:
            return f"required tag {tag.decode()}= missing"
    if tags[b"a"].lower() not in _KEY_TYPES:
        return "unknown algorithm (a=)"
    for tag in hashed:
        if not re.fullmatch(rb"[A-Za-z0-9+/\s]+=*\s*=*\s*", tags[tag]):
            return f"{tag.decode()}= is not base64"
    canonicalization = tags.get(b"c", b"simple/simple").lower().split(b"/")
    if len(canonicalization) > 2 or any(c not in (b"simple", b"relaxed") for c in canonicalization):
        return "unknown canonicalization (c=)"
    signed = [h.strip().lower() for h in tags[b"h"].split(b":")]
    if b"from" not in signed:
        return "From is not signed (h=)"
    domain = tags[b"d"].lower()
    if not domain or re.search(rb"[\s@;]", domain):
        return "invalid domain (d=)"
    if b"i" in tags:
        identity_domain = _dkim_quoted_printable(tags[b"i"]).rpartition(b"@")[2].lower()
        if identity_domain != domain and not identity_domain.endswith(b"." + domain):
            return "i= is not within d="
    if b"l" in tags and not re.fullmatch(rb"\d{1,76}", tags[b"l"]):
        return "l= is not a number"
    methods = [m.strip().lower() for m in tags.get(b"q", b"dns/txt").split(b":")]
    # The drafts named the method plain "dns" before RFC 4871 called it "dns/txt".
    if b"dns/txt" not in methods and not (drafts and version != b"1" and b"dns" in methods):
        return "no supported query method (q=)"
    return _time_problem(tags, now)


def _time_problem(tags: dict[bytes, bytes], now: float) -> str:
    for tag in (b"t", b"x"):
        if tag in tags and not re.fullmatch(rb"\d{1,12}", tags[tag]):
            return f"{tag.decode()}= is not a timestamp"
    signed_at = int(tags[b"t"]) if b"t" in tags else None
    if signed_at is not None and signed_at > now + CLOCK_SKEW:
        return "signed in the future (t=)"
    if b"x" in tags:
        expires = int(tags[b"x"])
        if expires < now - CLOCK_SKEW:
            return "signature expired (x=)"
        if signed_at is not None and expires < signed_at:
            return "x= is before t="
    return ""


def key_record_problem(
    record: bytes, algorithm: bytes, sig: dict[bytes, bytes], granularity: bool = False
) -> tuple[bytes, str]:
    """RFC 6376 §3.6.1 checks of a key record: (the k= and p= to verify with, problem).

    The g= tag of RFC 4871 is ignored unless ``granularity`` asks for RFC 4871 behaviour.
    """
    try:
        key = parse_tag_value(record)
    except InvalidTagValueList:
        return b"", "key record syntax"
    if b"v" in key and key[b"v"] != b"DKIM1":
        return b"", "key record version is not DKIM1"
    key_type = key.get(b"k", b"rsa").lower()
    public = re.sub(rb"\s+", b"", key.get(b"p", b""))
    if not public:
        return b"", "key revoked (empty p=)"
    if key_type != _KEY_TYPES[algorithm]:
        return b"", "key type does not match a="
    hashes = [h.strip().lower() for h in key.get(b"h", _HASHES[algorithm]).split(b":")]
    if _HASHES[algorithm] not in hashes:
        return b"", "key does not allow this hash (h=)"
    services = [s.strip().lower() for s in key.get(b"s", b"*").split(b":")]
    if b"*" not in services and b"email" not in services:
        return b"", "key is not for email (s=)"
    identity = _dkim_quoted_printable(sig.get(b"i", b"@" + sig[b"d"]))
    flags = [f.strip().lower() for f in key.get(b"t", b"").split(b":")]
    # t=s: the i= domain must be d= itself, not a subdomain.
    if b"s" in flags and identity.rpartition(b"@")[2].lower() != sig[b"d"].lower():
        return b"", "key requires i= in d= exactly (t=s)"
    if granularity and b"g" in key:
        # RFC 4871 §3.6.1: "*" matches any run of characters; an empty g= matches nothing.
        # Latin-1 maps bytes to characters one to one, so the match is the bytes' match.
        local_part = identity.rpartition(b"@")[0].decode("latin-1")
        if not key[b"g"] or not star_fullmatch(key[b"g"].decode("latin-1"), local_part):
            return b"", "i= local-part does not match the key's g="
    return b"k=" + key_type + b"; p=" + public, ""


def _short(error: Exception) -> str:
    """An exception as a short reason; dkimpy's messages may quote the whole tag value."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:80]


# -- signing ---------------------------------------------------------------------------------


# Parsed signing keys, by their PEM bytes. Loading an RSA key checks its mathematics, which
# costs ~15 ms — more than the signature itself — and a domain signs every message with
# the same few keys. The keys are in memory while signing anyway.
SIGNING_KEY_CACHE = 64


@functools.lru_cache(maxsize=SIGNING_KEY_CACHE)
def load_private_key(private_key: bytes) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(private_key, password=None)
    except (ValueError, TypeError):
        raise SigningError("private key is not an unencrypted PEM key") from None
    if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise SigningError("only RSA and Ed25519 keys can sign DKIM")
    return key


@functools.lru_cache(maxsize=SIGNING_KEY_CACHE)
def dkimpy_private_key(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey, algorithm: str) -> bytes:
    """The form dkimpy wants: PKCS#1 PEM for RSA, base64 of the 32-byte seed for Ed25519."""
    if algorithm == "rsa-sha256":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise SigningError("rsa-sha256 needs an RSA key")
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SigningError("ed25519-sha256 needs an Ed25519 key")
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(seed)


def parsed_signer(kind: type[dkim.DomainSigner], message: bytes, algorithm: bytes) -> Any:
    """A dkimpy signer for the message; SigningError if dkimpy cannot parse its header."""
    try:
        return kind(message, logger=QUIET_LOGGER, signature_algorithm=algorithm)
    except Exception as e:  # dkimpy's parser fails in assorted ways on malformed headers
        raise SigningError(f"message header cannot be parsed: {type(e).__name__}") from None


def sign(
    message: bytes | ParsedMessage,
    domain: str,
    selector: str,
    private_key: bytes,
    algorithm: str = "rsa-sha256",
    *,
    headers: Sequence[str] | None = None,
    identity: str | None = None,
) -> bytes:
    """The DKIM-Signature header field (folded, CRLF-terminated) to prepend to ``message``.

    ``private_key`` is a PEM key (RSA for rsa-sha256, Ed25519 for ed25519-sha256, RFC 8463).
    Canonicalisation is relaxed/relaxed. CPU-bound: from async code use ``sign_async``.
    Dual signing is two calls on the same message, both headers prepended; pass one
    ``ParsedMessage`` to both and the body is canonicalised once.
    """
    if algorithm not in ALGORITHMS:
        raise SigningError(f"unsupported algorithm {algorithm!r}")
    parsed = ParsedMessage.of(message)
    key = load_private_key(private_key)
    if (algorithm == "rsa-sha256") != isinstance(key, rsa.RSAPrivateKey):
        raise SigningError(
            f"{algorithm} needs an {'RSA' if algorithm == 'rsa-sha256' else 'Ed25519'} key"
        )
    signer = parsed_signer(dkim.DKIM, parsed.header_bytes, algorithm.encode())
    present = {name.decode("ascii", "replace").lower() for name, _ in signer.headers}
    if headers is None:
        include = [h for h in SIGNED_HEADERS if h in present]
        include += [h for h in OVERSIGNED_HEADERS if h in present]
    else:
        include = [h.lower() for h in headers]
    if "from" not in include:
        raise SigningError("the From header field must be signed (RFC 6376 §5.4)")
    try:
        return _signature_field(
            signer,
            parsed,
            selector.encode(),
            domain.encode("idna"),
            key,
            identity.encode() if identity else None,
            tuple(h.encode() for h in include),
        )
    except dkim.DKIMException as e:
        raise SigningError(f"cannot sign: {_short(e)}") from None


def _signature_field(
    signer: Any,
    parsed: ParsedMessage,
    selector: bytes,
    domain: bytes,
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
    identity: bytes | None,
    include: tuple[bytes, ...],
) -> bytes:
    """dkimpy's ``DKIM.sign`` (relaxed/relaxed, no l=), with the body hash taken from the
    shared canonical body and the signature made by OpenSSL (``cryptography``): dkimpy signs
    RSA with Python's ``pow``, ~10 ms a signature against ~1 ms. dkimpy still canonicalises
    and hashes the header fields; RSASSA-PKCS1-v1_5 and Ed25519 signatures are
    deterministic, so the field is byte for byte what dkimpy would make."""
    if identity is not None and not identity.endswith(domain):
        raise dkim.ParameterError("identity must end with domain")
    for name in set(include).intersection(signer.should_not_sign):
        raise dkim.ParameterError(f"the {name!r} header field should not be signed")
    policy = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    algorithm = signer.signature_algorithm
    body_hash = canon.body_hash(parsed.canonical_body(canon.RELAXED), algorithm)
    fields = [
        (b"v", b"1"),
        (b"a", algorithm),
        (b"c", policy.to_c_value()),
        (b"d", domain),
        (b"i", identity or b"@" + domain),
        (b"q", b"dns/txt"),
        (b"s", selector),
        (b"t", str(int(time.time())).encode("ascii")),
        (b"h", b" : ".join(include)),
        (b"bh", base64.b64encode(body_hash)),
        # As dkimpy does: b= folds onto its own line, so refolding leaves the rest alone.
        (b"b", b"0" * 60),
    ]
    name = b"DKIM-Signature"
    unsigned = dkim.RE_BTAG.sub(b"\\1", dkim.fold(_tag_list(fields), namelen=len(name)))
    hasher = hashlib.sha256()
    dkim.hash_headers(
        hasher,
        policy,
        policy.canonicalize_headers(signer.headers),
        include,
        (name, b" " + unsigned),
        dict(fields),
    )
    if isinstance(key, rsa.RSAPrivateKey):
        raw = key.sign(hasher.digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    else:
        raw = key.sign(hasher.digest())  # RFC 8463 §3: Ed25519 over the SHA-256 digest
    fields[-1] = (b"b", base64.b64encode(raw))
    return name + b": " + dkim.fold(_tag_list(fields) + b"\r\n", namelen=len(name))


def _tag_list(fields: list[tuple[bytes, bytes]]) -> bytes:
    return b"; ".join(b"=".join(f) for f in fields)


async def sign_async(
    message: bytes | ParsedMessage,
    domain: str,
    selector: str,
    private_key: bytes,
    algorithm: str = "rsa-sha256",
    *,
    headers: Sequence[str] | None = None,
    identity: str | None = None,
) -> bytes:
    """``sign`` in a worker thread."""
    return await asyncio.to_thread(
        sign, message, domain, selector, private_key, algorithm, headers=headers, identity=identity
    )


def generate_private_key(algorithm: str = "rsa-sha256") -> bytes:
    """A new PEM (PKCS#8) signing key: RSA-2048 or Ed25519."""
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "rsa-sha256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=NEW_RSA_BITS)
    elif algorithm == "ed25519-sha256":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise SigningError(f"unsupported algorithm {algorithm!r}")
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def key_record(private_key: bytes) -> str:
    """The TXT record to publish at <selector>._domainkey.<domain> (RFC 6376 §3.6.1)."""
    key = load_private_key(private_key)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode("ascii")
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")
