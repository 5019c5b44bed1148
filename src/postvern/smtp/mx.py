"""The MX listener's policy: mail from the world to our domains, never relayed onwards.

The handler is the seam between the SMTP session and the inbound pipeline: it refuses
recipients outside our domains (no open relay) and unknown users at RCPT time (so nothing is
bounced later to a forged sender), and hands the accepted message and its envelope to
:class:`~postvern.delivery.pipeline.InboundPipeline`, whose reply it returns.

A recipient may name its host by address instead of domain, ``user@[192.0.2.1]`` or
``user@[IPv6:2001:db8::1]`` (RFC 5321 §4.1.3). Such a literal is ours when it is the address
the client connected to: that is one the listener is bound to, or with a wildcard bind one
of the host's own addresses, and a sender delivering to a literal connects to exactly that
address (§5.1). The mailbox is then the same local part at the primary domain, as Postfix's
``resolve_numeric_domain`` does. Any other literal is someone else's host: relaying, refused.
Behind NAT or a proxy the public address is not the one connected to, and is refused.
"""

from __future__ import annotations

import ipaddress
import logging

from postvern.abuse import Abuse, Refusal, subject
from postvern.delivery.pipeline import NOT_OURS, InboundPipeline, Recipient, Transaction
from postvern.smtp import replies
from postvern.smtp.address import Address
from postvern.smtp.commands import MailParams, RcptParams
from postvern.smtp.replies import Reply
from postvern.smtp.session import BaseHandler, SessionState

log = logging.getLogger(__name__)


def refusal_reply(refusal: Refusal) -> Reply:
    """The SMTP reply for an abuse refusal (its code, enhanced status and text)."""
    return Reply(refusal.code, refusal.enhanced_status, refusal.text)


def names_this_host(recipient: Address, state: SessionState) -> bool:
    """Whether ``recipient``'s domain is an address literal naming this server: the address
    this connection reached (see the module docstring). IPv4-mapped IPv6 counts as IPv4."""
    literal = recipient.literal_ip
    if literal is None:
        return False
    try:
        local = ipaddress.ip_address(state.local_ip)
    except ValueError:
        return False
    return _unmapped(literal) == _unmapped(local)


def _unmapped(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


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
        elif recipient.literal_ip is not None:
            if not names_this_host(recipient, state):
                return NOT_OURS
            address = f"{recipient.local_part}@{self.primary_domain}"
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
