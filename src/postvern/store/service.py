"""The asyncio side of the store: which mailboxes are unlocked, delivery, and the change feed.

A mailbox is unlocked while at least one session holds it; the mailbox key lives in memory
only that long. Delivery goes straight into an unlocked mailbox (and its IDLE sessions hear
it) or into the sealed spool otherwise. A per-user lock orders "deliver to spool" against
"unlock and import", so nothing can slip into the spool after an import has looked at it
while the mailbox is open.

Every call into SQLite or the spool runs in a worker thread; the event loop only awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar, cast

from postvern.directory.accounts import Accounts
from postvern.directory.db import User
from postvern.store.mailbox import INBOX, Change, Mailbox
from postvern.store.spool import Deposit, Spool, SpoolItem, delivery_key, import_spool

log = logging.getLogger(__name__)

T = TypeVar("T")
# A session that stops reading its change feed (a stuck client) must not make the server
# queue changes without end: past this many it is told to resynchronise instead.
CHANGE_QUEUE_LIMIT = 10_000


def _nothing() -> None:
    pass


class ChangeFeed:
    """One session's subscription: committed changes, delivered on the event loop.

    Every IDLE session holds one, so it is a list and a callback rather than an
    asyncio.Queue (four deques of 0.5 KiB each, and a task to wait on it).
    """

    __slots__ = ("_changes", "_loop", "cancel", "on_change", "overflowed")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._changes: list[Change] = []
        self.overflowed = False
        self.cancel: Callable[[], None] = _nothing
        # Called on the loop when a change arrives (or the feed overflows): IDLE's wake-up.
        self.on_change: Callable[[], None] | None = None

    def _from_thread(self, change: Change) -> None:
        self._loop.call_soon_threadsafe(self._put, change)

    def _put(self, change: Change) -> None:
        if len(self._changes) >= CHANGE_QUEUE_LIMIT:
            self.overflowed = True
        else:
            self._changes.append(change)
        if self.on_change is not None:
            self.on_change()

    @property
    def pending(self) -> bool:
        """Whether there is something to report (changes, or an overflow to resync)."""
        return bool(self._changes) or self.overflowed

    def drain(self) -> list[Change]:
        out, self._changes = self._changes, []
        return out


class MailboxHandle:
    """A session's hold on an unlocked mailbox. Release it exactly once."""

    def __init__(self, registry: MailboxRegistry, user: User, box: Mailbox) -> None:
        self.registry = registry
        self.user = user
        self.box = box
        self.released = False
        self.idle = False  # the session sits in IDLE (see quiet())

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in a worker thread (``fn`` is usually a Mailbox method);
        the mailbox does not hibernate meanwhile, and wakes first if it does."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.registry.executor, _using, self.box, functools.partial(fn, *args, **kwargs)
        )

    def quiet(self) -> None:
        """The session waits in IDLE: once every session of the mailbox does, its SQLite
        connection is closed after HIBERNATE_SECONDS (:meth:`Mailbox.hibernate`). Called
        again after each report during IDLE, which may have woken it."""
        if not self.released:
            if not self.idle:
                self.idle = True
                self.registry._idle_changed(self.user.id, +1)
            self.registry._arm_hibernation(self.user.id)

    def active(self) -> None:
        """The session left IDLE (the next call wakes the mailbox if it sleeps)."""
        if self.idle:
            self.idle = False
            self.registry._idle_changed(self.user.id, -1)

    def feed(self) -> ChangeFeed:
        feed = ChangeFeed(asyncio.get_running_loop())
        feed.cancel = self.box.subscribe(feed._from_thread)
        return feed

    async def release(self) -> None:
        if not self.released:
            self.active()
            self.released = True
            await self.registry._release(self.user.id)


def _using(box: Mailbox, call: Callable[[], T]) -> T:
    with box.using():
        return call()


