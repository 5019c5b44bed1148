"""The outbound MTA: a durable encrypted queue and the delivery of its mail to remote MX hosts.

Submission (and forwarding, and bounces) put mail in the :class:`Queue`; the
:class:`OutboundMTA` delivers it: MX selection (RFC 5321 §5.1, RFC 7505), STARTTLS with
certificate validation and opportunistic fallback (RFC 3207, RFC 7435), MTA-STS (RFC 8461),
retries with back-off, and RFC 3464 notifications to the sender.

Wiring (server start-up and shutdown)::

    queue = await Queue.open(settings.path(QUEUE_FILE), server_key.derive("queue"))
    mta = OutboundMTA(settings, queue, resolver, bounce=deliver_bounce)
    await mta.start()                 # resumes everything left pending by a previous run
    ...
    await mta.stop()                  # attempts in progress get a grace period
    await queue.close()               # after stop(): the MTA writes to the queue

Submitting (answer 250 only after this returns: the entry is committed and fsynced)::

    queue_id = await queue.enqueue(
        "alice@example.org",                        # "" for the null sender <>
        [QueueRecipient("bob@example.net", notify=frozenset({"FAILURE"}),
                        orcpt="rfc822;bob@example.net"), "carol@example.net"],
        message_bytes,
        envid=params.envid, ret=params.ret, smtputf8=params.smtputf8,
        queue_id=txn.queue_id,                      # the transaction's id (reply, logs)
    )

The MTA learns of the new entry from the queue itself (no need to call ``mta.wake()``).

``bounce(message, address)`` receives each notification (a complete RFC 5322 message, CRLF
line endings) and the one address it must reach; its envelope sender must be <>. Without
a callback the notice is queued again here, which suits remote senders; a local sender's
notice belongs in local delivery. An exception from the callback keeps the notice owed and
it is retried after ``retry_base`` seconds (owed notices are swept every minute).

``postvern queue list|show|retry|delete`` maps to :mod:`postvern.mta.admin`: open a
:class:`QueueStore` on the same file with the same key (it works while the server runs),
then ``admin.list_entries(store)`` + ``admin.format_list(...)``, ``admin.show_entry`` +
``admin.format_detail``, ``admin.retry_entries(store, id_or_None)`` followed by
``wake.wake(settings.path(wake.WAKE_FILE))`` so that a running MTA acts at once,
``admin.delete_entry(store, id)``; unknown ids raise :class:`EntryNotFound`. The ids are the
submission's: the ``250 OK queued as`` reply names the entry.

Test hooks (constructor arguments, not settings): ``policy_port`` (MTA-STS HTTPS port,
default 443) and ``allow_loopback_mx`` (MX answers pointing at 127.0.0.0/8 are refused
unless set). ``on_report`` observes every attempt (:class:`AttemptReport`).
"""

from postvern.mta.queue import (
    QUEUE_FILE,
    EntryInfo,
    EntryNotFound,
    InvalidEnvelope,
    Queue,
    QueueError,
    QueueRecipient,
    QueueStore,
    RecipientState,
)
from postvern.mta.runner import AttemptReport, BounceCallback, OutboundMTA

__all__ = [
    "QUEUE_FILE",
    "AttemptReport",
    "BounceCallback",
    "EntryInfo",
    "EntryNotFound",
    "InvalidEnvelope",
    "OutboundMTA",
    "Queue",
    "QueueError",
    "QueueRecipient",
    "QueueStore",
    "RecipientState",
]
