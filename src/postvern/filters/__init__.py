"""The content filter of the inbound pipeline: one verdict, with reasons, per message.

:func:`scan` reads a message once (:mod:`.content`), scores it with the shipped spam model
and the user's own learning (:mod:`.spam`), applies the phishing rules (:mod:`.phishing`),
the header and structure rules (:mod:`.headers`) and the wanted-mail evidence
(:mod:`.wanted`), inspects attachments (:mod:`.attachments`) and asks clamd about viruses
(:mod:`.clamd`), then sums everything into a :class:`~.verdict.Verdict`, each family of
evidence within its bounds (:mod:`.families`: no one family junks a message alone). CPU
work runs in a thread; the virus scan runs beside it on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from postvern.filters.attachments import (
    Finding,
    MacroChecker,
    gives_password,
    inspect_attachments,
)
from postvern.filters.blocklist import Blocklist
from postvern.filters.body import check_body
from postvern.filters.clamd import MAX_STREAM_BYTES, ClamdClient, ClamdError
from postvern.filters.content import Content, read_content
from postvern.filters.extract import extract
from postvern.filters.families import caps
from postvern.filters.features import spam_features
from postvern.filters.headers import check_headers
from postvern.filters.macros import check_macros
from postvern.filters.phishing import PhishingContext, check_phishing
from postvern.filters.sender import SenderIdentity, identity_from_message
from postvern.filters.spam import (
    ShippedModel,
    UserModel,
    UserModelError,
    abstains,
    shipped_model,
    user_points,
)
from postvern.filters.verdict import Action, Hit, Verdict
from postvern.filters.wanted import Authenticated, Correspondence, check_wanted

if TYPE_CHECKING:
    from postvern.config import Settings
    from postvern.emailauth import AuthVerdict

__all__ = [
    "AuthSummary",
    "Correspondence",
    "FilterSettings",
    "ScanContext",
    "SenderIdentity",
    "UserModel",
    "UserModelError",
    "Verdict",
    "analyse",
    "identity_from_message",
    "scan",
]

log = logging.getLogger(__name__)

# Authentication results, in points. DMARC fail is the domain owner saying "not us"; SPF
# and DKIM alone fail for forwarded mail too, so they weigh less. A DMARC pass proves who
# sent a message, not that it is honest (spammers authenticate their own domains), so its
# credit is small, as in rspamd (DMARC_POLICY_ALLOW, -0.5); a domain that publishes an
# enforcing policy (p=quarantine or p=reject) runs its mail deliberately and earns a little
# more. The credit is withheld when a phishing rule matched, since a look-alike domain
# authenticates as well as any other.
AUTH_POINTS = {
    "AUTH_DMARC_FAIL": 3.0,
    "AUTH_SPF_FAIL": 1.5,
    "AUTH_SPF_SOFTFAIL": 0.5,
    "AUTH_DKIM_FAIL": 1.0,
    "AUTH_DMARC_PASS": -0.5,
    "AUTH_DMARC_PASS_ENFORCED": -1.0,
}
ENFORCING_DMARC_POLICIES = frozenset({"quarantine", "reject"})
DANGEROUS_ATTACHMENT_POINTS = 10.0
SUSPICIOUS_ATTACHMENT_POINTS = 2.5
# An encrypted attachment and its password in the same message: the sender keeps the file
# from every scanner on the way and still lets the recipient open it, the way malware and
# phishing lures travel (a careful sender sends the password another way). On top of the
# points for the encrypted file itself.
PASSWORD_GIVEN_POINTS = 2.0
# Reasons listed in the verdict: the strongest ones; the header must stay readable.
MAX_REASONS = 12
# Hits weaker than this are counted but not named.
MIN_REASON_POINTS = 0.05


@dataclass(frozen=True, slots=True)
class FilterSettings:
    """The filter part of the configuration (``[filters]`` in postvern.toml)."""

    junk_score: float = 5.0
    reject_score: float = 15.0
    clamd: str | None = None  # "unix:/path" or "host:port"; None: no virus scanning
    clamd_timeout: float = 30.0
    # Match clamd's StreamMaxLength; a larger message is scanned part by part.
    clamd_max_stream: int = MAX_STREAM_BYTES
    attachment_policy: Literal["reject", "quarantine"] = "reject"
    url_blocklist: str | None = None  # path of the blocklist file
    on_scanner_failure: Literal["tempfail", "accept"] = "tempfail"

    @classmethod
    def from_config(cls, settings: Settings) -> FilterSettings:
        f = settings.filters
        blocklist = str(settings.path(f.url_blocklist)) if f.url_blocklist else None
        return cls(
            junk_score=f.spam_junk_score,
            reject_score=f.spam_reject_score,
            clamd=f.clamd,
            clamd_timeout=f.clamd_timeout,
            attachment_policy="quarantine" if f.attachment_policy == "quarantine" else "reject",
            url_blocklist=blocklist,
            on_scanner_failure="accept" if f.on_scanner_failure == "accept" else "tempfail",
        )


@dataclass(frozen=True, slots=True)
class AuthSummary:
    """Results of SPF, DKIM and DMARC (RFC 8601 result words: pass, fail, softfail, none...)."""

    spf: str = "none"
    dkim: str = "none"  # the best result over all signatures
    dmarc: str = "none"
    dkim_domains: tuple[str, ...] = ()  # d= of the signatures that verified
    spf_domain: str = ""  # the MAIL FROM (or HELO) domain, when SPF passed
    dmarc_policy: str = "none"  # the From domain's requested policy (p= or sp=)
    arc_sealers: tuple[str, ...] = ()  # d= of the ARC-Seals of a chain that validated

    def authenticated(self) -> Authenticated:
        """The identities a wanted-mail rule may trust."""
        signers = (self.dkim_domains if self.dkim == "pass" else ()) + self.arc_sealers
        return Authenticated(
            signers=signers, from_verified=self.dmarc == "pass", from_failed=self.dmarc == "fail"
        )

    @classmethod
    def from_verdict(cls, auth: AuthVerdict) -> AuthSummary:
        """The summary of postvern.emailauth's verdict."""
        passed = [r.domain for r in auth.dkim if str(r.status) == "pass" and r.domain]
        dkim = "pass" if passed else _best((str(r.status) for r in auth.dkim), "none")
        spf = str(auth.spf.status)
        spf_domain = auth.spf.domain if spf == "pass" else ""
        if not spf_domain and spf in ("none", "neutral") and str(auth.spf_helo.status) == "pass":
            spf_domain = auth.spf_helo.domain  # a null sender: the HELO identity vouches
        arc_ok = str(auth.arc.status) == "pass"
        return cls(
            spf=spf,
            dkim=dkim,
            dmarc=str(auth.dmarc.status),
            dkim_domains=tuple(dict.fromkeys(d.lower() for d in passed)),
            spf_domain=spf_domain.lower(),
            dmarc_policy=str(auth.dmarc.requested),
            arc_sealers=tuple(d.lower() for _, d in auth.arc.sealers) if arc_ok else (),
        )