class DepositBatcher:
    """Group commit for the sealed spool.

    Deposits that arrive while a batch is being written wait for the next one, so under load
    one segment file and one pair of fsyncs serve many messages, and an idle server still
    writes each deposit at once (there is no timer).
    """

    # Bounds the memory a batch holds and the latency its last member sees.
    MAX_BATCH = 256

    def __init__(self, spool: Spool, executor: ThreadPoolExecutor) -> None:
        self.spool = spool
        self.executor = executor
        self._waiting: list[tuple[Deposit, asyncio.Future[str]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def deposit(self, deposit: Deposit) -> str:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        self._waiting.append((deposit, future))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            batch = self._waiting[: self.MAX_BATCH]
            del self._waiting[: self.MAX_BATCH]
            try:
                ids = await loop.run_in_executor(
                    self.executor, self.spool.deposit_batch, [d for d, _ in batch]
                )
            except Exception as e:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), spool_id in zip(batch, ids, strict=True):
                if not future.done():
                    future.set_result(spool_id)


class MailboxHook(Protocol):
    """Something that works on a mailbox while it is open (the junk learner, #6)."""

    def on_change(self, change: Change) -> None: ...

    def refile(self, items: list[tuple[int, int]]) -> int: ...


HookFactory = Callable[[Mailbox], MailboxHook]


# A mailbox whose last session ended stays open this long at most (the setting may ask
# less) and this many at once, oldest closed first: a client that reconnects at once — an
# IMAP client opening its second connection, a poller — finds it open, and the memory that
# open mailboxes take stays bounded whatever the number of users.
MAX_LINGERING = 256
# Several workers (workers.py): how often this process looks at its open mailboxes for what
# other processes did to them — commits (one PRAGMA data_version each) and deliveries that
# went to the sealed spool because the delivering worker had the mailbox locked. It is how
# late an IDLE session hears of such a change.
SHARED_POLL_SECONDS = 0.25
# A mailbox whose every session has sat in IDLE this long closes its SQLite connection
# (Mailbox.hibernate; about 160 KiB each, the bulk of an open mailbox — bench/imap_idle.py).
# Long enough that a client's IDLE/DONE/NOOP/IDLE round does not reopen it each time,
# short next to how long IDLE lasts (RFC 9051 §6.3.13: up to 29 minutes per round).
HIBERNATE_SECONDS = 2.0
# After a mailbox hibernates or closes, the memory its SQLite connection used (~170 KiB)
# is free but stays in malloc's heaps, so the process's RSS keeps the high-water mark of
# mailboxes awake at once. malloc_trim(3) hands every whole free page back (madvise): 1,000
# mailboxes opened, read and put to sleep in one process went from 21 KiB of RSS each to
# none (test_idle_close.py shows it). It does not shrink the top of a thread's heap, nor
# pages that live allocations share (docs/architecture.md §6). One call covers the
# hibernations of this many seconds; it took ~1 ms with 3,000 sleeping mailboxes.
TRIM_DELAY = 1.0


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return cast(Callable[[int], int], trim)


MALLOC_TRIM = _malloc_trim()


class _Open:
    __slots__ = ("box", "cancel_hook", "hook", "idle", "linger", "refs", "sleeper")

    def __init__(self, box: Mailbox) -> None:
        self.box = box
        self.refs = 0
        self.idle = 0  # handles whose session is in IDLE
        self.sleeper: asyncio.TimerHandle | None = None  # hibernation armed
        self.hook: MailboxHook | None = None
        self.cancel_hook: Callable[[], None] = lambda: None
        self.linger: asyncio.TimerHandle | None = None  # set while no session holds it


class MailboxRegistry:
    def __init__(
        self,
        accounts: Accounts,
        executor: ThreadPoolExecutor | None = None,
        hook_factory: HookFactory | None = None,
        linger_seconds: float = 0.0,
    ) -> None:
        self.accounts = accounts
        self.linger_seconds = linger_seconds
        self._expiring: set[asyncio.Task[None]] = set()
        self.hook_factory = hook_factory
        self.spool: Spool = accounts.spool
        self.executor = executor or ThreadPoolExecutor(max_workers=8, thread_name_prefix="store")
        self._open: dict[str, _Open] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._batcher = DepositBatcher(self.spool, self.executor)
        self._in_flight: dict[str, int] = {}
        self._settled: dict[str, asyncio.Event] = {}
        self._poller: asyncio.Task[None] | None = None
        self._trim: asyncio.TimerHandle | None = None  # a malloc_trim armed (_trim_soon)
        self._trimming = 0  # malloc_trims running
        self.trim_requests = 0  # mailboxes that slept or closed since the start (tests)
        self.trims = 0  # malloc_trims that ran (tests)

    def _lock(self, user_id: str) -> asyncio.Lock:
        lock = self._locks.get(user_id)
        if lock is None:
            lock = self._locks[user_id] = asyncio.Lock()
        return lock

    @contextlib.asynccontextmanager
    async def held(self, user_id: str) -> AsyncIterator[Mailbox | None]:
        """Hold the user's mailbox still: no unlock, close, import or spool delivery for the
        user runs until the block ends. Yields the open mailbox, or None when it is closed
        (then its file and the spool are all there is). For a consistent copy (the backup's
        replication)."""
        async with self._lock(user_id):
            entry = self._open.get(user_id)
            yield entry.box if entry is not None else None

    async def close_now(self, user_id: str) -> bool:
        """Close the user's mailbox at once instead of after its linger, once deliveries in
        flight have settled; True when it is closed, False while a session still holds it.
        For a mailbox leaving this node (a cluster move)."""
        async with self._lock(user_id):
            await self._deposits_settled(user_id)
            entry = self._open.get(user_id)
            if entry is None:
                return True
            if entry.refs > 0:
                return False
            if entry.linger is not None:
                entry.linger.cancel()
            await self._close(user_id, entry)
            return True

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, functools.partial(fn, *args)
        )

    @property
    def unlocked_count(self) -> int:
        return len(self._open)

    def is_unlocked(self, user_id: str) -> bool:
        return user_id in self._open

    async def unlock(self, user: User, mailbox_key: bytes) -> MailboxHandle:
        """Open (or share) the mailbox and import its spool; the caller holds a reference."""
        async with self._lock(user.id):
            entry = self._open.get(user.id)
            if entry is not None and entry.linger is not None:
                entry.linger.cancel()
                entry.linger = None
            if entry is None:
                await self._deposits_settled(user.id)
                path = self.accounts.mailbox_path(user)
                box = await self._thread(Mailbox.open, path, mailbox_key)
                entry = self._open[user.id] = _Open(box)
                hook = entry.hook = self.hook_factory(box) if self.hook_factory else None
                if hook is not None:
                    entry.cancel_hook = box.subscribe(hook.on_change)
                try:
                    imported = await self._thread(import_spool, box, self.spool, user.id)
                except BaseException:
                    # A failed import is retried at the next unlock, with nothing lost.
                    del self._open[user.id]
                    entry.cancel_hook()
                    await self._thread(box.close)
                    raise
                if imported:
                    log.info("imported %d spooled message(s) at unlock", len(imported))
                    if hook is not None:
                        await self._refile(hook, imported)
            entry.refs += 1
            return MailboxHandle(self, user, entry.box)

    # -- hibernation (Mailbox.hibernate) --------------------------------------------------

    def _idle_changed(self, user_id: str, delta: int) -> None:
        entry = self._open.get(user_id)
        if entry is not None:
            entry.idle += delta

    def _arm_hibernation(self, user_id: str) -> None:
        """Close the mailbox's connection in HIBERNATE_SECONDS if every session is in IDLE
        then; nothing if it already sleeps or is about to."""
        entry = self._open.get(user_id)
        if entry is None or entry.sleeper is not None or not self._all_idle(entry):
            return
        if entry.box.hibernating:
            return
        loop = asyncio.get_running_loop()
        entry.sleeper = loop.call_later(HIBERNATE_SECONDS, self._hibernate_soon, user_id, entry)

    @staticmethod
    def _all_idle(entry: _Open) -> bool:
        # refs also counts delivery receipts in flight, which are never idle.
        return entry.refs > 0 and entry.idle >= entry.refs

    def _hibernate_soon(self, user_id: str, entry: _Open) -> None:
        task = asyncio.get_running_loop().create_task(self._hibernate(user_id, entry))
        self._expiring.add(task)
        task.add_done_callback(self._expiring.discard)

    async def _hibernate(self, user_id: str, entry: _Open) -> None:
        async with self._lock(user_id):
            entry.sleeper = None
            if self._open.get(user_id) is entry and self._all_idle(entry):
                if await self._thread(entry.box.hibernate):
                    self._trim_soon()

    def _trim_soon(self) -> None:
        """Give the memory of closed connections back to the system in TRIM_DELAY (one
        malloc_trim for every mailbox that slept or closed meanwhile)."""
        self.trim_requests += 1
        if MALLOC_TRIM is None or self._trim is not None:
            return
        self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY, self._start_trim)

    @property
    def trim_pending(self) -> bool:
        """A malloc_trim is armed or running: a request made before now is not done yet."""
        return self._trim is not None or self._trimming > 0

    def _start_trim(self) -> None:
        self._trim = None
        self._trimming += 1
        task = asyncio.get_running_loop().create_task(self._thread(self._run_trim))
        self._expiring.add(task)
        task.add_done_callback(self._expiring.discard)
        task.add_done_callback(self._trimmed)

    def _trimmed(self, _: asyncio.Task[None]) -> None:
        self._trimming -= 1
        self.trims += 1

    @staticmethod
    def _run_trim() -> None:
        assert MALLOC_TRIM is not None
        MALLOC_TRIM(0)  # in a store thread: it locks each heap in turn while it walks it

    # -- other worker processes (workers.py) ----------------------------------------------

    def watch_other_processes(self) -> None:
        """Other processes serve the same mailboxes: from now on, what they commit reaches
        this process's change feeds, and what they spool for a mailbox open here is
        imported, within SHARED_POLL_SECONDS."""
        Mailbox.shared = True
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_shared())

    async def _poll_shared(self) -> None:
        while True:
            await asyncio.sleep(SHARED_POLL_SECONDS)
            if not self._open:
                continue
            boxes = [(user_id, entry.box) for user_id, entry in self._open.items()]
            asleep = [user_id for user_id, box in boxes if box.hibernating]
            spooled = await self._thread(self._poll_boxes, boxes)
            for user_id in asleep:
                self._arm_hibernation(user_id)  # a look that woke it: to sleep again
            for user_id in spooled:
                try:
                    await self._import_spooled(user_id)
                except Exception:
                    # Nothing is lost: the items stay in the spool for the next round.
                    log.exception("importing mail another worker spooled failed")

    def _poll_boxes(self, boxes: list[tuple[str, Mailbox]]) -> list[str]:
        """In a store thread: tell each box's listeners of other processes' commits; the
        users whose spool holds something."""
        spooled = []
        for user_id, box in boxes:
            try:
                box.poll_external()
                if self.spool.pending(user_id):
                    spooled.append(user_id)
            except Exception:  # closed meanwhile (apsw.ConnectionClosedError), or gone
                log.debug("polling a mailbox for other workers' changes failed", exc_info=True)
        return spooled

    async def _import_spooled(self, user_id: str) -> None:
        async with self._lock(user_id):
            entry = self._open.get(user_id)
            if entry is None:
                return  # closed meanwhile: the next unlock imports
            imported = await self._thread(import_spool, entry.box, self.spool, user_id)
            if imported:
                log.info("imported %d message(s) another worker spooled", len(imported))
                if entry.hook is not None:
                    await self._refile(entry.hook, imported)

    async def _refile(self, hook: MailboxHook, imported: list[tuple[int, int]]) -> None:
        try:
            moved = await self._thread(hook.refile, imported)
        except Exception:
            log.exception("re-filing imported mail failed; it stays where the MX put it")
            return
        if moved:
            log.info("re-filed %d imported message(s) by the user's own filter", moved)

    async def _release(self, user_id: str) -> None:
        async with self._lock(user_id):
            entry = self._open.get(user_id)
            if entry is None:
                return
            entry.refs -= 1
            if entry.refs > 0:
                self._arm_hibernation(user_id)  # the sessions left may all be in IDLE
                return
            if entry.sleeper is not None:
                entry.sleeper.cancel()
                entry.sleeper = None
            if self.linger_seconds <= 0:
                await self._close(user_id, entry)
                return
            loop = asyncio.get_running_loop()
            if entry.linger is not None:
                entry.linger.cancel()  # a delivery's receipt released it while it lingered
            entry.linger = loop.call_later(self.linger_seconds, self._expire_soon, user_id, entry)
            lingering = [(u, e) for u, e in self._open.items() if e.linger is not None]
            for user, oldest in lingering[: max(0, len(lingering) - MAX_LINGERING)]:
                oldest.linger.cancel()  # type: ignore[union-attr]
                self._expire_soon(user, oldest)

    def _expire_soon(self, user_id: str, entry: _Open) -> None:
        # Closing now, no longer lingering: still counted, every later logout of a burst
        # would schedule this close again (a quadratic number of pending closes).
        entry.linger = None
        task = asyncio.get_running_loop().create_task(self._expire(user_id, entry))
        self._expiring.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._expiring.discard)

    async def _expire(self, user_id: str, entry: _Open) -> None:
        """Close a lingering mailbox, unless a session took it up again meanwhile."""
        async with self._lock(user_id):
            if self._open.get(user_id) is entry and entry.refs <= 0:
                await self._close(user_id, entry)

    async def _close(self, user_id: str, entry: _Open) -> None:
        del self._open[user_id]
        if entry.sleeper is not None:
            entry.sleeper.cancel()
            entry.sleeper = None
        entry.cancel_hook()
        await self._thread(self._lock_mailbox, user_id, entry.box)
        self._trim_soon()

    def _lock_mailbox(self, user_id: str, box: Mailbox) -> None:
        try:
            self.accounts.directory.set_usage_hint(user_id, box.usage())
        finally:
            box.close()

    async def deliver(self, user: User, item: SpoolItem) -> str:
        """Store one message durably for ``user``; returns "mailbox" or "spool"."""
        receipt = await self.deliver_undoable(user, item)
        await receipt.close()
        return receipt.where

    async def deliver_undoable(self, user: User, item: SpoolItem) -> Receipt:
        """Store one message durably, keeping the means to withdraw it.

        When this returns the message is on disk and fsynced (a committed WAL frame with
        synchronous=FULL, or a renamed and fsynced spool file). The receipt pins an open
        mailbox until it is closed, so a withdrawal never finds the mailbox locked.
        """
        async with self._lock(user.id):
            entry = self._open.get(user.id)
            if entry is not None:
                folder_id, uid = await self._thread(_append_item, entry.box, item)
                entry.refs += 1
                return Receipt(self, user, "mailbox", (folder_id, uid), entry.box)
            # The deposit itself runs outside the user's lock, so that many deliveries to one
            # user share a group commit; an unlock waits for deposits still in flight.
            self._in_flight[user.id] = self._in_flight.get(user.id, 0) + 1
        try:
            spool_id = await self._batcher.deposit(Deposit(user.id, user.spool_public, item))
        finally:
            self._in_flight[user.id] -= 1
            if not self._in_flight[user.id]:
                del self._in_flight[user.id]
                self._settled.pop(user.id, asyncio.Event()).set()
        return Receipt(self, user, "spool", spool_id, None)

    async def _deposits_settled(self, user_id: str) -> None:
        """Wait (holding the user's lock, so no new deposit starts) for deposits in flight."""
        while user_id in self._in_flight:
            event = self._settled.setdefault(user_id, asyncio.Event())
            await event.wait()

    async def usage_estimate(self, user: User) -> int:
        """Bytes the user's mail takes: exact when unlocked, else the last known figure plus
        the sealed spool (the server cannot look inside a locked mailbox)."""
        entry = self._open.get(user.id)
        if entry is not None:  # outside the user's lock: held awake like a session's call
            return await self._thread(_using, entry.box, entry.box.usage)
        hint = await self._thread(self.accounts.directory.usage_hint, user.id)
        return hint + await self._thread(self.spool.size, user.id)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        if self._trim is not None:
            self._trim.cancel()
            self._trim = None
        for task in self._expiring:
            task.cancel()
        for user_id in list(self._open):
            entry = self._open.pop(user_id)
            for timer in (entry.linger, entry.sleeper):
                if timer is not None:
                    timer.cancel()
            await self._thread(entry.box.close)
        self.executor.shutdown(wait=True)


