"""The outbound MTA: takes due recipients from the queue, delivers them, records the outcome.

Recipients are grouped into jobs, one per queue entry and destination domain, so the
recipients of one domain travel in one SMTP transaction. Each domain has its own line of
jobs served by at most ``concurrency_per_domain`` connections, which are reused for the next
job to the same domain. Temporary failures are retried with exponential back-off
(``retry_base``, doubling, capped, jittered) until ``max_queue_days``; permanent ones, and
expiry, produce an RFC 3464 notification to the sender through the ``bounce`` callback.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from postvern.config import Settings
from postvern.dns import Resolver
from postvern.mta import dsn
from postvern.mta.client import (
    Disposition,
    Envelope,
    EnvelopeRecipient,
    Outcome,
    StaleSession,
    TLSContexts,
    Withheld,
)
from postvern.mta.destination import Connection, Connector, DestinationError
from postvern.mta.mtasts import Mode, STSResolver
from postvern.mta.queue import (
    DueRecipient,
    Entry,
    Queue,
    RecipientRecord,
    RecipientState,
    RecipientUpdate,
)
from postvern.mta.wake import WAKE_FILE, WakeListener
from postvern.store import faults

log = logging.getLogger(__name__)

BounceCallback = Callable[[bytes, str], Awaitable[None]]

# Outbound connections open at once, all domains together: bounded so that a burst of
# mail to many domains cannot exhaust file descriptors or the remote side's patience.
MAX_CONNECTIONS = 100
# Jobs held in memory (claimed, waiting for or in delivery); the rest stay in the database
# until these are done, so a backlog of a million messages costs no more memory than this.
MAX_CLAIMED = 2000
# ... and at most this many recipient rows among them (an entry may hold many recipients).
MAX_CLAIMED_ROWS = 20_000
# New due rows looked at per scan of the queue.
SCAN_BATCH = 500
# The queue is rescanned at least this often even when nothing woke the runner: a change
# made by another process is noticed within a minute even if its wake-up (mta.wake) is lost.
MAX_IDLE_SLEEP = 60.0
# Back-off cap: like sendmail's and Postfix's (4000 s), a few hours at most between tries,
# so a destination that comes back is tried again the same day.
MAX_RETRY_INTERVAL = 4 * 3600.0
# Retry times are spread by ±20% so that a burst deferred together is not retried together.
RETRY_JITTER = 0.2
# RFC 3461 §4.1 leaves delay notices to the MTA; sendmail's default is four hours.
DELAY_WARNING_AFTER = 4 * 3600.0
# Deliveries in progress at stop() get this long to finish before they are cancelled (a
# cancelled one stays pending and is retried on the next start).
STOP_GRACE = 10.0

JobKey = tuple[str, str]  # (entry id, destination domain)


def retry_delay(attempts: int, base: float, rng: random.Random) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: base·2^(n-1), capped,
    jittered by ±:data:`RETRY_JITTER`."""
    cap = max(MAX_RETRY_INTERVAL, base)
    delay = min(base * 2.0 ** min(max(attempts - 1, 0), 32), cap)
    return delay * rng.uniform(1.0 - RETRY_JITTER, 1.0 + RETRY_JITTER)


def wants_notice(notify: frozenset[str] | None, kind: str) -> bool:
    """RFC 3461 §4.1: NOTIFY names the notices wanted; without it, failures (and, at this
    MTA's discretion, delays) are reported; NEVER silences everything."""
    if notify is None:
        return kind in ("FAILURE", "DELAY")
    return kind in notify


@dataclass(frozen=True, slots=True)
class AttemptReport:
    """One delivery attempt, for an observer (metrics, TLS reporting, tests)."""

    entry_id: str
    domain: str
    remote_mta: str | None
    tls: str | None  # TLSLevel value of the connection, None if none was made
    tls_error: str | None
    sts_mode: str | None  # the domain's MTA-STS mode, None without a policy
    outcomes: dict[str, Disposition]  # recipient address → what happened


