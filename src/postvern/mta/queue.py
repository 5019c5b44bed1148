"""The outbound queue: messages waiting for delivery, in one encrypted SQLite database.

An entry is a message with its envelope and, per recipient, where delivery stands (pending,
delivered, failed), when to try next, and what the last attempt said. ``enqueue`` returns only
once the entry is committed with ``synchronous=FULL``, so submission may answer 250 then.
Each write is a function of the connection run in the queue's own thread; writes that arrive
while a commit is in progress share the next commit (group commit), so many concurrent
submissions cost one fsync rather than one each, and nobody is told "done" before the fsync.

Exactly-once: the runner marks recipients delivered in a committed transaction right after the
remote MTA's 250. A crash in between can make the message go out once more on restart; no
protocol can close that window (RFC 5321 §6.1: the sender cannot know whether a 250 it never
saw was sent). A crash anywhere else loses nothing and sends nothing twice.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import apsw

from postvern.delivery.headers import new_queue_id
from postvern.dns import DNSNameError
from postvern.dns.resolver import name_text, to_name
from postvern.encdb import open_encrypted, write_transaction
from postvern.mta.mtasts import CachedPolicy, Mode, Policy
from postvern.smtp.address import AddressError, parse_mailbox

if TYPE_CHECKING:
    from postvern.cluster.sharedq import SharedQueue

T = TypeVar("T")

QUEUE_FILE = "queue.sqlite"
# RFC 3461 §4.4: ENVID is at most 100 characters.
MAX_ENVID = 100
# RFC 5321 §4.5.3.1.8 asks servers to take at least 100 recipients per message; an entry may
# carry more (a list expansion), but not without bound: each one is a row and a job.
MAX_RECIPIENTS = 1000


class QueueError(Exception):
    """The queue database cannot do what was asked."""


class InvalidEnvelope(QueueError, ValueError):
    """An address, ENVID, RET or NOTIFY value that cannot be queued."""


class EntryNotFound(QueueError, KeyError):
    """No queue entry has this id (delivered, deleted, or never existed)."""


class RecipientState(enum.StrEnum):
    PENDING = "pending"  # to be (re)tried at next_attempt
    DELIVERED = "delivered"  # the remote MTA answered 250 after the message
    FAILED = "failed"  # given up: permanent reply, expired, or unroutable


@dataclass(frozen=True, slots=True)
class QueueRecipient:
    """A recipient as submission hands it over, with its RFC 3461 DSN parameters."""

    address: str
    notify: frozenset[str] | None = None  # {"SUCCESS","FAILURE","DELAY"} or {"NEVER"}
    orcpt: str | None = None  # decoded "rfc822;addr"


@dataclass(frozen=True, slots=True)
class RecipientRecord:
    """A recipient as the queue holds it."""

    seq: int
    address: str
    domain: str  # lower-case A-label routing domain
    notify: frozenset[str] | None
    orcpt: str | None
    state: RecipientState
    attempts: int
    next_attempt: float
    last_attempt: float | None
    status: str | None  # RFC 3463 code of the last outcome
    diagnostic: str | None  # "smtp; 451 4.7.1 ..." or "X-Postvern; ..."
    remote_mta: str | None
    tls: str | None  # "verified" / "unverified" / "none" on the last connection
    notice: str | None  # a DSN action still owed to the sender ("failed", "delayed", ...)
    delay_notified: bool


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """An entry without its message text."""

    id: str
    mail_from: str  # "" is the null reverse-path <>
    created: float
    size: int
    envid: str | None
    ret: str | None  # "FULL" / "HDRS"
    smtputf8: bool
    recipients: tuple[RecipientRecord, ...]

    @property
    def next_attempt(self) -> float | None:
        pending = [r.next_attempt for r in self.recipients if r.state is RecipientState.PENDING]
        return min(pending) if pending else None


@dataclass(frozen=True, slots=True)
class Entry:
    info: EntryInfo
    message: bytes


@dataclass(frozen=True, slots=True)
class DueRecipient:
    entry_id: str
    seq: int
    domain: str


@dataclass(frozen=True, slots=True)
class RecipientUpdate:
    """The outcome of one attempt for one recipient, as the runner decided it."""

    seq: int
    state: RecipientState
    attempts: int
    next_attempt: float
    last_attempt: float
    status: str | None
    diagnostic: str | None
    remote_mta: str | None
    tls: str | None
    notice: str | None
    delay_notified: bool


# --- Schema ---------------------------------------------------------------------------------


def _v1(conn: apsw.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE entries (
            id TEXT PRIMARY KEY,
            mail_from TEXT NOT NULL,
            created REAL NOT NULL,
            size INTEGER NOT NULL,
            envid TEXT,
            ret TEXT,
            smtputf8 INTEGER NOT NULL DEFAULT 0,
            message BLOB NOT NULL
        );
        CREATE TABLE recipients (
            entry_id TEXT NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            address TEXT NOT NULL,
            domain TEXT NOT NULL,
            notify TEXT,
            orcpt TEXT,
            state TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt REAL NOT NULL,
            last_attempt REAL,
            status TEXT,
            diagnostic TEXT,
            remote_mta TEXT,
            tls TEXT,
            notice TEXT,
            delay_notified INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (entry_id, seq)
        );
        CREATE INDEX recipients_due ON recipients(state, next_attempt);
        CREATE INDEX recipients_notice ON recipients(notice) WHERE notice IS NOT NULL;
        CREATE TABLE sts_policies (
            domain TEXT PRIMARY KEY,
            policy_id TEXT NOT NULL,
            policy TEXT NOT NULL,
            expires REAL NOT NULL
        );
        """
    )