def _best(statuses: Iterable[str], default: str) -> str:
    """The most telling DKIM result when none passed (RFC 8601 §2.7.1 words)."""
    seen = set(statuses)
    for status in ("fail", "permerror", "temperror", "neutral", "policy"):
        if status in seen:
            return status
    return default


@dataclass(slots=True)
class ScanContext:
    """What the pipeline knows about a message besides its bytes."""

    recipient_domains: tuple[str, ...] = ()
    user_model: UserModel | None = None  # the recipient's, when their mailbox is open
    # Whom the recipient wrote to, from their Sent folder (postvern.filters.wanted).
    correspondence: Correspondence | None = None
    auth: AuthSummary = field(default_factory=AuthSummary)
    client_ip: str = ""
    settings: FilterSettings = field(default_factory=FilterSettings)
    # Tests and tools may replace the olevba child process (None: skip macro analysis).
    macro_checker: MacroChecker | None = check_macros
    # The benchmark tries models trained without a source (None: the shipped model).
    model: ShippedModel | None = None


@dataclass(slots=True)
class Analysis:
    """Everything the CPU-bound part found, before the virus scan's answer is known."""

    hits: list[Hit] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    spam_probability: float | None = None


async def scan(raw: bytes, ctx: ScanContext) -> Verdict:
    """Scan one message. Never raises: failures become ``tempfail`` (or are accepted,
    with a reason, when ``on_scanner_failure = "accept"``)."""
    (analysis, analysis_error), (virus, scan_error) = await asyncio.gather(
        asyncio.to_thread(_analyse_guarded, raw, ctx), _virus_scan(raw, ctx.settings)
    )
    return decide(analysis, ctx.settings, virus=virus, error=scan_error or analysis_error)


