"""Email authentication for the MX: SPF, DKIM, DMARC and ARC, reported as one header field.

``authenticate()`` is what the SMTP pipeline calls once a message is received: it runs the
checks concurrently, decides what DMARC (and local policy) asks for, and returns the
Authentication-Results field to prepend. DomainKeys (historic) is reported there too, for
the reader only. Signing for outbound mail is ``dkim.sign`` and ``arc.seal``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Set
from dataclasses import dataclass, field

from postvern.dns import Resolver
from postvern.emailauth import arc, dkim, dmarc, domainkeys, results, spf
from postvern.emailauth.arc import Result as ARCResult
from postvern.emailauth.dkim import Result as DKIMResult
from postvern.emailauth.dmarc import Result as DMARCResult
from postvern.emailauth.domainkeys import Result as DomainKeysResult
from postvern.emailauth.headers import ParsedMessage
from postvern.emailauth.spf import Result as SPFResult

__all__ = [
    "AuthVerdict", "arc", "authenticate", "dkim", "dmarc", "domainkeys", "results", "spf",
]  # fmt: skip

ACCEPT, QUARANTINE, REJECT, TEMPFAIL = "accept", "quarantine", "reject", "tempfail"


@dataclass(frozen=True)
class AuthVerdict:
    """Everything the pipeline needs from email authentication."""

    spf: SPFResult  # the MAIL FROM identity (postmaster@HELO for a null sender)
    spf_helo: SPFResult
    dkim: list[DKIMResult]
    dmarc: DMARCResult
    arc: ARCResult
    header: bytes  # the Authentication-Results field, folded, CRLF-terminated
    policy: str  # "accept" | "quarantine" | "reject" | "tempfail"
    reason: str  # for the SMTP reply and the logs; names no mailbox
    authserv_id: str = ""
    # RFC 4870 DomainKeys: reported, never part of the verdict (RFC 7489 uses DKIM only).
    domainkeys: list[DomainKeysResult] = field(default_factory=list)

    def apply(self, message: bytes) -> bytes:
        """The message as delivered: our field first, forged ones claiming our id removed."""
        return self.header + results.remove_claiming(message, self.authserv_id)

    def apply_parsed(self, message: ParsedMessage) -> ParsedMessage:
        """``apply`` on a parsed message: the fields are moved, not parsed again."""
        doomed = results.claiming(message, self.authserv_id)
        return message.rewritten(prepend=self.header, remove=doomed)


async def authenticate(
    message: bytes | ParsedMessage,
    *,
    client_ip: str,
    helo: str,
    mail_from: str,
    resolver: Resolver,
    authserv_id: str,
    arc_trusted_domains: Set[str] = frozenset(),
    dmarc_sample: Callable[[], float] = random.random,
    dkim_policy: dkim.VerifyPolicy = dkim.VerifyPolicy(),
) -> AuthVerdict:
    """Check a received message and say what should happen to it.

    ``arc_trusted_domains`` are ARC sealers whose word we take: a DMARC failure is
    overridden when the chain passes and its newest sealers, back to one that recorded a
    DMARC pass for the same From domain, are all trusted (RFC 7489 §6.7 local policy,
    RFC 8617 §7.2). Empty (the default) means report only.
    ``dmarc_sample`` draws for DMARC pct= sampling; tests inject a fixed value.
    Pass a ``ParsedMessage`` and every check reads its one parse of the header block and
    its canonical bodies (bytes are parsed once here).
    """
    message = ParsedMessage.of(message)
    spf_mailfrom, spf_helo, dkim_results, dk_results, arc_result = await asyncio.gather(
        spf.verify_mailfrom(
            resolver, ip=client_ip, mail_from=mail_from, helo=helo, receiver=authserv_id
        ),
        spf.verify_helo(resolver, ip=client_ip, helo=helo, receiver=authserv_id),
        dkim.verify(message, resolver, policy=dkim_policy),
        domainkeys.verify(message, resolver, min_rsa_bits=dkim_policy.min_rsa_bits),
        arc.validate(message, resolver),
    )
    dmarc_result = await dmarc.evaluate(
        message, spf_mailfrom, dkim_results, resolver, sample=dmarc_sample
    )
    policy, reason = decide(dmarc_result, arc_result, arc_trusted_domains)
    resinfos = [
        results.spf_resinfo(spf_mailfrom),
        results.spf_resinfo(spf_helo),
        *(results.dkim_resinfo(r) for r in dkim_results),
        *(results.domainkeys_resinfo(r) for r in dk_results),
        results.dmarc_resinfo(dmarc_result, _override(dmarc_result, policy, reason)),
        results.arc_resinfo(arc_result, client_ip),
    ]
    return AuthVerdict(
        spf=spf_mailfrom,
        spf_helo=spf_helo,
        dkim=dkim_results,
        dmarc=dmarc_result,
        arc=arc_result,
        header=results.format_field(authserv_id, resinfos),
        policy=policy,
        reason=reason,
        authserv_id=authserv_id,
        domainkeys=dk_results,
    )


def _override(result: DMARCResult, policy: str, reason: str) -> str | None:
    """The local-policy reason when a DMARC failure was accepted anyway (trusted ARC)."""
    failed = result.status is dmarc.Status.FAIL and result.disposition is not dmarc.Policy.NONE
    if failed and policy == ACCEPT:
        return reason.rpartition("accepted: ")[2] or reason
    return None


def decide(result: DMARCResult, chain: ARCResult, arc_trusted_domains: Set[str]) -> tuple[str, str]:
    """The policy for the message and why, from DMARC and the ARC chain.

    Only DMARC turns authentication into a verdict (RFC 7489 §10.1: an SPF or DKIM failure
    alone is left to the filters). A temporary error becomes a tempfail only when it could
    change that verdict; never is a guess delivered as a verdict.
    """
    if result.status is dmarc.Status.PERMERROR and not result.from_domain:
        # RFC 5322 §3.6 requires exactly one From with an address; RFC 7489 §6.6.1 notes
        # such messages are typically rejected, as they cannot be attributed to anyone.
        return REJECT, f"DMARC: {result.reason}"
    if result.status is dmarc.Status.TEMPERROR:
        if result.spf_aligned or result.dkim_aligned:
            # A strictly aligned pass passes under any record the domain might publish.
            return ACCEPT, "DMARC policy lookup failed for now, but strictly aligned pass"
        return TEMPFAIL, "DMARC policy lookup failed for now"
    if result.status is not dmarc.Status.FAIL or result.disposition is dmarc.Policy.NONE:
        return ACCEPT, f"DMARC {result.status}" + (f": {result.reason}" if result.reason else "")
    if result.uncertain:
        return TEMPFAIL, "DMARC fails but an aligned SPF or DKIM check failed for now"
    wanted = QUARANTINE if result.disposition is dmarc.Policy.QUARANTINE else REJECT
    return _arc_override(wanted, result, chain, arc_trusted_domains)


def _arc_override(
    wanted: str, result: DMARCResult, chain: ARCResult, trusted: Set[str]
) -> tuple[str, str]:
    """RFC 7489 §6.7 and RFC 8617 §7.2: a trusted sealer's chain may explain the failure."""
    base = f"DMARC {result.disposition} policy of {result.policy_domain} fails"
    sealer = chain.newest_sealer
    if chain.status is arc.Status.PASS:
        if sealer not in trusted:
            return wanted, f"{base}; ARC chain passes but its sealer {sealer} is not trusted"
        # Only a failure caused by the forwarding is forgiven: a trusted sealer must have seen
        # DMARC pass for this From domain before the message was changed.
        witness = chain.trusted_dmarc_pass(trusted, result.from_domain)
        if not witness:
            return wanted, f"{base}; no trusted ARC sealer recorded a DMARC pass"
        return ACCEPT, f"{base}; accepted: trusted ARC sealer {witness} saw DMARC pass"
    if chain.temporary and sealer in trusted:
        return TEMPFAIL, f"{base}; trusted ARC chain could not be checked for now"
    return wanted, base
