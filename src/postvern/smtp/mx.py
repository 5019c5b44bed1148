"""The MX listener's policy: mail from the world to our domains, never relayed onwards.

The handler is the seam between the SMTP session and the inbound pipeline: it refuses
recipients outside our domains (no open relay) and unknown users at RCPT time (so nothing is
bounced later to a forged sender), and hands the accepted message and its envelope to
:class:`~postvern.delivery.pipeline.InboundPipeline`, whose reply it returns.
"""

from __future__ import annotations

import logging

from postvern.abuse import Abuse, Refusal, subject
from postvern.delivery.pipeline import InboundPipeline, Recipient, Transaction
from postvern.smtp import replies
from postvern.smtp.address import Address
from postvern.smtp.commands import MailParams, RcptParams
from postvern.smtp.replies import Reply
from postvern.smtp.session import BaseHandler, SessionState

log = logging.getLogger(__name__)


def refusal_reply(refusal: Refusal) -> Reply:
    """The SMTP reply for an abuse refusal (its code, enhanced status and text)."""
    return Reply(refusal.code, refusal.enhanced_status, refusal.text)


class MXHandler(BaseHandler):
    """One per connection. No AUTH here: users submit on 465/587."""

    auth_mechanisms = ()

    def __init__(
        self, pipeline: InboundPipeline, primary_domain: str, abuse: Abuse | None = None
    ) -> None:
        self.pipeline = pipeline
        self.primary_domain = primary_domain
        self.abuse = abuse
        self._recipients: list[Recipient] = []

    async def on_connect(self, state: SessionState) -> Reply | None:
        if self.abuse is None:
            return None
        refusal = await self.abuse.on_connect(state.peer_ip, "smtp")
        return None if refusal is None else refusal_reply(refusal)

    async def on_mail(
        self, state: SessionState, sender: Address | None, params: MailParams
    ) -> Reply:
        self._recipients = []
        if self.abuse is not None:
            refusal = await self.abuse.on_mail(state.peer_ip, str(sender or ""))
            if refusal is not None:
                return refusal_reply(refusal)
        return replies.sender_ok()

    async def on_rcpt(self, state: SessionState, recipient: Address, params: RcptParams) -> Reply:
        if recipient.is_postmaster:
            # RFC 5321 §4.5.1: the bare <Postmaster> must be accepted.
            address = f"postmaster@{self.primary_domain}"
        elif recipient.domain.startswith("["):
            return Reply(550, "5.7.1", "address literals are not accepted here")
        else:
            address = f"{recipient.local_part}@{recipient.domain_lower}"
        reply, resolved = await self.pipeline.check_recipient(address)
        if self.abuse is not None:
            # Counts RCPT to unknown users (enumeration) and applies rate limits and
            # greylisting to known ones.
            refusal = await self.abuse.on_rcpt(
                state.peer_ip, str(state.sender or ""), address, resolved is not None
            )
            if refusal is not None:
                return refusal_reply(refusal)
        if resolved is not None:
            self._recipients.append(resolved)
        return reply

    async def on_message(self, state: SessionState, message: bytes) -> Reply:
        sender = state.sender
        if self.abuse is not None:
            refusal = await self.abuse.on_message(
                state.peer_ip, str(sender or ""), len(self._recipients)
            )
            if refusal is not None:
                return refusal_reply(refusal)
        txn = Transaction(
            client_ip=state.peer_ip,
            helo=state.helo or "",
            mail_from=str(sender) if sender is not None else "",
            protocol=state.received_protocol,
            tls=f"{state.tls.version} {state.tls.cipher}" if state.tls else None,
            recipients=list(self._recipients),
        )
        self._recipients = []
        reply = await self.pipeline.deliver(txn, message)
        log.info(
            "message %s: %d %s",
            txn.queue_id,
            reply.code,
            reply.status,
            extra=subject(ip=state.peer_ip),
        )
        return reply