def _analyse_guarded(raw: bytes, ctx: ScanContext) -> tuple[Analysis, str | None]:
    try:
        return analyse(raw, ctx), None
    except Exception as exc:  # a filter bug must not pass mail unexamined
        log.exception("content filter failed: %s", type(exc).__name__)
        return Analysis(), "content filter failed"


async def _virus_scan(raw: bytes, settings: FilterSettings) -> tuple[str | None, str | None]:
    if not settings.clamd:
        return None, None
    try:
        client = ClamdClient(
            settings.clamd, timeout=settings.clamd_timeout, max_stream=settings.clamd_max_stream
        )
        if len(raw) <= client.max_stream:
            return (await client.scan(raw)).virus, None
        # Larger than clamd takes in one stream: scan each decoded part on its own (a
        # part that alone is too large still fails with ClamdTooLarge).
        message = await asyncio.to_thread(extract, raw)
        parts = [message.text.encode(), message.html.encode()]
        for data in [*parts, *(a.data for a in message.attachments)]:
            result = await client.scan(data)
            if result.virus:
                return result.virus, None
        return None, None
    except ClamdError as exc:
        log.warning("virus scan failed: %s", type(exc).__name__)
        return None, str(exc)
    except Exception as exc:  # an unexpected failure is still a failed scan, not a pass
        log.exception("virus scan failed: %s", type(exc).__name__)
        return None, "virus scan failed"


def analyse(raw: bytes, ctx: ScanContext) -> Analysis:
    """The CPU-bound checks (blocking: call it in a thread). Never needs the network."""
    content = read_content(raw)
    sender = sender_identity(content, ctx)
    analysis = Analysis()
    analysis.hits += _spam_hits(content, ctx, sender, analysis)
    phishing_ctx = PhishingContext(
        recipient_domains=ctx.recipient_domains,
        verified_domains=ctx.auth.dkim_domains if ctx.auth.dkim == "pass" else (),
        blocklist=shared_blocklist(ctx.settings.url_blocklist),
    )
    phishing = check_phishing(content, phishing_ctx)
    analysis.hits += phishing
    analysis.hits += _auth_hits(ctx.auth, claims_identity=bool(phishing))
    analysis.hits += check_headers(content)
    analysis.hits += check_body(content)
    analysis.hits += check_wanted(content, ctx.auth.authenticated(), ctx.correspondence)
    analysis.findings = inspect_attachments(content.message.attachments, ctx.macro_checker)
    analysis.hits += _attachment_hits(analysis.findings, content)
    return analysis


def sender_identity(content: Content, ctx: ScanContext) -> SenderIdentity:
    """Who sent the message, as far as the authentication results show."""
    auth = ctx.auth
    return SenderIdentity(
        from_addr=content.message.from_addr,
        from_verified=auth.dmarc == "pass",
        dkim_domains=auth.dkim_domains if auth.dkim == "pass" else (),
        spf_domain=auth.spf_domain if auth.spf == "pass" else "",
        ip=ctx.client_ip,
    )


def _spam_hits(
    content: Content, ctx: ScanContext, sender: SenderIdentity, analysis: Analysis
) -> list[Hit]:
    model = ctx.model or shipped_model()
    features = spam_features(content)
    base = model.score(features)
    analysis.spam_probability = base.probability
    if abstains(base.known):
        detail = f"abstains: {base.known} known features"
    else:
        detail = f"spam probability {base.probability:.0%}"
    hits = [Hit("SPAM_MODEL", base.points, detail)]
    if ctx.user_model is None:
        return hits
    evidence = ctx.user_model.evidence(content, sender)
    if evidence.token_logit:
        # The user's marks are their own family, one point per unit of log-odds.
        points = user_points(evidence.token_logit)
        hits.append(Hit("USER_LEARNED", points, "your Junk/Not-Junk marks"))
    if evidence.reputation_points:
        points = evidence.reputation_points
        hits.append(Hit("SENDER_REPUTATION", points, evidence.reputation_reason))
    return hits