MIGRATIONS = (_v1,)

_RECIPIENT_COLUMNS = (
    "seq, address, domain, notify, orcpt, state, attempts, next_attempt, last_attempt, "
    "status, diagnostic, remote_mta, tls, notice, delay_notified"
)
_ENTRY_COLUMNS = "id, mail_from, created, size, envid, ret, smtputf8"


def routing_domain(address: str) -> str:
    """The lower-case A-label domain mail for ``address`` is routed by."""
    domain = address.rpartition("@")[2]
    if domain.startswith("["):
        return domain.lower()
    try:
        return name_text(to_name(domain))
    except DNSNameError:
        raise InvalidEnvelope("recipient domain is not a valid DNS name") from None


def _check_address(address: str) -> None:
    try:
        parsed = parse_mailbox(address, utf8=True)
    except AddressError:
        raise InvalidEnvelope("address is not a valid mailbox") from None
    if not parsed.domain:
        raise InvalidEnvelope("address has no domain")


def _check_envelope(
    mail_from: str, recipients: Sequence[QueueRecipient], envid: str | None, ret: str | None
) -> None:
    if mail_from:
        _check_address(mail_from)
    if not recipients:
        raise InvalidEnvelope("no recipients")
    if len(recipients) > MAX_RECIPIENTS:
        raise InvalidEnvelope("too many recipients")
    for r in recipients:
        _check_address(r.address)
        if r.notify is not None and not (
            r.notify == {"NEVER"} or r.notify <= {"SUCCESS", "FAILURE", "DELAY"}
        ):
            raise InvalidEnvelope("invalid NOTIFY value")
    if ret is not None and ret.upper() not in ("FULL", "HDRS"):
        raise InvalidEnvelope("RET must be FULL or HDRS")
    if envid is not None and (len(envid) > MAX_ENVID or not envid.isprintable()):
        raise InvalidEnvelope("invalid ENVID")


def _recipient(row: tuple[Any, ...]) -> RecipientRecord:
    (seq, address, domain, notify, orcpt, state, attempts, next_attempt, last_attempt) = row[:9]
    (status, diagnostic, remote_mta, tls, notice, delay_notified) = row[9:]
    return RecipientRecord(
        seq=seq,
        address=address,
        domain=domain,
        notify=frozenset(notify.split(",")) if notify else None,
        orcpt=orcpt,
        state=RecipientState(state),
        attempts=attempts,
        next_attempt=next_attempt,
        last_attempt=last_attempt,
        status=status,
        diagnostic=diagnostic,
        remote_mta=remote_mta,
        tls=tls,
        notice=notice,
        delay_notified=bool(delay_notified),
    )


# --- The synchronous store (one connection, one thread) -------------------------------------