class _Destination:
    """The line of jobs for one domain and the workers serving it."""

    __slots__ = ("domain", "jobs", "workers")

    def __init__(self, domain: str) -> None:
        self.domain = domain
        self.jobs: collections.deque[str] = collections.deque()
        self.workers = 0


class OutboundMTA:
    """Delivers the queue. ``start()`` once, ``stop()`` at shutdown. New entries arrive
    through the queue's subscription; ``wake()`` makes it rescan the database at once
    (after ``admin.retry_entries`` in the same process, say), and so does
    :func:`postvern.mta.wake.wake` from another process (``postvern queue retry``): while
    it runs, the MTA listens on the FIFO ``mta.wake`` in the data directory.

    ``bounce(message, address)`` receives each notification and the address it must reach;
    it is sent from the null sender <>. By default it is queued here again, which suits a
    remote sender; a local one is better served by local delivery.
    ``policy_port`` is the HTTPS port for MTA-STS policy fetches (443; tests change it).
    ``on_report`` is called with an :class:`AttemptReport` after every attempt.
    ``allow_loopback_mx`` lets MX hosts resolve to loopback addresses: tests only (every
    test server lives on 127.0.0.x); in production such an answer is refused.
    """

    def __init__(
        self,
        settings: Settings,
        queue: Queue,
        resolver: Resolver,
        *,
        bounce: BounceCallback | None = None,
        policy_port: int = 443,
        on_report: Callable[[AttemptReport], None] | None = None,
        delay_warning_after: float | None = DELAY_WARNING_AFTER,
        allow_loopback_mx: bool = False,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._queue = queue
        self._resolver = resolver
        self._bounce = bounce or self._requeue_notice
        self._policy_port = policy_port
        self._on_report = on_report
        self._delay_warning_after = delay_warning_after
        self._allow_loopback_mx = allow_loopback_mx
        self._rng = rng or random.SystemRandom()
        self._clock = clock
        self._claimed: dict[JobKey, int] = {}  # job → its recipient rows
        self._claimed_rows = 0
        self._destinations: dict[str, _Destination] = {}
        self._noticing: set[str] = set()  # entries whose notice is being sent
        self._notice_again: set[str] = set()  # ... and more became owed meanwhile
        self._notice_retry: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._main: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._stopping = False
        self._unsubscribe: Callable[[], None] | None = None
        self._unsubscribe_notices: Callable[[], None] | None = None
        self._slots: asyncio.Semaphore | None = None
        self._connector: Connector | None = None
        self._wake_listener: WakeListener | None = None
        self.sts: STSResolver | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin delivering; every pending entry (from before a restart too) is picked up."""
        if self._main is not None:
            raise RuntimeError("OutboundMTA already started")
        mta = self._settings.mta
        contexts = await asyncio.to_thread(TLSContexts.load, self._settings.tls.ca_bundle)
        self.sts = STSResolver(
            self._resolver, self._queue, contexts.verified, port=self._policy_port
        )
        self._connector = Connector(
            self._resolver,
            self.sts,
            contexts,
            port=mta.port,
            local_hostname=self._settings.hostname,
            connect_timeout=mta.connect_timeout,
            rng=self._rng,
            allow_loopback=self._allow_loopback_mx,
        )
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._stopping = False
        self._unsubscribe = self._queue.subscribe(self._enqueued)
        # An entry taken over from another front may come with notices owed: send them now.
        self._unsubscribe_notices = self._queue.subscribe_notices(self._notify)
        try:
            self._wake_listener = WakeListener.open(self._settings.path(WAKE_FILE), self.wake)
        except OSError as e:  # the queue is still rescanned every MAX_IDLE_SLEEP
            log.warning("mta: cannot listen for wake-ups from the CLI: %s", e.strerror or e)
        self._main = asyncio.get_running_loop().create_task(self._run(), name="mta-scheduler")

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop taking work; let attempts in progress finish for ``grace`` seconds."""
        if self._main is None:
            return
        self._stopping = True
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._unsubscribe_notices is not None:
            self._unsubscribe_notices()
        if self._wake_listener is not None:
            self._wake_listener.close()
            self._wake_listener = None
        self.wake()
        with contextlib.suppress(asyncio.CancelledError):
            await self._main
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        # Whatever was claimed and not finished stays pending in the database.
        self._claimed.clear()
        self._claimed_rows = 0
        self._destinations.clear()
        self._noticing.clear()
        self._notice_again.clear()
        self._main = None

    @property
    def in_flight(self) -> int:
        """Deliveries and notifications under way (0: idle until the next due time)."""
        return len(self._claimed) + len(self._noticing)

    def wake(self) -> None:
        """Look at the queue now (something was rescheduled, or another process changed it)."""
        if self._wakeup is not None:
            self._wakeup.set()

    def _enqueued(self, recipients: list[DueRecipient]) -> None:
        """New mail is due at once: take it without a scan while there is room."""
        if self._stopping or self._main is None:
            return
        if self._has_room():
            self._dispatch(recipients)
        else:
            self.wake()

    # -- scheduling --------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wakeup is not None
        next_sweep = 0.0
        while not self._stopping:
            self._wakeup.clear()
            now = self._clock()
            try:
                if self._has_room():
                    # Claimed rows come back too (they are still pending): ask for enough
                    # to see SCAN_BATCH new ones behind them.
                    rows = await self._queue.due(now, self._claimed_rows + SCAN_BATCH)
                    if self._dispatch(rows):
                        continue
                if now >= next_sweep:
                    await self._sweep_notices(now)
                    next_sweep = now + MAX_IDLE_SLEEP
                next_at = await self._queue.next_attempt_after(now)
            except Exception:
                log.exception("mta: scanning the queue failed")
                next_at = None
            delay = MAX_IDLE_SLEEP if next_at is None else max(0.0, next_at - now)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(delay, MAX_IDLE_SLEEP)):
                    await self._wakeup.wait()

    def _dispatch(self, rows: list[DueRecipient]) -> int:
        """Claim the jobs among ``rows`` that are not claimed yet; returns how many."""
        counts = collections.Counter((row.entry_id, row.domain) for row in rows)
        started = 0
        for key, count in counts.items():
            if key in self._claimed:
                continue
            if not self._has_room():
                break
            self._claimed[key] = count
            self._claimed_rows += count
            entry_id, domain = key
            destination = self._destinations.get(domain)
            if destination is None:
                destination = self._destinations[domain] = _Destination(domain)
            destination.jobs.append(entry_id)
            if destination.workers < self._settings.mta.concurrency_per_domain:
                destination.workers += 1
                self._spawn(self._worker(destination))
            started += 1
        return started

    def _has_room(self) -> bool:
        return len(self._claimed) < MAX_CLAIMED and self._claimed_rows < MAX_CLAIMED_ROWS

    def _release(self, key: JobKey) -> None:
        full = not self._has_room()
        self._claimed_rows -= self._claimed.pop(key, 0)
        if full:
            self.wake()  # room again for jobs left in the database

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- delivery ----------------------------------------------------------------------------

    async def _worker(self, destination: _Destination) -> None:
        """Serve one domain's line over one connection at a time, reusing it while it lasts."""
        assert self._slots is not None
        connection: Connection | None = None
        try:
            async with self._slots:
                while destination.jobs and not self._stopping:
                    entry_id = destination.jobs.popleft()
                    key = (entry_id, destination.domain)
                    try:
                        connection = await self._job(destination, entry_id, connection)
                    except Exception:
                        log.exception("mta: delivery of %s failed unexpectedly", entry_id)
                        await _drop(connection)
                        connection = None
                        await self._defer_after_error(entry_id, destination.domain)
                    finally:
                        self._release(key)
        finally:
            destination.workers -= 1
            await _drop(connection)
            if destination.workers == 0 and not destination.jobs:
                self._destinations.pop(destination.domain, None)

    async def _job(
        self, destination: _Destination, entry_id: str, connection: Connection | None
    ) -> Connection | None:
        shared = self._queue.shared  # a cluster front: only under the entry's claim in Redis
        if shared is None:
            return await self._claimed_job(destination, entry_id, connection)
        if not await shared.claim(entry_id):
            return connection
        try:
            # The claim is asked again right before DATA: a front frozen past its lease
            # sends nothing another front took over (docs/cluster.md: what window remains).
            return await self._claimed_job(
                destination, entry_id, connection, lambda: shared.holds(entry_id)
            )
        finally:
            await shared.release(entry_id)

    async def _claimed_job(
        self,
        destination: _Destination,
        entry_id: str,
        connection: Connection | None,
        before_data: Callable[[], Awaitable[bool]] | None = None,
    ) -> Connection | None:
        entry = await self._queue.entry(entry_id)
        recipients = _pending_for(entry, destination.domain, self._clock()) if entry else []
        if entry is None or not recipients:
            return connection
        envelope = replace(_envelope(entry, recipients), before_data=before_data)
        if connection is None or not connection.session.reusable:
            await _drop(connection)
            connection = await self._connect(destination, entry, recipients)
            if connection is None:
                return None
        try:
            try:
                outcomes = await connection.session.send(envelope)
            except StaleSession:
                # The reused connection died while idle; nothing was sent. One fresh try.
                await _drop(connection)
                connection = await self._connect(destination, entry, recipients)
                if connection is None:
                    return None
                outcomes = await connection.session.send(envelope)
        except Withheld:
            # Not ours any more (a cluster front frozen past its lease): no outcome is
            # recorded, so neither a retry time nor, at expiry, a failure notice.
            log.warning("mta: %s not sent: another front delivers it now", entry_id)
            return connection
        # A crash here, after the remote 250 and before the commit, is the one window where
        # a message can go out twice (RFC 5321 §6.1); tests aim a crash at it.
        faults.point("mta.after-remote-reply")
        await self._record(entry, recipients, outcomes, connection)
        if not connection.session.reusable:
            await _drop(connection)
            connection = None
        return connection

    async def _connect(
        self, destination: _Destination, entry: Entry, recipients: list[RecipientRecord]
    ) -> Connection | None:
        """Open a connection; on failure record it for this job and for the jobs queued
        behind it to the same domain (they would meet the same failure now)."""
        assert self._connector is not None
        try:
            return await self._connector.connect(destination.domain)
        except DestinationError as e:
            failure = e
        await self._record_failure(entry, recipients, failure)
        while destination.jobs:
            entry_id = destination.jobs.popleft()
            try:
                other = await self._queue.entry(entry_id)
                pending = _pending_for(other, destination.domain, self._clock()) if other else []
                if other is not None and pending:
                    await self._record_failure(other, pending, failure)
            finally:
                self._release((entry_id, destination.domain))
        return None

    async def _record_failure(
        self, entry: Entry, recipients: list[RecipientRecord], failure: DestinationError
    ) -> None:
        outcomes = {r.seq: failure.outcome for r in recipients}
        await self._record(entry, recipients, outcomes, None, remote_mta=failure.remote_mta)

    async def _defer_after_error(self, entry_id: str, domain: str) -> None:
        """After a bug or an unexpected error, push the job back so it is not retried in a
        tight loop; it stays pending."""
        with contextlib.suppress(Exception):
            entry = await self._queue.entry(entry_id)
            recipients = _pending_for(entry, domain, self._clock()) if entry else []
            if entry is not None and recipients:
                outcome = Outcome.temporary("4.3.0", "internal error during delivery")
                outcomes = {r.seq: outcome for r in recipients}
                await self._record(entry, recipients, outcomes, None)

    # -- outcomes ----------------------------------------------------------------------------

    async def _record(
        self,
        entry: Entry,
        recipients: list[RecipientRecord],
        outcomes: dict[int, Outcome],
        connection: Connection | None,
        *,
        remote_mta: str | None = None,
    ) -> None:
        now = self._clock()
        session = connection.session if connection else None
        remote = session.endpoint.mx if session else remote_mta
        tls_level = str(session.tls) if session else None
        lost = Outcome.temporary("4.4.2", "no reply for this recipient")
        updates = [
            self._update(entry, r, outcomes.get(r.seq, lost), now, remote, tls_level)
            for r in recipients
        ]
        owed = await self._queue.update(entry.info.id, updates)
        if any(u.state is RecipientState.PENDING for u in updates):
            self.wake()  # a retry time now exists that the scheduler's sleep may not cover
        self._report(entry, recipients, updates, outcomes, connection, remote, lost)
        if owed:
            self._notify(entry.info.id)

    def _update(
        self,
        entry: Entry,
        recipient: RecipientRecord,
        outcome: Outcome,
        now: float,
        remote: str | None,
        tls_level: str | None,
    ) -> RecipientUpdate:
        attempts = recipient.attempts + 1
        expires = entry.info.created + self._settings.mta.max_queue_days * 86400
        notice: str | None = None
        delay_notified = recipient.delay_notified
        status = outcome.status
        next_attempt = now
        if outcome.disposition is Disposition.DELIVERED:
            state = RecipientState.DELIVERED
            # RFC 3461 §4.1: SUCCESS asked for, and the next hop will not report: "relayed".
            if wants_notice(recipient.notify, "SUCCESS") and not outcome.remote_dsn:
                notice = str(dsn.Action.RELAYED)
        elif outcome.disposition is Disposition.PERMANENT or now >= expires:
            state = RecipientState.FAILED
            if outcome.disposition is Disposition.TEMPORARY:
                status = "4.4.7"  # RFC 3463: delivery time expired
            if wants_notice(recipient.notify, "FAILURE"):
                notice = str(dsn.Action.FAILED)
        else:
            state = RecipientState.PENDING
            delay = retry_delay(attempts, self._settings.mta.retry_base, self._rng)
            # The last try happens at expiry, so the sender hears at the advertised time.
            next_attempt = min(now + delay, expires)
            warn_after = self._delay_warning_after
            if (
                warn_after is not None
                and not delay_notified
                and now - entry.info.created >= warn_after
                and wants_notice(recipient.notify, "DELAY")
            ):
                notice, delay_notified = str(dsn.Action.DELAYED), True
        if not entry.info.mail_from:
            notice = None  # RFC 5321 §4.5.5: nothing ever goes back to <>
        return RecipientUpdate(
            seq=recipient.seq,
            state=state,
            attempts=attempts,
            next_attempt=next_attempt,
            last_attempt=now,
            status=status,
            diagnostic=outcome.diagnostic,
            remote_mta=remote,
            tls=tls_level,
            notice=notice,
            delay_notified=delay_notified,
        )

    def _report(
        self,
        entry: Entry,
        recipients: list[RecipientRecord],
        updates: list[RecipientUpdate],
        outcomes: dict[int, Outcome],
        connection: Connection | None,
        remote: str | None,
        lost: Outcome,
    ) -> None:
        session = connection.session if connection else None
        counts = collections.Counter(u.state for u in updates)
        domain = recipients[0].domain
        log.info(
            "mta: %s to %s via %s tls=%s: %d delivered, %d deferred, %d failed",
            entry.info.id,
            domain,
            remote or "-",
            session.tls if session else "-",
            counts[RecipientState.DELIVERED],
            counts[RecipientState.PENDING],
            counts[RecipientState.FAILED],
        )
        if self._on_report is None:
            return
        sts_mode: Mode | None = connection.sts_mode if connection else None
        report = AttemptReport(
            entry_id=entry.info.id,
            domain=domain,
            remote_mta=remote,
            tls=str(session.tls) if session else None,
            tls_error=session.tls_error if session else None,
            sts_mode=str(sts_mode) if sts_mode else None,
            outcomes={r.address: outcomes.get(r.seq, lost).disposition for r in recipients},
        )
        try:
            self._on_report(report)
        except Exception:
            log.exception("mta: report observer failed")

    # -- notifications -----------------------------------------------------------------------

    async def _sweep_notices(self, now: float) -> None:
        """Send notifications left owed by a crash or a failed bounce callback."""
        for entry_id in await self._queue.entries_with_notices():
            if self._notice_retry.get(entry_id, 0.0) <= now:
                self._notify(entry_id)

    def _notify(self, entry_id: str) -> None:
        """Send what is owed on an entry: now, or right after the notice in progress."""
        if entry_id in self._noticing:
            self._notice_again.add(entry_id)
            return
        self._noticing.add(entry_id)
        self._spawn(self._send_notices(entry_id))

    async def _send_notices(self, entry_id: str) -> None:
        try:
            while True:
                self._notice_again.discard(entry_id)
                if not await self._send_owed(entry_id) or entry_id not in self._notice_again:
                    return
        finally:
            self._noticing.discard(entry_id)
            self._notice_again.discard(entry_id)

    async def _send_owed(self, entry_id: str) -> bool:
        """Build one DSN for everything owed on an entry, hand it over, then clear it;
        False if the hand-over failed (it is retried later).

        A crash between the hand-over and the commit sends that notice again on restart:
        a duplicate bounce is better than a lost one.
        """
        entry = await self._queue.entry(entry_id)
        owed = [r for r in entry.info.recipients if r.notice] if entry else []
        if entry is None or not owed:
            return True
        if entry.info.mail_from:
            message = await asyncio.to_thread(self._build_notice, entry, owed)
            try:
                await self._bounce(message, entry.info.mail_from)
            except Exception:
                log.exception("mta: handing over the notification for %s failed", entry_id)
                retry = self._clock() + max(self._settings.mta.retry_base, 1.0)
                self._notice_retry[entry_id] = retry
                return False
        self._notice_retry.pop(entry_id, None)
        await self._queue.clear_notices(entry_id, [r.seq for r in owed])
        return True

    def _build_notice(self, entry: Entry, owed: list[RecipientRecord]) -> bytes:
        info = entry.info
        expires = info.created + self._settings.mta.max_queue_days * 86400
        original = dsn.OriginalMessage(
            sender=info.mail_from,
            message=entry.message,
            arrival=info.created,
            queue_id=info.id,
            envid=info.envid,
            ret=info.ret,
            smtputf8=info.smtputf8,
        )
        reports = [
            dsn.RecipientReport(
                final_recipient=r.address,
                action=dsn.Action(r.notice or dsn.Action.FAILED),
                status=r.status or "4.0.0",
                original_recipient=r.orcpt,
                remote_mta=r.remote_mta,
                diagnostic=r.diagnostic,
                last_attempt=r.last_attempt,
                will_retry_until=expires,
            )
            for r in owed
        ]
        return dsn.build_dsn(self._settings.hostname, original, reports)

    async def _requeue_notice(self, message: bytes, address: str) -> None:
        """The default bounce: queue the notice from <> like any other message."""
        await self._queue.enqueue("", [address], message)


# --- Helpers --------------------------------------------------------------------------------


def _pending_for(entry: Entry, domain: str, now: float) -> list[RecipientRecord]:
    """The recipients of ``entry`` in ``domain`` that are due. A job can be claimed from a
    scan that predates its previous attempt's outcome; rescheduled recipients are skipped."""
    return [
        r
        for r in entry.info.recipients
        if r.domain == domain and r.state is RecipientState.PENDING and r.next_attempt <= now
    ]


def _envelope(entry: Entry, recipients: list[RecipientRecord]) -> Envelope:
    info = entry.info
    return Envelope(
        mail_from=info.mail_from,
        recipients=[EnvelopeRecipient(r.seq, r.address, r.notify, r.orcpt) for r in recipients],
        message=entry.message,
        envid=info.envid,
        ret=info.ret,
        smtputf8=info.smtputf8,
    )


async def _drop(connection: Connection | None) -> None:
    if connection is not None:
        await connection.session.close()
