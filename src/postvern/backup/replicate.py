"""The server's own backups: continuous replication, the daily full snapshot, the weekly verify.

Every ``replicate_seconds`` (15 by default) the task ships what changed since the last full
snapshot as a *delta* — changed mailboxes, new spool segments, the directory — to every
target; once per ``full_interval_hours`` it takes a full snapshot (which still uploads only
new pieces) and prunes. The recovery point is the start of the last replication that
completed, so the data at risk at any moment is ``now - that start``: published in
``/metrics`` as ``postvern_backup_replication_lag_seconds``.

Once per ``verify_interval_hours`` the server restores its newest snapshot into a scratch
directory and checks it (:mod:`postvern.backup.verify`); a failure is logged, counted in
``/metrics`` and mailed to the postmaster.

All the work runs in one worker thread of its own; the only thing it asks of the event loop
is the hold on one user at a time (:class:`RegistryGuard`).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from postvern.backup import catalog, keys
from postvern.backup.service import BackupService
from postvern.backup.snapshot import BackupError
from postvern.backup.targets import TargetError

if TYPE_CHECKING:
    from postvern.app import App
    from postvern.store.mailbox import Mailbox
    from postvern.store.service import MailboxRegistry

log = logging.getLogger(__name__)
T = TypeVar("T")
HOUR = 3600.0
# After a failed replication, wait this long before the next try (a dead target is retried
# at this pace rather than every tick); the failure is in /metrics meanwhile.
RETRY_AFTER_FAILURE_SECONDS = 30.0
STOP_GRACE_SECONDS = 60.0

Deliver = Callable[[bytes], Awaitable[None]]  # mails the postmaster


class RegistryGuard:
    """Holds one user's mailbox still for a copy, from the backup thread.

    Under the registry's per-user lock no unlock (and so no spool import) can start, and no
    delivery chooses between mailbox and spool. If the mailbox is open, the copy also runs
    under the mailbox's own lock — every read and write of it takes that lock, so no
    transaction is in progress or can begin — after ``PRAGMA wal_checkpoint(TRUNCATE)`` has
    moved every committed page into the main file. (These are the registry's and the
    mailbox's private parts: this is the seam the store should one day expose as
    ``registry.hold(user_id)``.)
    """

    def __init__(self, registry: MailboxRegistry, loop: asyncio.AbstractEventLoop) -> None:
        self.registry = registry
        self.loop = loop
        self._holders: set[asyncio.Task[None]] = set()

    def still(self, user_id: str, work: Callable[[], T]) -> T:
        # The lock is taken on the loop; the copy runs here, in the backup thread, and the
        # lock is given back on the loop when it is done (one hop each way, no executor).
        held = asyncio.run_coroutine_threadsafe(self._acquire(user_id), self.loop).result()
        box, release = held
        try:
            if box is None:
                return work()
            return box.quiesced(work)
        finally:
            self.loop.call_soon_threadsafe(release.set)

    async def _acquire(self, user_id: str) -> tuple[Mailbox | None, asyncio.Event]:
        """Hold the user's mailbox still (the registry's ``held``) from a task of the loop
        until ``release`` is set from the backup thread."""
        got: asyncio.Future[Mailbox | None] = self.loop.create_future()
        release = asyncio.Event()

        async def hold() -> None:
            try:
                async with self.registry.held(user_id) as box:
                    got.set_result(box)
                    await release.wait()
            except BaseException as e:
                if not got.done():
                    got.set_exception(e)
                raise

        task = asyncio.create_task(hold())
        self._holders.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._holders.discard)
        return await got, release


def alert_message(hostname: str, postmaster: str, subject: str, text: str) -> bytes:
    """A plain notice to the postmaster (no user names: ids are cut, objects are random)."""
    return (
        f"From: Postvern <{postmaster}>\r\nTo: {postmaster}\r\nSubject: {subject}\r\n"
        f"Date: {email.utils.formatdate(localtime=True)}\r\n"
        f"Message-ID: {email.utils.make_msgid(domain=hostname)}\r\n"
        "Auto-Submitted: auto-generated\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
        f"{text}\r\n"
    ).encode()


class BackupTask:
    def __init__(self, app: App, registry: MailboxRegistry, deliver: Deliver) -> None:
        self.app = app
        self.settings = app.settings
        self.registry = registry
        self.deliver = deliver
        self.service: BackupService | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._busy: asyncio.Future[Any] | None = None
        self.last_point_started = 0.0
        self.failures = 0
        self.verify_failures = 0
        self._status: dict[str, Any] = {}

    async def start(self) -> None:
        b = self.settings.backup
        if not b.targets:
            log.warning("no backups are taken: [backup] targets is empty")
            return
        try:
            keys.load_public(self.settings.data_dir)
        except keys.BackupKeyError as e:
            log.warning("no backups are taken: %s", e)
            return
        guard = RegistryGuard(self.registry, asyncio.get_running_loop())
        self.service = BackupService(
            self.settings.data_dir, self.settings, self.app.server_key, guard=guard
        )
        self.service.mark_serving()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="backup")
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._busy is not None and not self._busy.done():
            # The thread is mid-operation and may still ask the loop for a hold: let it end.
            try:
                await asyncio.wait_for(asyncio.shield(self._busy), STOP_GRACE_SECONDS)
            except (TimeoutError, Exception):
                log.warning("a backup operation was still running at shutdown")
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        if self.service is not None:
            self.service.unmark_serving()

    def metrics(self) -> dict[str, float]:
        if self.service is None:
            return {}
        status = self._status  # read in the backup thread after each operation, not here
        lag = time.time() - self.last_point_started if self.last_point_started else -1.0
        return {
            "postvern_backup_replication_lag_seconds": lag,
            "postvern_backup_last_success_timestamp": float(status.get("backup_at") or 0),
            "postvern_backup_failures_total": self.failures,
            "postvern_backup_last_verify_timestamp": float(status.get("verify_at") or 0),
            "postvern_backup_last_verify_ok": 1.0 if status.get("verify_ok") else 0.0,
            "postvern_backup_verify_failures_total": self.verify_failures,
        }

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        assert self._executor is not None
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn)
        self._busy = future
        return await asyncio.shield(future)

    def _read_status(self) -> dict[str, Any]:
        return catalog.read_status(self.settings.data_dir)

    async def _run(self) -> None:
        b = self.settings.backup
        service = self.service
        assert service is not None
        tick = b.replicate_seconds if b.replicate_seconds > 0 else b.full_interval_hours * HOUR
        self._status = await self._in_thread(self._read_status)
        while True:
            full_due = time.time() - float(self._status.get("full_at") or 0) >= (
                b.full_interval_hours * HOUR
            )
            kind = "full" if full_due else "delta"
            started = time.time()

            def run(kind: str = kind) -> dict[str, Any]:
                with service.locked():
                    service.run(kind)
                return self._read_status()

            try:
                self._status = await self._in_thread(run)
                self.last_point_started = started
            except (BackupError, TargetError, OSError) as e:
                self.failures += 1
                log.error("backup (%s) failed: %s", kind, e)
                await asyncio.sleep(RETRY_AFTER_FAILURE_SECONDS)
                continue
            except Exception as e:  # a bug: said in full, and the task carries on
                self.failures += 1
                log.exception("backup (%s) failed: %s: %s", kind, type(e).__name__, e)
                await asyncio.sleep(RETRY_AFTER_FAILURE_SECONDS)
                continue
            # The first test restore comes one interval after the first full snapshot.
            since = float(self._status.get("verify_at") or self._status.get("full_at") or 0)
            if since and time.time() - since >= b.verify_interval_hours * HOUR:
                await self._verify()
            await asyncio.sleep(tick)

    async def _verify(self) -> None:
        assert self.service is not None
        service = self.service
        try:
            report = await self._in_thread(service.verify)
            self._status = await self._in_thread(self._read_status)
        except Exception as e:
            log.exception("backup verification could not run")
            problems = [f"verification could not run: {e}"]
        else:
            if report.ok:
                log.info("backup %s verified (%d files)", report.snapshot, report.files)
                return
            problems = report.problems
        self.verify_failures += 1
        log.error("backup verification FAILED: %d problem(s)", len(problems))
        s = self.settings
        postmaster = f"postmaster@{s.primary_domain}"
        text = "The scheduled test restore of the newest backup failed:\r\n\r\n" + "\r\n".join(
            f"- {p}" for p in problems[:50]
        )
        try:
            await self.deliver(
                alert_message(s.hostname, postmaster, "Backup verification FAILED", text)
            )
        except Exception:
            log.exception("could not mail the postmaster about the failed verification")