def _append_item(box: Mailbox, item: SpoolItem) -> tuple[int, int]:
    folder = box.folder_by_use(item.special_use) if item.special_use else None
    folder_id = folder.id if folder is not None else box.folder(INBOX).id
    key = delivery_key(item)
    uids, _ = box.append_many(
        folder_id,
        [(item.raw, item.flags, item.internaldate)],
        spool_ids=None if key is None else [key],
    )
    return folder_id, (uids[0] if uids else 0)  # 0: a copy with a known delivery id, skipped


class Receipt:
    """A stored copy that can still be withdrawn (the pipeline's all-or-nothing delivery)."""

    def __init__(
        self,
        registry: MailboxRegistry,
        user: User,
        where: str,
        token: object,
        box: Mailbox | None,
    ) -> None:
        self.registry = registry
        self.user = user
        self.where = where
        self._token = token
        self._box = box
        self._closed = False

    async def withdraw(self) -> None:
        if self.where == "mailbox":
            assert self._box is not None
            assert isinstance(self._token, tuple)
            folder_id, uid = self._token
            await self.registry._thread(self._box.remove, folder_id, [uid])
        else:
            await self.registry._thread(self.registry.spool.withdraw, self.user.id, self._token)
        await self.close()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._box is not None:
                await self.registry._release(self.user.id)
