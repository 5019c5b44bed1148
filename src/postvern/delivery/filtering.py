"""The filter stage of the inbound pipeline: postvern.filters behind the pipeline's interface.

At SMTP time the recipient's mailbox is usually locked, so the MX scores with the shipped
model, the phishing and attachment rules, clamd and the authentication results; the
per-user model re-files the message when the spool is imported at the next unlock. Any
``X-Postvern-Spam`` field a sender put in the message is removed before ours is added, so
a user only ever sees our verdict.

The scan is CPU work in Python: in a thread it holds the GIL and competes with every
connection's event loop. With ``[filters] processes`` > 0 it runs instead in that many
child processes (spawned, never forked from a threaded server), each with its own event
loop for clamd, so the filter uses the other cores and never stalls a connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import multiprocessing
from typing import Literal

from postvern import filters
from postvern.config import Settings
from postvern.delivery.pipeline import FilterVerdict, Transaction
from postvern.directory.db import Directory
from postvern.emailauth import AuthVerdict

# A child's own event loop, for clamd (filters.scan is async); one per process, reused.
_CHILD_LOOP: asyncio.AbstractEventLoop | None = None


def _warm_child() -> None:
    """Pool initialiser: load the shipped model once, before the first message waits."""
    global _CHILD_LOOP
    _CHILD_LOOP = asyncio.new_event_loop()
    filters.shipped_model()


def _scan_in_child(raw: bytes, ctx: filters.ScanContext) -> filters.Verdict:
    assert _CHILD_LOOP is not None
    return _CHILD_LOOP.run_until_complete(filters.scan(raw, ctx))


class FilterStage:
    def __init__(self, settings: Settings, directory: Directory) -> None:
        self.settings = filters.FilterSettings.from_config(settings)
        self.directory = directory
        # The first scan loads the shipped model and the filter's tables; messages that
        # arrive with it wait for it, instead of each worker thread loading its own copy at
        # once (100 first deliveries after a start: 3.7x the memory of one, not 1.1x).
        self._warm = asyncio.Lock()
        self._warmed = False
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        processes = getattr(settings.filters, "processes", 0)
        if processes > 0:
            self.pool = concurrent.futures.ProcessPoolExecutor(
                processes, multiprocessing.get_context("spawn"), initializer=_warm_child
            )

    async def _scan(self, raw: bytes, ctx: filters.ScanContext) -> filters.Verdict:
        if self.pool is not None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.pool, _scan_in_child, raw, ctx)
        return await filters.scan(raw, ctx)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def _settings_for(self, domains: tuple[str, ...]) -> filters.FilterSettings:
        """Each recipient domain may set its own attachment policy; one SMTP reply covers
        every recipient, so if any of them rejects dangerous attachments, the message is
        rejected (the strictest wins)."""
        return self._strictest([self.directory.attachment_policy(d) for d in domains])

    def _strictest(self, own: list[str | None]) -> filters.FilterSettings:
        """The settings under the strictest of the domains' own policies (None: ours)."""
        policies = {policy or self.settings.attachment_policy for policy in own}
        strictest: Literal["reject", "quarantine"] = (
            "reject" if "reject" in policies or not policies else "quarantine"
        )
        return dataclasses.replace(self.settings, attachment_policy=strictest)

    async def check(self, raw: bytes, txn: Transaction, auth: AuthVerdict | None) -> FilterVerdict:
        domains = tuple(dict.fromkeys(r.address.rpartition("@")[2].lower() for r in txn.recipients))
        if all(r.policy_known for r in txn.recipients):
            # Read with each recipient at RCPT time (pipeline._lookup): no thread round trip.
            settings = self._strictest([r.attachment_policy for r in txn.recipients])
        else:
            settings = await asyncio.get_running_loop().run_in_executor(
                None, self._settings_for, domains
            )
        ctx = filters.ScanContext(
            recipient_domains=domains,
            auth=filters.AuthSummary.from_verdict(auth) if auth else filters.AuthSummary(),
            client_ip=txn.client_ip or "",
            settings=settings,
        )
        if self._warmed:
            verdict = await self._scan(raw, ctx)
        else:
            async with self._warm:
                verdict = await self._scan(raw, ctx)
                self._warmed = True
        reason = "; ".join(verdict.reasons[:3]) or verdict.action
        if verdict.action == "tempfail":
            reason = "message could not be scanned, try again later"
        elif verdict.virus:
            reason = f"message contains a virus ({verdict.virus})"
        elif verdict.dangerous:
            reason = "message contains a dangerous attachment"
        elif verdict.action == "reject":
            reason = f"message refused as spam ({reason})"
        return FilterVerdict(verdict.action, verdict.header_line(), reason, verdict.score)
