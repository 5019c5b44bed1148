"""Authenticated Received Chain (RFC 8617): authentication results that survive forwarding.

Each intermediary that changes a message (a mailing list, a forwarding alias) records what
it verified in an ARC set: ARC-Authentication-Results, an ARC-Message-Signature over the
message and an ARC-Seal over the chain so far. A receiver can then trust a DMARC failure
caused by the forwarding itself if it trusts the sealers. Validation fetches the keys with
our async resolver and runs dkimpy's ARC code in a worker thread; sealing copies our own
Authentication-Results into the new set and signs it with dkimpy's primitives.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import hashlib
import re
import time
from collections.abc import Sequence, Set
from dataclasses import dataclass, field

import dkim
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import UnparsableKeyError, parse_pem_private_key
from dkim.util import InvalidTagValueList, parse_tag_value

from postvern.dns import DNSNameError, DNSTempError, Resolver
from postvern.emailauth.dkim import (
    MIN_RSA_BITS,
    QUIET_LOGGER,
    SIGNED_HEADERS,
    SigningError,
    dkimpy_private_key,
    key_record_problem,
    load_private_key,
    parsed_signer,
)
from postvern.emailauth.headers import HeaderBlock, ParsedMessage
from postvern.emailauth.results import our_resinfos, split_resinfos

# RFC 8617 §4.2.1: instance numbers run from 1 to 50; a longer chain is invalid (§5.1.1).
MAX_ARC_SETS = 50
# Distinct keys fetched to validate one chain. Each is a DNS lookup a sender can make us do;
# real chains have a handful of hops, so a chain needing more fails without any lookup.
MAX_KEY_LOOKUPS = 16
ARC_HEADERS = ("arc-seal", "arc-message-signature", "arc-authentication-results")
# RFC 8617 §4.1.3: ARC-Seal and ARC-Message-Signature use rsa-sha256 (as DKIM does).
ALGORITHM = b"rsa-sha256"


class Status(enum.StrEnum):
    """Chain validation status (RFC 8617 §4.4)."""

    NONE = "none"  # no ARC sets
    PASS = "pass"  # noqa: S105 (not a password) every seal and the newest AMS verify
    FAIL = "fail"  # something in the chain does not verify or is malformed


@dataclass(frozen=True)
class Result:
    status: Status
    reason: str = ""
    instances: int = 0  # highest i= seen (the number of ARC sets)
    # RFC 8617 §5.2: lowest instance from which every newer AMS still verifies; 0 when all.
    oldest_pass: int | None = None
    # (i, d=) of each ARC-Seal, newest first: who vouches for the chain.
    sealers: list[tuple[int, str]] = field(default_factory=list)
    # A key could not be fetched for now: a later retry may validate the chain.
    temporary: bool = False
    # The results each sealer recorded in its AAR (RFC 8617 §4.1.1), by instance.
    recorded: dict[int, list[str]] = field(default_factory=dict)

    @property
    def newest_sealer(self) -> str:
        return self.sealers[0][1] if self.sealers else ""

    def trusted_dmarc_pass(self, trusted: Set[str], from_domain: str) -> str:
        """The trusted sealer that saw DMARC pass for ``from_domain``, or "".

        Only the newest unbroken run of trusted sealers counts: a hop we do not trust could
        have changed the message after an earlier, trusted one recorded its results.
        """
        for instance, sealer in self.sealers:  # newest first
            if sealer not in trusted:
                return ""
            if self.recorded_dmarc_pass(instance, from_domain):
                return sealer
        return ""

    def recorded_dmarc_pass(self, instance: int, from_domain: str) -> bool:
        """Whether the AAR of ``instance`` says DMARC passed for ``from_domain``."""
        for resinfo in self.recorded.get(instance, []):
            if resinfo.lower().startswith("dmarc=pass"):
                found = re.search(r"header\.from=\"?([^\s;\"]+)", resinfo, re.IGNORECASE)
                if found and found.group(1).lower() == from_domain.lower():
                    return True
        return False


def _key_names(block: HeaderBlock) -> tuple[list[str], list[tuple[int, str]]]:
    """The key names the ARC-Seal and AMS fields point at, and (i, d=) of every seal."""
    names: set[str] = set()
    sealers: list[tuple[int, str]] = []
    for f in block.fields:
        kind = f.name.lower()
        if kind not in ("arc-seal", "arc-message-signature"):
            continue
        try:
            tags = parse_tag_value(re.sub(rb"\r?\n", b"", f.value))
        except InvalidTagValueList:
            continue
        domain = tags.get(b"d", b"").decode("utf-8", "replace").lower()
        selector = tags.get(b"s", b"").decode("utf-8", "replace")
        if domain and selector:
            names.add(f"{selector}._domainkey.{domain}")
        instance = tags.get(b"i", b"")
        if kind == "arc-seal" and instance.isdigit() and len(instance) <= 3:
            sealers.append((int(instance), domain))
    sealers.sort(reverse=True)
    return sorted(names), sealers


async def _fetch(resolver: Resolver, name: str) -> bytes | None:
    """The key record reduced to k= and p=; b"" when unusable, None on temporary failure."""
    try:
        records = await resolver.txt(name)
    except DNSNameError:
        return b""
    except DNSTempError:
        return None
    if not records:
        return b""
    domain = name.split("._domainkey.", 1)[-1].encode()
    public_key, problem = key_record_problem(records[0], ALGORITHM, {b"d": domain})
    return b"" if problem else public_key


async def validate(
    message: bytes | ParsedMessage, resolver: Resolver, *, min_rsa_bits: int = MIN_RSA_BITS
) -> Result:
    """RFC 8617 §5.2: validate the ARC chain of a received message."""
    parsed = ParsedMessage.of(message)
    if not parsed.block.malformed and not any(
        f.name.lower() in ARC_HEADERS for f in parsed.block.fields
    ):
        return Result(Status.NONE, "no ARC sets")  # what dkimpy says, without a thread
    names, sealers = _key_names(parsed.block)
    if sealers and sealers[0][0] > MAX_ARC_SETS:
        return Result(Status.FAIL, f"more than {MAX_ARC_SETS} ARC sets", sealers=sealers)
    if len(names) > MAX_KEY_LOOKUPS:
        return Result(Status.FAIL, f"chain needs more than {MAX_KEY_LOOKUPS} keys", sealers=sealers)
    fetched = await asyncio.gather(*(_fetch(resolver, name) for name in names))
    keys = dict(zip(names, fetched, strict=True))
    return await asyncio.to_thread(_validate, parsed, keys, sealers, min_rsa_bits)


def _validate(
    parsed: ParsedMessage,
    keys: dict[str, bytes | None],
    sealers: list[tuple[int, str]],
    min_rsa_bits: int,
) -> Result:
    """Worker-thread part: dkimpy's chain validation, DNS answered from ``keys``."""
    missing: list[str] = []

    def dnsfunc(name: bytes, timeout: float = 0) -> bytes:
        text = name.decode("utf-8", "replace").rstrip(".").lower()
        key = keys.get(text, b"")
        if key is None:
            missing.append(text)
            raise dkim.DnsTimeoutError("key lookup failed for now")
        return key

    try:
        # The header block only, and the body already normalised: not split into lines.
        verifier = dkim.ARC(parsed.header_bytes, logger=QUIET_LOGGER, minkey=min_rsa_bits)
        verifier.body = parsed.body
        instances, _ = verifier.sorted_arc_headers()
        if instances > MAX_ARC_SETS:
            return Result(Status.FAIL, f"more than {MAX_ARC_SETS} ARC sets", instances)
        cv, details, reason = verifier.verify(dnsfunc=dnsfunc)
    except Exception as e:  # dkimpy fails in assorted ways on malformed chains: all are "fail"
        return Result(Status.FAIL, f"malformed ARC set: {type(e).__name__}", sealers=sealers)
    if cv == dkim.CV_None:
        return Result(Status.NONE, "no ARC sets")
    oldest = _oldest_pass(details)
    temporary = bool(missing)
    if cv == dkim.CV_Pass:
        recorded = {int(str(d["instance"])): _aar_results(d.get("aar-value")) for d in details}
        return Result(Status.PASS, "chain validates", instances, oldest, sealers, False, recorded)
    if cv is None:
        # dkimpy's "chain terminated": a seal reported cv=fail; RFC 8617 §5.2 step 2 → fail.
        reason = "a sealer reported the chain as failed (cv=fail)"
    return Result(Status.FAIL, _short(reason), instances, None, sealers, temporary)


