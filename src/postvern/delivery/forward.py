"""Forwarding to outside addresses so that the mail keeps passing DMARC at the next hop.

An alias that points outside our domains re-sends the message: the envelope sender is
rewritten with SRS (so SPF at the next hop checks us), an ARC set records what we verified
on arrival (so the next hop can trust our word when the original DKIM signature no longer
aligns after forwarding, RFC 8617), and the message is DKIM-signed as the forwarding domain.
Then it goes into the durable outbound queue.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from postvern.delivery.pipeline import OutboundQueue, Transaction
from postvern.delivery.srs import SRS
from postvern.emailauth import AuthVerdict
from postvern.emailauth.signing import Signer

log = logging.getLogger(__name__)


class AliasForwarder:
    def __init__(self, *, srs: SRS, signer: Signer, queue: OutboundQueue, authserv_id: str):
        self.srs = srs
        self.signer = signer
        self.queue = queue
        self.authserv_id = authserv_id

    async def forward(
        self, raw: bytes, txn: Transaction, targets: Sequence[str], auth: AuthVerdict | None
    ) -> None:
        domain = _forwarding_domain(txn, targets)
        message = raw
        if auth is not None:
            message = await self.signer.arc_seal_async(message, domain, self.authserv_id)
        message = await self.signer.sign_async(message, domain)
        sender = self.srs.forward(txn.mail_from, domain)
        # The transaction's id names the queue entry too: one id from the 250 to the queue.
        await self.queue.enqueue(sender, list(targets), message, queue_id=txn.queue_id)


def _forwarding_domain(txn: Transaction, targets: Sequence[str]) -> str:
    """The domain of the alias through which the first target was reached."""
    for rcpt in txn.recipients:
        if any(t in rcpt.external for t in targets):
            return rcpt.address.rpartition("@")[2].lower()
    return txn.recipients[0].address.rpartition("@")[2].lower()
