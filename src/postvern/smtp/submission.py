"""The submission listeners' policy (465 implicit TLS, 587 STARTTLS; RFC 6409, RFC 8314).

Users send mail here after AUTH (only over TLS). The envelope sender and every From address
must be the user's own or an alias that lists them. Messages get a Date and Message-ID if
the client left them out (RFC 6409 §8), are DKIM-signed with both of the From domain's keys,
then local recipients are delivered through the inbound pipeline and remote ones go to the
durable outbound queue — all before 250.

A refused attempt to send as someone else is logged at warning level with the account (as
the logs' pseudonym), the refused address's domain and which check refused it; never the
address itself. A recipient address literal (RFC 5321 §4.1.3) naming this server is the
same local part at the primary domain, as on the MX (see :func:`names_this_host`); any
other literal is refused at RCPT, since the MTA does not route literals (it would let a
user aim it at any address, internal ones included).

One transaction makes at most one queue entry, under the transaction's id: the id of the
``250 OK queued as`` reply, of the Received header, of the logs and of ``postvern queue``.
"""

from __future__ import annotations

import email.utils
import logging
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from postvern import mime
from postvern.abuse import Abuse, subject
from postvern.delivery import headers
from postvern.delivery.pipeline import InboundPipeline, OutboundQueue, Recipient, Transaction
from postvern.directory.addresses import AddressError, normalise_address
from postvern.directory.db import Directory, User
from postvern.e2e import autocrypt
from postvern.emailauth.signing import Signer
from postvern.login import LoginRefused
from postvern.smtp import replies
from postvern.smtp.address import Address
from postvern.smtp.commands import MailParams, RcptParams
from postvern.smtp.mx import names_this_host, refusal_reply
from postvern.smtp.replies import Reply
from postvern.smtp.session import BaseHandler, SessionState

log = logging.getLogger(__name__)
T = TypeVar("T")

# Received "from" name for submitted mail: the client's own name and address are left out
# of what we send on, as privacy-first providers do (a reserved .invalid name, RFC 2606).
SUBMISSION_HELO = "submission.invalid"
MAX_FROM_ADDRESSES = 10
# The MTA refuses address literals (mta.destination), so they are refused before 250.
LITERAL_NOT_ROUTED = Reply(550, "5.1.2", "address literals other than this server's are not routed")
# A domain from a client goes into a log line: printable, bounded (RFC 5321 §4.5.3.1.2).
MAX_LOGGED_DOMAIN = 255


class Verified(Protocol):
    @property
    def user(self) -> User: ...


class Authenticator(Protocol):
    """Who checks AUTH: the LoginService on one machine; on a cluster front the user's
    mailbox node (cluster/portal.py), so the front never unwraps a mailbox key."""

    async def verify(self, address: str, secret: str, peer_ip: str, protocol: str) -> Verified: ...


