"""The inbound pipeline: from an accepted DATA to durable copies in every recipient's mailbox.

    RCPT ─► resolve (aliases, +tag, catch-all) ─► quota
    DATA ─► emailauth (SPF, DKIM, DMARC, ARC) ─► filters (virus, spam, phishing)
         ─► verdict: reject 5xx · tempfail 4xx · Junk · INBOX
         ─► trace headers ─► each local mailbox (direct or sealed spool) ─► forwards ─► 250

The SMTP layer answers with the reply this returns. 250 is returned only when every copy is
fsynced; if any copy fails, the copies already made are withdrawn and the answer is 451, so
the sender retries and nothing is delivered twice or half.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from postvern import emailauth
from postvern.delivery import headers
from postvern.delivery.srs import SRS, ForgedSRS, is_srs
from postvern.delivery.userrules import Filing, SharedVerdict, UserRules, sender_of
from postvern.directory.db import Directory, Resolution, User
from postvern.dns import Resolver
from postvern.e2e.inbound import protect_copy
from postvern.emailauth import AuthVerdict, dmarc
from postvern.emailauth.headers import ParsedMessage
from postvern.filters.verdict import HEADER_NAME as VERDICT_HEADER
from postvern.smtp.replies import Reply
from postvern.store.service import MailboxRegistry, Receipt
from postvern.store.spool import SpoolItem

log = logging.getLogger(__name__)
T = TypeVar("T")


RCPT_OK = Reply(250, "2.1.5", "recipient OK")
NOT_OURS = Reply(550, "5.7.1", "relaying denied: we do not accept mail for that domain")
UNKNOWN_USER = Reply(550, "5.1.1", "no such user here")
# An address of ours whose aliases lead to no mailbox and no outside address: accepting it
# would drop the mail, so it is refused like an unknown user.
DEAD_END = Reply(550, "5.1.1", "no mailbox here by that name (the alias leads nowhere)")
# RFC 5321 §6.3: a message caught in a routing loop is refused with a permanent error;
# 5.4.6 is RFC 3463's "routing loop detected".
ROUTING_LOOP = Reply(550, "5.4.6", "routing loop detected for this address")
# RFC 5321 §6.3: a message whose Received fields show it has passed through too many hops
# is in a loop (forwards to the outside that forward back) and must be refused, not sent
# round again. 100 is RFC 5321's own example of a large value; Postfix uses 50.
MAX_HOPS = 100
TOO_MANY_HOPS = Reply(554, "5.4.6", f"too many hops (over {MAX_HOPS} Received fields): mail loop")
TEMP_LOOKUP = Reply(451, "4.3.0", "temporary failure looking up the recipient, try again")
MAILBOX_FULL = Reply(452, "4.2.2", "mailbox full, try again later")
STORE_FAILED = Reply(451, "4.3.0", "temporary failure storing the message, try again")
NO_FORWARDING = Reply(451, "4.3.0", "forwarding is not available right now, try again")


@dataclass
class Recipient:
    address: str
    users: tuple[User, ...]
    external: tuple[str, ...]
    # The domain's own attachment policy (None: the server's), read with the recipient so
    # the filter stage needs no directory round trip of its own; ``policy_known`` False:
    # not read (SRS bounces), the filter stage looks it up.
    attachment_policy: str | None = None
    policy_known: bool = False


@dataclass
class Transaction:
    """What the SMTP session knows when it hands over a message."""

    client_ip: str | None  # None keeps it out of Received (submission)
    helo: str
    mail_from: str
    client_name: str | None = None
    protocol: str = "ESMTP"  # the Received "with" keyword (RFC 3848)
    tls: str | None = None
    authenticated: str | None = None
    recipients: list[Recipient] = field(default_factory=list)
    queue_id: str = field(default_factory=headers.new_queue_id)


@dataclass
class FilterVerdict:
    action: str  # inbox | junk | reject | tempfail
    header: bytes  # X-Postvern-Spam field, CRLF-terminated (may be empty)
    reason: str
    score: float | None = None  # the filter's points, for each user's own Junk threshold


class ContentFilter(Protocol):
    async def check(
        self, raw: bytes, txn: Transaction, auth: AuthVerdict | None
    ) -> FilterVerdict: ...


class OutboundQueue(Protocol):
    async def enqueue(
        self, mail_from: str, recipients: list[str], message: bytes, *, queue_id: str | None = None
    ) -> str:
        """Durably queue ``message``; returns the queue id once it is committed. Pass the
        transaction's ``queue_id`` so the reply, the logs and the queue name one id."""
        ...


RemoteSender = Callable[[bytes, list[str]], Awaitable[None]]
# Where one user's copy goes, after their own rules (delivery/userrules.py); called in a
# worker thread, so it may read the directory.
FilingRule = Callable[[User], Filing]
INBOX = Filing(junk=False, header=b"")