def _auth_hits(auth: AuthSummary, *, claims_identity: bool) -> list[Hit]:
    hits = []
    if auth.dmarc == "fail":
        hits.append(Hit("AUTH_DMARC_FAIL", AUTH_POINTS["AUTH_DMARC_FAIL"], "DMARC failed"))
    elif auth.dmarc == "pass" and not claims_identity:
        enforced = auth.dmarc_policy in ENFORCING_DMARC_POLICIES
        code = "AUTH_DMARC_PASS_ENFORCED" if enforced else "AUTH_DMARC_PASS"
        hits.append(Hit(code, AUTH_POINTS[code], f"DMARC passed (p={auth.dmarc_policy})"))
    if auth.spf == "fail":
        hits.append(Hit("AUTH_SPF_FAIL", AUTH_POINTS["AUTH_SPF_FAIL"], "SPF failed"))
    elif auth.spf == "softfail":
        hits.append(Hit("AUTH_SPF_SOFTFAIL", AUTH_POINTS["AUTH_SPF_SOFTFAIL"], "SPF softfail"))
    if auth.dkim == "fail":
        hits.append(Hit("AUTH_DKIM_FAIL", AUTH_POINTS["AUTH_DKIM_FAIL"], "DKIM failed"))
    return hits


def _attachment_hits(findings: list[Finding], content: Content) -> list[Hit]:
    hits = []
    dangerous = [f for f in findings if f.dangerous]
    suspicious = [f for f in findings if not f.dangerous]
    if dangerous:
        hits.append(Hit("DANGEROUS_ATTACHMENT", DANGEROUS_ATTACHMENT_POINTS, str(dangerous[0])))
    if suspicious:
        hits.append(Hit("SUSPICIOUS_ATTACHMENT", SUSPICIOUS_ATTACHMENT_POINTS, str(suspicious[0])))
    encrypted = [f for f in findings if f.encrypted]
    if encrypted and gives_password(f"{content.judged_subject}\n{content.judged_text}"):
        why = f"the message gives the password of {encrypted[0].where}"
        hits.append(Hit("ATTACHMENT_PASSWORD_GIVEN", PASSWORD_GIVEN_POINTS, why))
    return hits


def decide(
    analysis: Analysis,
    settings: FilterSettings,
    *,
    virus: str | None = None,
    error: str | None = None,
) -> Verdict:
    """Sum the hits and choose the action (virus, scanner failure, attachments, score)."""
    hits = list(analysis.hits)
    if error and settings.on_scanner_failure == "accept":
        hits.append(Hit("SCAN_INCOMPLETE", 0.0, error))
    if virus:
        hits.append(Hit("VIRUS", 100.0, virus))
    # No family junks alone: each is capped (postvern.filters.families), and the cap is a
    # hit of its own so that the score stays the sum of the hits.
    hits += caps(hits)
    # The action follows the exact sum; the verdict shows it rounded.
    total = sum(h.points for h in hits)
    dangerous = [str(f) for f in analysis.findings if f.dangerous]
    action = _action(total, settings, virus=virus, error=error, dangerous=bool(dangerous))
    named = sorted(
        (h for h in hits if abs(h.points) >= MIN_REASON_POINTS or h.code == "SCAN_INCOMPLETE"),
        key=lambda h: -abs(h.points),
    )
    reasons = [str(h) for h in named[:MAX_REASONS]]
    if error and action == "tempfail":
        reasons.insert(0, "SCAN_FAILED " + error)
    return Verdict(
        score=round(total, 2),
        action=action,
        reasons=reasons,
        virus=virus,
        spam_probability=analysis.spam_probability,
        hits=hits,
        dangerous=dangerous,
        scanner_error=error,
        junk_threshold=settings.junk_score,
    )


def _action(
    score: float, settings: FilterSettings, *, virus: str | None, error: str | None,
    dangerous: bool,
) -> Action:  # fmt: skip
    if virus:
        return "reject"
    if error and settings.on_scanner_failure != "accept":
        return "tempfail"
    if dangerous and settings.attachment_policy == "reject":
        return "reject"
    if score >= settings.reject_score:
        return "reject"
    if dangerous or score >= settings.junk_score:
        return "junk"
    return "inbox"


_blocklists: dict[str, Blocklist] = {}
_blocklists_lock = threading.Lock()


def shared_blocklist(path: str | None) -> Blocklist | None:
    """One :class:`Blocklist` per path for the process, so its file is parsed once per
    change rather than once per message."""
    if not path:
        return None
    with _blocklists_lock:
        blocklist = _blocklists.get(path)
        if blocklist is None:
            blocklist = _blocklists[path] = Blocklist(path)
        return blocklist