def _aar_results(value: object) -> list[str]:
    """The resinfos of an AAR value ("i=N; authserv-id; resinfo; ...")."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else ""
    _, resinfos = split_resinfos(text.split(";", 1)[1] if ";" in text else "")
    return resinfos


def _oldest_pass(details: list[dict[str, object]]) -> int:
    """RFC 8617 §5.2 step 6: walk from the newest AMS back to the first that fails."""
    for detail in details:  # newest first
        if not detail.get("ams-valid"):
            return int(str(detail["instance"])) + 1
    return 0


def _short(reason: str) -> str:
    return reason.splitlines()[0][:120] if reason else "chain does not validate"


# -- sealing ---------------------------------------------------------------------------------


def _chain_status(resinfos: list[str]) -> bytes:
    """cv= for the new seal: the arc= result we recorded (RFC 8617 §5.1.1 step 2)."""
    found = [r[4:].split()[0].lower() for r in resinfos if r.lower().startswith("arc=") and r[4:]]
    if len(found) > 1:
        return dkim.CV_Fail  # two verdicts on one chain: trust neither
    status = found[0] if found else "none"
    return {"pass": dkim.CV_Pass, "fail": dkim.CV_Fail}.get(status, dkim.CV_None)


def _newest_seal_failed(existing: list[tuple[int, tuple[bytes, bytes]]], newest: int) -> bool:
    for instance, (name, value) in existing:
        if instance == newest and name.lower() == b"arc-seal":
            try:
                return parse_tag_value(value).get(b"cv", b"").lower() == dkim.CV_Fail
            except InvalidTagValueList:
                return False
    return False


def seal(
    message: bytes,
    domain: str,
    selector: str,
    private_key: bytes,
    authserv_id: str,
    *,
    headers: Sequence[str] | None = None,
    timestamp: int | None = None,
    standard_format: bool = False,
) -> list[bytes]:
    """The next ARC set (ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results
    header fields, CRLF-terminated, in that order) to prepend to ``message``.

    ``message`` must already carry our Authentication-Results field (authserv-id
    ``authserv_id``, with the ``arc=`` result of validating the chain): its results are
    copied verbatim into the new AAR and its arc= result becomes the seal's cv= (RFC 8617
    §5.1). Returns [] when there is nothing to seal (no A-R of ours; a chain we did not
    validate; a chain whose newest seal already says cv=fail). ``standard_format`` writes
    tags in the fixed order the ARC test suite expects.
    CPU-bound: from async code use ``seal_async``.
    """
    resinfos = our_resinfos(message, authserv_id)
    if not resinfos:
        return []
    cv = _chain_status(resinfos)
    try:
        key = parse_pem_private_key(dkimpy_private_key(load_private_key(private_key), "rsa-sha256"))
    except UnparsableKeyError:
        raise SigningError("cannot seal: the key does not parse") from None
    signer = parsed_signer(dkim.ARC, message, ALGORITHM)
    newest, existing = signer.sorted_arc_headers()
    if _newest_seal_failed(existing, newest):
        return []  # §5.1 step 1: a chain its last sealer declared failed is over
    instance = newest + 1
    if instance > MAX_ARC_SETS:
        raise SigningError(f"the chain already has {MAX_ARC_SETS} ARC sets")
    if instance == 1:
        cv = dkim.CV_None  # §5.1.1: the first set vouches for no chain
    elif cv == dkim.CV_None:
        return []  # a chain is there but we recorded no verdict on it
    present = {name.decode("ascii", "replace").lower() for name, _ in signer.headers}
    if headers is None:
        include = [h for h in (*SIGNED_HEADERS, "dkim-signature") if h in present]
    else:
        include = [h.lower() for h in headers]
    if "from" not in include:
        raise SigningError("the From header field must be signed")
    aar = f"i={instance}; {authserv_id}" + "".join(f";\r\n {r}" for r in resinfos) + "\r\n"
    return _sign_set(
        signer,
        key,
        instance,
        cv,
        aar.encode("utf-8"),
        [domain.encode("idna"), selector.encode()],
        [h.encode() for h in include],
        str(timestamp if timestamp is not None else int(time.time())).encode(),
        chain=[h for _, h in existing] if cv != dkim.CV_Fail else [],
        standard_format=standard_format,
    )


def _sign_set(
    signer: dkim.ARC,
    key: dict[str, int],
    instance: int,
    cv: bytes,
    aar: bytes,
    domain_selector: list[bytes],
    include: list[bytes],
    timestamp: bytes,
    *,
    chain: list[tuple[bytes, bytes]],
    standard_format: bool,
) -> list[bytes]:
    """Make the AMS over the message and the AS over the chain (RFC 8617 §5.1.2, §5.1.3).

    Built from dkimpy's canonicalisation and signing pieces; each new field is prepended to
    the signer's header list so the next signature sees it where a receiver will.
    """
    domain, selector = domain_selector
    relaxed = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    signer.hasher = dkim.HASH_ALGORITHMS[ALGORITHM]
    number = str(instance).encode()

    chain.insert(0, (b"ARC-Authentication-Results", aar))
    signer.headers = relaxed.canonicalize_headers(chain[:1]) + signer.headers
    body_hash = base64.b64encode(hashlib.sha256(relaxed.canonicalize_body(signer.body)).digest())
    ams_fields = [
        (b"i", number), (b"a", ALGORITHM), (b"c", b"relaxed/relaxed"), (b"d", domain),
        (b"s", selector), (b"t", timestamp), (b"h", b" : ".join(include)),
        (b"bh", body_hash), (b"b", b"0" * 60),
    ]  # fmt: skip
    ams = signer.gen_header(
        ams_fields, include, relaxed, b"ARC-Message-Signature", key, standard_format
    )
    chain.insert(0, (b"ARC-Message-Signature", ams))
    signer.headers = relaxed.canonicalize_headers(chain[:1]) + signer.headers

    seal_fields = [
        (b"i", number), (b"cv", cv), (b"a", ALGORITHM), (b"d", domain), (b"s", selector),
        (b"t", timestamp), (b"b", b"0" * 60),
    ]  # fmt: skip
    sealed = [name.lower() for name, _ in reversed(chain)]
    if cv == dkim.CV_Fail:
        # §5.1.3: a failed chain is not vouched for; the seal covers only its own set,
        # which dkimpy's bottom-up header selection finds once the list is reversed.
        signer.headers.reverse()
    arc_seal = signer.gen_header(seal_fields, sealed, relaxed, b"ARC-Seal", key, standard_format)
    return [
        b"ARC-Seal: " + arc_seal,
        b"ARC-Message-Signature: " + ams,
        b"ARC-Authentication-Results: " + aar,
    ]


async def seal_async(
    message: bytes,
    domain: str,
    selector: str,
    private_key: bytes,
    authserv_id: str,
    *,
    headers: Sequence[str] | None = None,
    timestamp: int | None = None,
) -> list[bytes]:
    """``seal`` in a worker thread."""
    return await asyncio.to_thread(
        seal,
        message,
        domain,
        selector,
        private_key,
        authserv_id,
        headers=headers,
        timestamp=timestamp,
    )