class Forwarder(Protocol):
    async def forward(
        self, raw: bytes, txn: Transaction, targets: Sequence[str], auth: AuthVerdict | None
    ) -> None:
        """Queue ``raw`` durably for the outside addresses; raise on failure."""
        ...


class InboundPipeline:
    def __init__(
        self,
        *,
        hostname: str,
        directory: Directory,
        registry: MailboxRegistry,
        resolver: Resolver | None = None,
        arc_trusted_domains: frozenset[str] = frozenset(),
        content_filter: ContentFilter | None = None,
        forwarder: Forwarder | None = None,
        srs: SRS | None = None,
        default_quota: int = 0,
    ) -> None:
        self.hostname = hostname
        self.directory = directory
        self.registry = registry
        self.resolver = resolver
        self.arc_trusted_domains = arc_trusted_domains
        self.content_filter = content_filter
        self.forwarder = forwarder
        self.srs = srs
        self.default_quota = default_quota  # for users without a quota of their own
        self.user_rules = UserRules(directory)

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.registry.executor, fn, *args)

    # -- RCPT --------------------------------------------------------------------------

    async def is_local_domain(self, domain: str) -> bool:
        return bool(await self._thread(self.directory.has_domain, domain))

    def _lookup(self, address: str) -> tuple[Resolution | Reply | None, str | None]:
        """Worker-thread part of RCPT, in one hand-off (each costs the event loop a thread
        round trip): whether the domain is ours (NOT_OURS if not), the address's resolution
        (None for an SRS address, resolved apart), and the domain's attachment policy."""
        domain = address.rpartition("@")[2]
        if not self.directory.has_domain(domain):
            return NOT_OURS, None
        policy = self.directory.attachment_policy(domain)
        if is_srs(address):
            return None, policy
        return self.directory.resolve(address), policy

    async def check_recipient(self, address: str) -> tuple[Reply, Recipient | None]:
        """Decide RCPT TO: unknown users are refused now, not bounced later (no backscatter)."""
        try:
            resolution, policy = await self._thread(self._lookup, address)
            if isinstance(resolution, Reply):
                return resolution, None
            if resolution is None and is_srs(address):
                return await self._srs_recipient(address)
        except Exception:
            # The directory could not answer (busy, I/O): the sender retries, nothing is lost.
            log.exception("recipient lookup failed")
            return TEMP_LOOKUP, None
        if resolution is None:
            return UNKNOWN_USER, None
        refused = _dead_end_reply(resolution)
        if refused is not None:
            return refused, None
        if resolution.external and self.forwarder is None:
            return NO_FORWARDING, None
        for user in resolution.users:
            if await self._over_quota(user):
                return MAILBOX_FULL, None
        return RCPT_OK, Recipient(
            address, resolution.users, resolution.external, policy, policy_known=True
        )

    async def _srs_recipient(self, address: str) -> tuple[Reply, Recipient | None]:
        """A bounce to an address we rewrote when forwarding goes back to the original sender."""
        if self.srs is None or self.forwarder is None:
            return UNKNOWN_USER, None
        try:
            original = self.srs.reverse(address)
        except ForgedSRS:
            return Reply(550, "5.1.1", "invalid or expired SRS address"), None
        resolution = await self._thread(self.directory.resolve, original)
        if resolution is not None:
            refused = _dead_end_reply(resolution)
            if refused is not None:
                return refused, None
            return RCPT_OK, Recipient(address, resolution.users, resolution.external)
        if await self.is_local_domain(original.rpartition("@")[2]):
            return UNKNOWN_USER, None
        return RCPT_OK, Recipient(address, (), (original,))

    async def _over_quota(self, user: User) -> bool:
        quota = user.quota or self.default_quota  # as IMAP's GETQUOTA reports it
        if not quota:
            return False
        usage = await self.registry.usage_estimate(user)
        return usage >= quota

    # -- DATA --------------------------------------------------------------------------

    async def deliver(self, txn: Transaction, raw: bytes) -> Reply:
        auth: AuthVerdict | None = None
        # One parse of the header block travels the whole pipeline: SPF, DKIM, ARC, DMARC
        # and the header rewriting read it (and DKIM's canonical bodies) instead of each
        # parsing the bytes again.
        parsed = ParsedMessage(raw)
        del raw  # held once: ``parsed.raw`` from here on
        if len(parsed.block.get_all("Received")) > MAX_HOPS:
            log.warning("message refused: more than %d Received fields (a mail loop)", MAX_HOPS)
            return TOO_MANY_HOPS
        if self.resolver is not None and txn.authenticated is None and txn.client_ip:
            auth = await emailauth.authenticate(
                parsed,
                client_ip=txn.client_ip,
                helo=txn.helo,
                mail_from=txn.mail_from,
                resolver=self.resolver,
                authserv_id=self.hostname,
                arc_trusted_domains=self.arc_trusted_domains,
            )
            if auth.policy == "reject":
                return Reply(550, "5.7.1", auth.reason)
            if auth.policy == "tempfail":
                return Reply(451, "4.7.0", auth.reason)
            # Our Authentication-Results first; any incoming one claiming our name removed.
            parsed = auth.apply_parsed(parsed)
        verdict: FilterVerdict | None = None
        if self.content_filter is not None:
            # Only our verdict counts: a sender's own X-Postvern-Spam goes.
            parsed = parsed.rewritten(remove=parsed.block.get_all(VERDICT_HEADER))
            verdict = await self.content_filter.check(parsed.raw, txn, auth)
            if verdict.action == "reject":
                return Reply(554, "5.7.1", verdict.reason)  # RFC 5321 §4.2.3: refused
            if verdict.action == "tempfail":
                return Reply(451, "4.7.0", verdict.reason)
        quarantined = auth is not None and auth.policy == "quarantine"
        shared = SharedVerdict(
            junk=(verdict is not None and verdict.action == "junk") or quarantined,
            score=verdict.score if verdict is not None else None,
            quarantined=quarantined,
        )
        sender = sender_of(
            [f.text() for f in parsed.block.get_all("From")],
            txn.mail_from,
            authenticated=txn.authenticated is not None
            or (auth is not None and auth.dmarc.status is dmarc.Status.PASS),
        )
        message = (verdict.header if verdict else b"") + parsed.raw
        del parsed
        rules = self.user_rules

        def filing(user: User) -> Filing:
            return rules.file(user.id, shared, sender)

        external = list(dict.fromkeys(t for r in txn.recipients for t in r.external))
        forwarder = self.forwarder

        async def forward(msg: bytes, targets: list[str]) -> None:
            assert forwarder is not None
            await forwarder.forward(msg, txn, targets, auth)

        return await self.store(txn, message, filing=filing, remote=external, send_remote=forward)

    async def store(
        self,
        txn: Transaction,
        message: bytes,
        *,
        filing: FilingRule | None = None,
        remote: Sequence[str] = (),
        send_remote: RemoteSender | None = None,
    ) -> Reply:
        """Every local copy, then the remote hand-off, all or nothing.

        ``filing`` decides, per user, whether their copy goes to Junk (None: the inbox).

        Local copies come first because they can be withdrawn; the remote hand-off (the
        durable outbound queue) comes last, so if it fails nothing stays behind.
        """
        done: list[Receipt] = []
        seen: set[str] = set()
        try:
            for rcpt in txn.recipients:
                for user in rcpt.users:
                    if user.id in seen:
                        continue  # one copy per mailbox, however many of its names were used
                    seen.add(user.id)
                    trace = self._trace(txn, rcpt.address)
                    item = await self._thread(self._copy, user, trace, message, filing)
                    done.append(await self.registry.deliver_undoable(user, item))
            if remote:
                assert send_remote is not None
                await send_remote(message, list(remote))
        except Exception:
            log.exception("delivery failed; withdrawing %d stored copies", len(done))
            for receipt in done:
                try:
                    await receipt.withdraw()
                except Exception:
                    log.exception("could not withdraw a copy")
            return STORE_FAILED
        for receipt in done:
            await receipt.close()
        return Reply(250, "2.0.0", f"OK queued as {txn.queue_id}")

    def _copy(
        self, user: User, trace: bytes, message: bytes, filing: FilingRule | None
    ) -> SpoolItem:
        """Worker-thread part of one user's copy: their filing rules (directory reads), then
        encryption to their own key if they chose it, before it is stored; one hand-off."""
        filed = filing(user) if filing is not None else INBOX
        copy = protect_copy(self.directory, user, trace + filed.header + message)
        return SpoolItem(copy, "\\Junk" if filed.junk else None)

    def _trace(self, txn: Transaction, recipient: str) -> bytes:
        return (
            headers.return_path(txn.mail_from)
            + headers.delivered_to(recipient)
            + headers.received(
                helo=txn.helo,
                client_ip=txn.client_ip,
                client_name=txn.client_name,
                by=self.hostname,
                protocol=txn.protocol,
                queue_id=txn.queue_id,
                recipient=recipient,
                tls=txn.tls,
            )
        )


def _dead_end_reply(resolution: Resolution) -> Reply | None:
    """The refusal for an address of ours that leads nowhere; None if mail can arrive.

    Logged without the address (the logs name no one): what is wrong is in ``alias list``.
    """
    if not resolution.dead_end:
        return None
    if resolution.routing_loop:
        log.warning("recipient refused: its aliases form a routing loop (see `alias list`)")
        return ROUTING_LOOP
    log.warning("recipient refused: its aliases lead to no mailbox (see `alias list`)")
    return DEAD_END