class QueueStore:
    """All SQL of the queue. Not thread-safe: :class:`Queue` runs it in one thread; the CLI
    may open a second store on the same file (WAL lets both work)."""

    def __init__(self, conn: apsw.Connection) -> None:
        self.conn = conn

    @classmethod
    def open(cls, path: Path, key: bytes, *, create: bool = True) -> QueueStore:
        return cls(open_encrypted(path, key, MIGRATIONS, create=create))

    def close(self) -> None:
        self.conn.close()

    def _rows(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, args).fetchall()

    def __enter__(self) -> QueueStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Writes (each runs inside the caller's transaction)

    def insert(
        self,
        entry_id: str,
        mail_from: str,
        recipients: Sequence[QueueRecipient],
        message: bytes,
        envid: str | None,
        ret: str | None,
        smtputf8: bool,
        now: float,
    ) -> None:
        self.conn.execute(
            f"INSERT INTO entries ({_ENTRY_COLUMNS}, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (entry_id, mail_from, now, len(message), envid, ret, int(smtputf8), message),
        )
        self.conn.executemany(
            "INSERT INTO recipients (entry_id, seq, address, domain, notify, orcpt, "
            "next_attempt) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    entry_id,
                    seq,
                    r.address,
                    routing_domain(r.address),
                    ",".join(sorted(r.notify)) if r.notify else None,
                    r.orcpt,
                    now,
                )
                for seq, r in enumerate(recipients)
            ],
        )

    def update(self, entry_id: str, updates: Iterable[RecipientUpdate]) -> bool:
        """Record attempt outcomes; delete the entry once nothing is left to do.

        Returns whether a notification is owed for the entry.
        """
        self.conn.executemany(
            "UPDATE recipients SET state = ?, attempts = ?, next_attempt = ?, "
            "last_attempt = ?, status = ?, diagnostic = ?, remote_mta = ?, tls = ?, "
            "notice = ?, delay_notified = ? WHERE entry_id = ? AND seq = ?",
            [
                (
                    str(u.state),
                    u.attempts,
                    u.next_attempt,
                    u.last_attempt,
                    u.status,
                    u.diagnostic,
                    u.remote_mta,
                    u.tls,
                    u.notice,
                    int(u.delay_notified),
                    entry_id,
                    u.seq,
                )
                for u in updates
            ],
        )
        return self._settle(entry_id)

    def clear_notices(self, entry_id: str, seqs: Sequence[int]) -> None:
        self.conn.executemany(
            "UPDATE recipients SET notice = NULL WHERE entry_id = ? AND seq = ?",
            [(entry_id, seq) for seq in seqs],
        )
        self._settle(entry_id)

    def _settle(self, entry_id: str) -> bool:
        owed = self._rows(
            "SELECT count(*) FROM recipients WHERE entry_id = ? AND notice IS NOT NULL",
            (entry_id,),
        )[0][0]
        self.conn.execute(
            "DELETE FROM entries WHERE id = ? AND NOT EXISTS (SELECT 1 FROM recipients "
            "WHERE entry_id = ? AND (state = 'pending' OR notice IS NOT NULL))",
            (entry_id, entry_id),
        )
        return bool(owed)

    def reschedule(self, entry_id: str | None, now: float) -> int:
        """Make pending recipients due now (one entry, or all with None); returns how many."""
        if entry_id is None:
            self.conn.execute(
                "UPDATE recipients SET next_attempt = ? WHERE state = 'pending'", (now,)
            )
        else:
            self.conn.execute(
                "UPDATE recipients SET next_attempt = ? WHERE state = 'pending' AND entry_id = ?",
                (now, entry_id),
            )
        return int(self.conn.changes())

    def delete(self, entry_id: str) -> bool:
        self.conn.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
        return self.conn.changes() > 0

    def put_policy(self, domain: str, cached: CachedPolicy) -> None:
        policy = {
            "mode": str(cached.policy.mode),
            "mx": list(cached.policy.mx),
            "max_age": cached.policy.max_age,
        }
        self.conn.execute(
            "INSERT OR REPLACE INTO sts_policies (domain, policy_id, policy, expires) "
            "VALUES (?, ?, ?, ?)",
            (domain, cached.policy_id, json.dumps(policy), cached.expires),
        )

    # Reads

    def due(self, now: float, limit: int) -> list[DueRecipient]:
        rows = self._rows(
            "SELECT entry_id, seq, domain FROM recipients WHERE state = 'pending' "
            "AND next_attempt <= ? ORDER BY next_attempt LIMIT ?",
            (now, limit),
        )
        return [DueRecipient(*row) for row in rows]

    def next_attempt_after(self, now: float) -> float | None:
        row = self._rows(
            "SELECT min(next_attempt) FROM recipients WHERE state = 'pending' AND next_attempt > ?",
            (now,),
        )
        return row[0][0] if row else None

    def entries_with_notices(self) -> list[str]:
        rows = self._rows("SELECT DISTINCT entry_id FROM recipients WHERE notice IS NOT NULL")
        return [r[0] for r in rows]

    def info(self, entry_id: str) -> EntryInfo | None:
        rows = self._rows(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id = ?", (entry_id,))
        if not rows:
            return None
        return self._info(rows[0])

    def entry(self, entry_id: str) -> Entry | None:
        info = self.info(entry_id)
        if info is None:
            return None
        rows = self._rows("SELECT message FROM entries WHERE id = ?", (entry_id,))
        return Entry(info, bytes(rows[0][0])) if rows else None

    def list_entries(self) -> list[EntryInfo]:
        rows = self._rows(f"SELECT {_ENTRY_COLUMNS} FROM entries ORDER BY created")
        return [self._info(row) for row in rows]

    def pending_count(self) -> int:
        return int(self._rows("SELECT count(*) FROM entries")[0][0])

    def get_policy(self, domain: str) -> CachedPolicy | None:
        rows = self._rows(
            "SELECT policy_id, policy, expires FROM sts_policies WHERE domain = ?", (domain,)
        )
        if not rows:
            return None
        policy_id, text, expires = rows[0]
        data = json.loads(text)
        policy = Policy(Mode(data["mode"]), tuple(data["mx"]), int(data["max_age"]))
        return CachedPolicy(policy_id, policy, expires)

    def _info(self, row: tuple[Any, ...]) -> EntryInfo:
        entry_id, mail_from, created, size, envid, ret, smtputf8 = row
        recipients = self._rows(
            f"SELECT {_RECIPIENT_COLUMNS} FROM recipients WHERE entry_id = ? ORDER BY seq",
            (entry_id,),
        )
        return EntryInfo(
            id=entry_id,
            mail_from=mail_from,
            created=created,
            size=size,
            envid=envid,
            ret=ret,
            smtputf8=bool(smtputf8),
            recipients=tuple(_recipient(r) for r in recipients),
        )


# --- The asyncio face -----------------------------------------------------------------------


class _Write:
    __slots__ = ("fn", "future", "loop")

    def __init__(
        self,
        fn: Callable[[QueueStore], Any],
        future: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.fn = fn
        self.future = future
        self.loop = loop


class Queue:
    """The durable outbound queue; open with :meth:`open`, end with :meth:`close`.

    Writes run in one thread on one connection (and are group-committed); reads run in a
    second thread on a second connection, so a delivery looking up its next message never
    waits behind another's fsync (WAL readers see every committed write, never a partial
    one). ``subscribe`` registers a callback run (on the event loop) after each committed
    enqueue with the new entry's recipients: the MTA takes them into delivery without
    rescanning the queue.
    """

    def __init__(
        self,
        writer: QueueStore,
        reader: QueueStore | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = writer
        self._reader = reader or writer
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mta-queue")
        self._read_executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="mta-queue-read")
            if reader is not None
            else self._executor
        )
        self._writes: collections.deque[_Write] = collections.deque()
        self._write_lock = threading.Lock()
        self._listeners: list[Callable[[list[DueRecipient]], None]] = []
        self._notice_listeners: list[Callable[[str], None]] = []
        self._closed = False
        # A cluster front's copy in object storage (cluster/sharedq.py), written before the
        # entry is committed here and deleted once it is finished; None on one machine.
        self.shared: SharedQueue | None = None

    @classmethod
    async def open(cls, path: Path, key: bytes, *, create: bool = True) -> Queue:
        """Open (or create) the queue database at ``path`` with a 32-byte key."""
        writer = await asyncio.to_thread(QueueStore.open, path, key, create=create)
        try:
            reader = await asyncio.to_thread(QueueStore.open, path, key, create=False)
        except BaseException:
            writer.close()
            raise
        return cls(writer, reader)

    async def close(self) -> None:
        """Close both connections once every write already asked for is committed."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._store.close)  # after queued writes
        self._executor.shutdown(wait=True)
        if self._reader is not self._store:
            await loop.run_in_executor(self._read_executor, self._reader.close)
            self._read_executor.shutdown(wait=True)

    def subscribe(self, callback: Callable[[list[DueRecipient]], None]) -> Callable[[], None]:
        """Call ``callback(recipients)`` after every committed enqueue; returns the
        unsubscriber."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def subscribe_notices(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(entry_id)`` when an entry arrives with notices already owed (taken
        over from another front: cluster/sharedq.py); returns the unsubscriber."""
        self._notice_listeners.append(callback)
        listeners = self._notice_listeners
        return lambda: listeners.remove(callback) if callback in listeners else None

    # -- enqueue ---------------------------------------------------------------------------

    async def enqueue(
        self,
        mail_from: str,
        recipients: Sequence[str | QueueRecipient],
        message: bytes,
        *,
        envid: str | None = None,
        ret: str | None = None,
        smtputf8: bool = False,
        queue_id: str | None = None,
        settled: Mapping[str, RecipientUpdate] | None = None,
    ) -> str:
        """Queue a message durably and return its queue id.

        ``mail_from`` is the envelope sender ("" for <>); each recipient is an address or a
        :class:`QueueRecipient` with NOTIFY/ORCPT. ``envid``/``ret`` are RFC 3461 MAIL FROM
        parameters (ret "FULL" or "HDRS"); ``smtputf8`` marks an RFC 6531 transaction.
        ``queue_id`` is the id of the transaction that made the entry (its reply, Received
        header and logs name it), so ``postvern queue show`` finds what the sender was told;
        by default a new one is made (notices). An id already in the queue raises
        :class:`QueueError` and nothing is queued. Returns after the commit (fsync), never
        before. ``settled`` gives, by address, recipients another front already finished
        (cluster/sharedq.py): they are written with that outcome, not tried again.
        """
        rcpts = _deduplicate(
            [r if isinstance(r, QueueRecipient) else QueueRecipient(r) for r in recipients]
        )
        _check_envelope(mail_from, rcpts, envid, ret)
        entry_id = queue_id or new_queue_id()
        now = self._clock()
        ret = ret.upper() if ret else None

        done = settled or {}

        def insert(store: QueueStore) -> None:
            try:
                store.insert(entry_id, mail_from, rcpts, message, envid, ret, smtputf8, now)
            except apsw.ConstraintError:
                raise QueueError("queue id already in use") from None
            if done:
                store.update(
                    entry_id,
                    [replace(done[r.address], seq=seq) for seq, r in enumerate(rcpts)
                     if r.address in done],
                )  # fmt: skip

        if self.shared is None:
            await self.write(insert)
        else:
            async with self.shared.gate.enter():
                await self.shared.put_outbound(
                    entry_id, mail_from, rcpts, message, envid, ret, smtputf8
                )
                try:
                    await self.write(insert)
                except Exception as e:
                    if not isinstance(e, QueueError):  # a duplicate id's object is the entry's
                        await self.shared.finished(entry_id)
                    raise
        due = [
            DueRecipient(entry_id, seq, routing_domain(r.address))
            for seq, r in enumerate(rcpts)
            if r.address not in done
        ]
        for listener in list(self._listeners):
            listener(due)
        if any(u.notice for u in done.values()):
            for notice_listener in list(self._notice_listeners):
                notice_listener(entry_id)
        return entry_id

    # -- delivery bookkeeping (used by the runner) -----------------------------------------

    async def due(self, now: float, limit: int) -> list[DueRecipient]:
        """Pending recipients due at ``now``, soonest first, at most ``limit`` of them."""
        return await self._read(lambda s: s.due(now, limit))

    async def next_attempt_after(self, now: float) -> float | None:
        return await self._read(lambda s: s.next_attempt_after(now))

    async def entry(self, entry_id: str) -> Entry | None:
        return await self._read(lambda s: s.entry(entry_id))

    async def info(self, entry_id: str) -> EntryInfo | None:
        return await self._read(lambda s: s.info(entry_id))

    async def update(self, entry_id: str, updates: Sequence[RecipientUpdate]) -> bool:
        """Commit attempt outcomes; True if a notification is owed for the entry."""
        if self.shared is None:
            return await self.write(lambda s: s.update(entry_id, updates))
        seqs = [u.seq for u in updates if u.state is not RecipientState.PENDING]

        def update(s: QueueStore) -> tuple[bool, bool, list[RecipientRecord]]:
            owed = s.update(entry_id, updates)
            return owed, _gone(s, entry_id), _records(s, entry_id, seqs)

        owed, gone, finished = await self.write(update)
        if gone:
            await self.shared.finished(entry_id)
        else:  # per recipient: a takeover sends only to the others (cluster/sharedq.py)
            await self.shared.progress(entry_id, finished)
        return bool(owed)

    async def clear_notices(self, entry_id: str, seqs: Sequence[int]) -> None:
        if self.shared is None:
            await self.write(lambda s: s.clear_notices(entry_id, seqs))
            return

        def clear(s: QueueStore) -> tuple[bool, list[RecipientRecord]]:
            s.clear_notices(entry_id, seqs)
            return _gone(s, entry_id), _records(s, entry_id, seqs)

        gone, records = await self.write(clear)
        if gone:
            await self.shared.finished(entry_id)
        else:  # the notice is sent: a takeover does not send it again
            await self.shared.progress(
                entry_id, [r for r in records if r.state is not RecipientState.PENDING]
            )

    async def entries_with_notices(self) -> list[str]:
        return await self._read(lambda s: s.entries_with_notices())

    async def pending_count(self) -> int:
        """How many entries are in the queue (anything not yet finished)."""
        return await self._read(lambda s: s.pending_count())

    # -- MTA-STS policy cache (mtasts.PolicyStore) -----------------------------------------

    async def get_policy(self, domain: str) -> CachedPolicy | None:
        return await self._read(lambda s: s.get_policy(domain))

    async def put_policy(self, domain: str, cached: CachedPolicy) -> None:
        await self.write(lambda s: s.put_policy(domain, cached))

    # -- generic access (admin) -------------------------------------------------------------

    async def call(self, fn: Callable[[QueueStore], T]) -> T:
        """Run a read-only ``fn(store)`` in the reading thread (admin list/show)."""
        return await self._read(fn)

    async def write(self, fn: Callable[[QueueStore], T]) -> T:
        """Run ``fn(store)`` inside a committed transaction; return once it is durable.

        Writes queued while another commit is in progress are committed together; each runs
        in its own savepoint, so one failing write does not undo the others.
        """
        if self._closed:
            raise QueueError("the queue is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._write_lock:
            self._writes.append(_Write(fn, future, loop))
        loop.run_in_executor(self._executor, self._commit_pending)
        return await asyncio.shield(future)

    async def _read(self, fn: Callable[[QueueStore], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._read_executor, fn, self._reader
        )

    def _commit_pending(self) -> None:
        """In the queue thread: run every waiting write in one transaction, then answer."""
        with self._write_lock:
            batch = list(self._writes)
            self._writes.clear()
        if not batch:
            return
        results: list[tuple[_Write, Any, BaseException | None]] = []
        try:
            with write_transaction(self._store.conn):
                for write in batch:
                    try:
                        with self._store.conn:  # a savepoint inside the transaction
                            results.append((write, write.fn(self._store), None))
                    except Exception as e:
                        results.append((write, None, e))
        except Exception as e:  # the commit itself failed: nothing in the batch is durable
            results = [(write, None, e) for write in batch]
        for write, value, error in results:
            write.loop.call_soon_threadsafe(_settle_future, write.future, value, error)


def _settle_future(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _gone(store: QueueStore, entry_id: str) -> bool:
    """The entry was finished and deleted (in the same transaction as the last update)."""
    return not store.conn.execute("SELECT 1 FROM entries WHERE id = ?", (entry_id,)).fetchall()


def _records(store: QueueStore, entry_id: str, seqs: Sequence[int]) -> list[RecipientRecord]:
    """The entry's recipients numbered ``seqs`` as committed (none once it is gone)."""
    if not seqs:
        return []
    marks = ",".join("?" * len(seqs))
    rows = store.conn.execute(
        f"SELECT {_RECIPIENT_COLUMNS} FROM recipients WHERE entry_id = ? AND seq IN ({marks})",
        (entry_id, *seqs),
    ).fetchall()
    return [_recipient(row) for row in rows]


def _deduplicate(recipients: list[QueueRecipient]) -> list[QueueRecipient]:
    seen: set[str] = set()
    unique = []
    for r in recipients:
        if r.address not in seen:
            seen.add(r.address)
            unique.append(r)
    return unique