class SubmissionHandler(BaseHandler):
    auth_mechanisms = ("PLAIN", "LOGIN")
    auth_requires_tls = True

    def __init__(
        self,
        *,
        login: Authenticator,
        directory: Directory,
        pipeline: InboundPipeline,
        signer: Signer,
        queue: OutboundQueue | None,
        hostname: str,
        primary_domain: str,
        abuse: Abuse | None = None,
    ) -> None:
        self.abuse = abuse
        self.login = login
        self.directory = directory
        self.pipeline = pipeline
        self.signer = signer
        self.queue = queue
        self.hostname = hostname
        self.primary_domain = primary_domain
        self.user: User | None = None
        self._local: list[Recipient] = []
        self._remote: list[str] = []

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.pipeline._thread(fn, *args)

    async def on_connect(self, state: SessionState) -> Reply | None:
        if self.abuse is None:
            return None
        refusal = await self.abuse.on_connect(state.peer_ip, "submission")
        return None if refusal is None else refusal_reply(refusal)

    async def on_auth(
        self, state: SessionState, mechanism: str, authzid: str, authcid: str, password: str
    ) -> Reply:
        if authzid and authzid.lower() != authcid.lower():
            # No proxy authorisation: a user may only act as themselves (RFC 4616 §2).
            return Reply(535, "5.7.8", "authorization identity must match the user")
        try:
            unlocked = await self.login.verify(authcid, password, state.peer_ip, "smtp")
        except LoginRefused as e:
            if e.reason == "banned":
                return Reply(421, "4.7.0", str(e))
            if e.reason == "app-password":
                return replies.app_password_required()
            if e.reason == "unavailable":  # a front whose mailbox node did not answer
                return Reply(454, "4.7.0", "temporary authentication failure")  # RFC 4954 §6
            return replies.auth_failed()
        self.user = unlocked.user
        state.user = unlocked.user.address
        return replies.auth_succeeded()

    async def on_mail(
        self, state: SessionState, sender: Address | None, params: MailParams
    ) -> Reply:
        self._local, self._remote = [], []
        if self.user is None:
            return replies.auth_required()
        if sender is None:
            return Reply(550, "5.7.1", "a null sender cannot be submitted")
        if not await self._owns(str(sender)):
            self._log_spoofing(state, "envelope sender", str(sender))
            return Reply(550, "5.7.1", f"you may not send as <{sender}>")
        return replies.sender_ok()

    def _log_spoofing(self, state: SessionState, what: str, address: str) -> None:
        """Log a refused sender: the account, the address's domain only, which check."""
        assert self.user is not None
        _, at, domain = address.rpartition("@")
        shown = "".join(c for c in domain.lower() if c.isprintable())[:MAX_LOGGED_DOMAIN]
        log.warning(
            "submission refused: the account may not use this %s (domain %s)",
            what,
            shown if at and shown else "-",
            extra=subject(ip=state.peer_ip, account=self.user.address),
        )

    async def _owns(self, address: str) -> bool:
        assert self.user is not None
        return bool(await self._thread(self.directory.may_send_as, self.user, address))

    async def on_rcpt(self, state: SessionState, recipient: Address, params: RcptParams) -> Reply:
        if self.user is None:
            return replies.auth_required()
        domain = recipient.domain
        if recipient.literal_ip is not None:
            if not names_this_host(recipient, state):
                return LITERAL_NOT_ROUTED
            domain = self.primary_domain
        try:
            address = normalise_address(f"{recipient.local_part}@{domain}")
        except AddressError:
            return replies.bad_recipient_syntax()
        if await self.pipeline.is_local_domain(address.rpartition("@")[2]):
            reply, resolved = await self.pipeline.check_recipient(address)
            if resolved is not None:
                self._local.append(resolved)
            return reply
        if self.queue is None:
            return Reply(451, "4.3.0", "outbound delivery is not available right now")
        self._remote.append(address)
        return replies.recipient_ok()

    async def on_message(self, state: SessionState, message: bytes) -> Reply:
        assert self.user is not None
        if self.abuse is not None:
            over_limit = await self.abuse.on_submission(self.user.address)
            if over_limit is not None:
                return refusal_reply(over_limit)
        bad_from = await self._check_from(state, message)
        if bad_from is not None:
            return bad_from
        message = _complete_headers(message, self.hostname)
        # Autocrypt (Level 1): the user's published key, before DKIM signs the header.
        message = await self._thread(autocrypt.add_header, self.directory, self.user, message)
        from_domain = _from_domain(message) or self.user.domain
        signed = await self.signer.sign_async(message, from_domain)
        txn = Transaction(
            client_ip=None,
            helo=SUBMISSION_HELO,
            mail_from=str(state.sender),
            protocol=state.received_protocol,
            tls=f"{state.tls.version} {state.tls.cipher}" if state.tls else None,
            authenticated=self.user.address,
            recipients=self._local,
        )
        queue = self.queue

        async def send_remote(msg: bytes, targets: list[str]) -> None:
            assert queue is not None
            trace = headers.received(
                helo=SUBMISSION_HELO,
                client_ip=None,
                client_name=None,
                by=self.hostname,
                protocol=txn.protocol,
                queue_id=txn.queue_id,
                recipient=None,
                tls=txn.tls,
            )
            await queue.enqueue(txn.mail_from, targets, trace + msg, queue_id=txn.queue_id)

        # Outside addresses of local aliases go out with the remote recipients: the sender is
        # our user and the message is signed by us, so no SRS is needed.
        forwarded = (t for r in self._local for t in r.external)
        remote = list(dict.fromkeys([*self._remote, *forwarded]))
        reply = await self.pipeline.store(txn, signed, remote=remote, send_remote=send_remote)
        log.info(
            "submission %s: %d local, %d remote: %d",
            txn.queue_id,
            len(self._local),
            len(remote),
            reply.code,
        )
        self._local, self._remote = [], []
        return reply

    async def _check_from(self, state: SessionState, message: bytes) -> Reply | None:
        values = mime.header_values(message, "From")
        if len(values) != 1:
            return Reply(550, "5.6.0", "the message needs exactly one From header field")
        addresses = [a for _, a in email.utils.getaddresses(values) if a]
        if not addresses or len(addresses) > MAX_FROM_ADDRESSES:
            return Reply(550, "5.6.0", "the From header field names no usable address")
        for address in addresses:
            if not await self._owns(address):
                self._log_spoofing(state, "From address", address)
                return Reply(550, "5.7.1", f"you may not send with From: {address}")
        return None


def _from_domain(message: bytes) -> str | None:
    values = mime.header_values(message, "From")
    for _, address in email.utils.getaddresses(values):
        if "@" in address:
            return address.rpartition("@")[2].lower()
    return None


def _complete_headers(message: bytes, hostname: str) -> bytes:
    """Add Date and Message-ID when the client left them out (RFC 6409 §8.3, §8.4)."""
    added = b""
    if not mime.header_values(message, "Date"):
        added += f"Date: {email.utils.formatdate(localtime=True)}\r\n".encode()
    if not mime.header_values(message, "Message-ID"):
        added += f"Message-ID: {email.utils.make_msgid(domain=hostname)}\r\n".encode()
    return added + message
