"""The server's own watchdog: looks at itself every ``[ops] watchdog_interval`` seconds and
mails the postmaster (and POSTs to ``[ops] webhook``) when something needs a person.

Alerts: a ban spike (``ban_spike`` bans made or renewed since the last look), queue growth
(the queue grew at each of the last ``QUEUE_GROWTH_CHECKS`` looks, or its oldest message is
older than ``queue_max_age_hours``), the delivery failure rate (at least
``MIN_ATTEMPTS`` recipients tried since the last look and ``delivery_failure_ratio`` of them
failed), the certificate within ``certificate_alert_days`` of expiry, free disk under
``disk_free_min_percent``, clamd not answering (when configured). Backups and their restore
tests are not part of this version; their alerts come with them.

Each kind is mailed once and then again at most every ``REPEAT_SECONDS`` while it lasts,
so a standing problem is a daily reminder, not a flood. The alert names no client and no
account: counts, ages and paths only (the message is stored in the postmaster's mailbox
like any other mail).
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from postvern import config
from postvern.crypto import tls
from postvern.filters.clamd import ClamdClient, ClamdError
from postvern.ops.metrics import Metrics, Snapshot

log = logging.getLogger(__name__)

REPEAT_SECONDS = 86400.0
QUEUE_GROWTH_CHECKS = 3
# Fewer attempts than this say nothing about a rate (one failed delivery is not an incident).
MIN_ATTEMPTS = 10
WEBHOOK_TIMEOUT = 10.0
CLAMD_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Alert:
    kind: str  # ban_spike, queue_growth, delivery_failures, certificate, disk, clamd
    text: str


Mailer = Callable[[bytes], Awaitable[None]]


class Watchdog:
    def __init__(
        self,
        settings: config.Settings,
        metrics: Metrics,
        snapshot: Callable[[], Snapshot],
        bans: Callable[[], list[tuple[str, float]]],
        mail: Mailer,
        *,
        refresh: Callable[[], Awaitable[object]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.snapshot = snapshot
        self.bans = bans  # (network, when made or renewed) of each ban in force
        self._seen_bans: set[tuple[str, float]] = set()
        self.mail = mail
        self.clock = clock
        self.refresh = refresh  # brings the snapshot's queue figures up to date
        self._sent: dict[str, float] = {}
        self._queue_sizes: list[int] = []
        self._deliveries = (0.0, 0.0)  # (attempts, failures) at the last look
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._seen_bans = set(self.bans())  # bans from before the start are no spike
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        interval = self.settings.ops.watchdog_interval
        while True:
            await asyncio.sleep(interval)
            try:
                for alert in await self.check():
                    await self.raise_alert(alert)
            except Exception:
                log.exception("watchdog round failed; trying again next round")

    async def check(self) -> list[Alert]:
        """One look at everything; returns what is wrong now."""
        o = self.settings.ops
        now = self.clock()
        if self.refresh is not None:
            await self.refresh()
        s = self.snapshot()
        found: list[Alert] = []
        bans = set(self.bans())
        new, self._seen_bans = len(bans - self._seen_bans), bans
        if new >= o.ban_spike:
            found.append(Alert("ban_spike", f"{new} bans within {o.watchdog_interval:g} s"))
        self._queue_sizes = [*self._queue_sizes, s.queue_entries][-(QUEUE_GROWTH_CHECKS + 1) :]
        sizes = self._queue_sizes
        growing = len(sizes) > QUEUE_GROWTH_CHECKS and all(
            a < b for a, b in itertools.pairwise(sizes)
        )
        if growing:
            found.append(Alert("queue_growth", f"the queue grew at each look: {sizes}"))
        elif s.queue_oldest_seconds > o.queue_max_age_hours * 3600:
            hours = s.queue_oldest_seconds / 3600
            found.append(Alert("queue_growth", f"the oldest queued message is {hours:.1f} h old"))
        found += self._delivery_rate()
        if s.certificate_expiry_timestamp:
            days = (s.certificate_expiry_timestamp - now) / tls.SECONDS_PER_DAY
            if days < o.certificate_alert_days:
                found.append(
                    Alert("certificate", f"the TLS certificate expires in {days:.0f} days")
                )
        st = os.statvfs(self.settings.data_dir)
        percent = 100.0 * st.f_bavail / st.f_blocks if st.f_blocks else 0.0
        if percent < o.disk_free_min_percent:
            found.append(Alert("disk", f"{percent:.1f}% free on the data directory's disk"))
        clamd = self.settings.filters.clamd
        if clamd is not None:
            try:
                await ClamdClient(
                    clamd, timeout=CLAMD_TIMEOUT, connect_timeout=CLAMD_TIMEOUT
                ).ping()
            except ClamdError as e:
                found.append(Alert("clamd", f"clamd at {clamd} does not answer: {e}"))
        return found

    def _delivery_rate(self) -> list[Alert]:
        m = self.metrics
        failures = m.value("postvern_deliveries_total", outcome="temporary") + m.value(
            "postvern_deliveries_total", outcome="permanent"
        )
        attempts = failures + m.value("postvern_deliveries_total", outcome="delivered")
        before_attempts, before_failures = self._deliveries
        self._deliveries = (attempts, failures)
        tried, failed = attempts - before_attempts, failures - before_failures
        if tried >= MIN_ATTEMPTS and failed / tried >= self.settings.ops.delivery_failure_ratio:
            return [Alert("delivery_failures", f"{failed:.0f} of {tried:.0f} deliveries failed")]
        return []

    async def raise_alert(self, alert: Alert) -> bool:
        """Mail (and POST) one alert unless the same kind went out within REPEAT_SECONDS."""
        now = self.clock()
        if now - self._sent.get(alert.kind, -REPEAT_SECONDS) < REPEAT_SECONDS:
            return False
        self._sent[alert.kind] = now
        self.metrics.alerts.labels(alert.kind).inc()
        log.warning("watchdog alert: %s: %s", alert.kind, alert.text)
        try:
            await self.mail(self.message(alert))
        except Exception as e:
            log.warning("watchdog could not mail the postmaster: %s", type(e).__name__)
        if self.settings.ops.webhook:
            await self._post(alert)
        return True

    def message(self, alert: Alert) -> bytes:
        s = self.settings
        lines = [
            f"From: Postvern watchdog <postmaster@{s.primary_domain}>",
            f"To: postmaster@{s.primary_domain}",
            f"Subject: [postvern {s.hostname}] {alert.kind}: {alert.text}",
            f"Date: {email.utils.formatdate(self.clock())}",
            f"Message-ID: {email.utils.make_msgid('watchdog', s.hostname)}",
            "Auto-Submitted: auto-generated",  # RFC 3834 §5
            "Content-Type: text/plain; charset=utf-8",
            "",
            f"{alert.text}.",
            "",
            f"Run `postvern doctor` on {s.hostname} for the state of everything else.",
            "",
        ]
        return "\r\n".join(lines).encode()

    async def _post(self, alert: Alert) -> None:
        url = self.settings.ops.webhook
        assert url is not None
        body = {"host": self.settings.hostname, "kind": alert.kind, "text": alert.text}
        try:
            timeout = aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.post(url, data=json.dumps(body), headers=_JSON) as response:
                    if response.status >= 300:
                        log.warning("watchdog webhook answered %d", response.status)
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("watchdog webhook failed: %s", type(e).__name__)


_JSON = {"Content-Type": "application/json"}
