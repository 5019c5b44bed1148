"""One user's mailbox: an encrypted SQLite file holding folders, messages and the user's secrets.

This is the API the protocols share (IMAP, POP3, delivery): append, fetch, flags with
UNCHANGEDSINCE, copy, move, expunge, full-text search, quota, and a change feed. It is
synchronous and serialised by a lock; the asyncio side runs it in worker threads
(:mod:`postvern.store.service`). Every mutation runs in one transaction, takes one new
MODSEQ (RFC 7162 §3.1: one mod-sequence may cover all messages changed together), and
notifies listeners only after commit, so a session never hears of a change that a crash
could still undo.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import apsw

from postvern import mime
from postvern.encdb import open_encrypted, wal_index_header, write_transaction
from postvern.mime.model import body_to_json, envelope_to_json
from postvern.store import faults, fulltext
from postvern.store.schema import MIGRATIONS

T = TypeVar("T")

INBOX = "INBOX"
DELIMITER = "/"
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
_SYSTEM_BY_LOWER = {f.lower(): f for f in SYSTEM_FLAGS}
DEFAULT_FOLDERS = (
    (INBOX, None),
    ("Drafts", "\\Drafts"),
    ("Sent", "\\Sent"),
    ("Archive", "\\Archive"),
    ("Junk", "\\Junk"),
    ("Trash", "\\Trash"),
)
SPECIAL_USES = frozenset(
    {"\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash"}
)
# Folder names: bounded so that LIST output and path handling stay sane. Dovecot caps a name
# at 255 bytes per level and 1024 in all; we do the same. Wildcards are refused because a
# name containing them could never be listed unambiguously (RFC 9051 §6.3.9).
MAX_FOLDER_NAME = 1024
MAX_FOLDER_LEVEL = 255
MAX_FOLDER_DEPTH = 32
MAX_KEYWORDS_PER_MESSAGE = 64
MAX_KEYWORD_LENGTH = 128
_BAD_NAME = re.compile(r"[\x00-\x1f\x7f*%]")
_KEYWORD = re.compile(r"^[!#$&'+\-.0-9:;<=>?@A-Z^_`a-z|~\x80-\uffff]+$")


class StoreError(Exception):
    """Base of every refusal by the store; the message is safe to show a user."""


class NoSuchFolder(StoreError):
    pass


class FolderExists(StoreError):
    pass


class BadFolderName(StoreError):
    pass


class FolderInUse(StoreError):
    """The request would break an invariant (delete INBOX, delete a folder with children)."""


class OverQuota(StoreError):
    pass


class BadFlag(StoreError):
    pass


@dataclass(frozen=True, slots=True)
class Folder:
    id: int
    name: str
    special_use: str | None
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    subscribed: bool


@dataclass(frozen=True, slots=True)
class FolderStatus:
    messages: int
    unseen: int
    deleted: int
    size: int
    uidnext: int
    uidvalidity: int
    highestmodseq: int
    recent: int = 0  # RFC 3501: messages no session has been shown as recent yet


@dataclass(frozen=True, slots=True)
class MessageInfo:
    uid: int
    modseq: int
    flags: tuple[str, ...]
    internaldate: datetime.datetime
    size: int  # octets as stored (RFC822.SIZE)
    crlf_size: int  # octets with every line ending CRLF, as POP3 sends it (RFC 1939 §11)


@dataclass(frozen=True, slots=True)
class CachedStructure:
    """The JSON caches of one message (parse with postvern.mime.model)."""

    uid: int
    envelope: str
    structure: str


@dataclass(frozen=True, slots=True)
class Change:
    """One committed mutation, as the change feed reports it.

    ``kind`` is ``append``, ``expunge``, ``flags`` (uids in ``folder_id``) or ``folders``
    (the folder list changed). ``origin`` is the opaque token of whoever caused it, so a
    session can tell its own changes from others'.
    """

    kind: str
    folder_id: int
    uids: tuple[int, ...]
    modseq: int
    origin: object = None
    source: int | None = None  # for appends made by COPY or MOVE: the folder copied from


@dataclass(frozen=True, slots=True)
class StoreResult:
    changed: tuple[MessageInfo, ...]
    modified: tuple[int, ...]  # refused by UNCHANGEDSINCE (RFC 7162 §3.1.3)


Listener = Callable[[Change], None]


def normalise_folder_name(name: str) -> str:
    """Validate a folder name and give INBOX its one canonical spelling."""
    if not name or len(name.encode()) > MAX_FOLDER_NAME:
        raise BadFolderName("folder name must be 1 to 1024 bytes")
    if _BAD_NAME.search(name):
        raise BadFolderName("folder name contains a control character or a wildcard")
    parts = name.split(DELIMITER)
    if any(not p or len(p.encode()) > MAX_FOLDER_LEVEL for p in parts):
        raise BadFolderName("folder name has an empty or over-long level")
    if len(parts) > MAX_FOLDER_DEPTH:
        raise BadFolderName("folder hierarchy too deep")
    if parts[0].upper() == INBOX:
        parts[0] = INBOX
    return DELIMITER.join(parts)


def normalise_flags(flags: Iterable[str]) -> tuple[str, ...]:
    """System flags in canonical case, keywords as given; case-insensitive duplicates removed."""
    out: dict[str, str] = {}
    for flag in flags:
        low = flag.lower()
        if low.startswith("\\"):
            if low == "\\recent":
                continue  # session-only in RFC 3501, gone in RFC 9051: never stored
            canonical = _SYSTEM_BY_LOWER.get(low)
            if canonical is None:
                raise BadFlag(f"unknown system flag {flag}")
            out[low] = canonical
        else:
            if len(flag) > MAX_KEYWORD_LENGTH or not _KEYWORD.match(flag):
                raise BadFlag("invalid keyword")
            out.setdefault(low, flag)
    if len(out) > MAX_KEYWORDS_PER_MESSAGE + len(SYSTEM_FLAGS):
        raise BadFlag("too many keywords on one message")
    return tuple(sorted(out.values(), key=str.lower))


def _flags_from_text(text: str) -> tuple[str, ...]:
    return tuple(text.split(" ")) if text else ()


def _to_datetime(epoch: int, tzoffset: int) -> datetime.datetime:
    tz = datetime.timezone(datetime.timedelta(minutes=tzoffset))
    return datetime.datetime.fromtimestamp(epoch, tz)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).astimezone()


# ``Mailbox._data_version`` before the first look (nothing known yet: the base is taken) and
# after a reopen (``_known`` stands; the new connection's counter is not comparable).
_UNKNOWN = -1
_REOPENED = -2


def _file_signature(path: Path) -> tuple[object, ...]:
    """What changes whenever any connection commits to ``path``, read without opening it:
    the WAL index header (encdb.wal_index_header), the WAL's and the main file's size and
    mtime (a checkpoint, or a commit by a connection that then closed, deleting the
    index)."""
    parts: list[object] = []
    for suffix in ("", "-wal"):
        try:
            st = os.stat(f"{path}{suffix}")
            parts += [st.st_ino, st.st_size, st.st_mtime_ns]
        except FileNotFoundError:
            parts.append(None)
    parts.append(wal_index_header(path))
    return tuple(parts)


class Mailbox:
    """An open, unlocked mailbox. Obtain with :meth:`open` or :meth:`create`."""

    def __init__(self, conn: apsw.Connection, path: Path, key: bytes | None = None) -> None:
        self._connection: apsw.Connection | None = conn
        self.path = path
        # Kept so that :meth:`hibernate` can drop the connection and the next use reopen it
        # (the key is in memory as long as the mailbox is unlocked anyway: SQLite's codec
        # holds it while the connection is open). None: this box never hibernates.
        self._key = key
        # Calls in flight from sessions (:meth:`using`): hibernation waits until none is.
        self._users = 0
        # While hibernated: what the file looked like when the connection closed
        # (:meth:`_file_signature`), compared by :meth:`poll_external` instead of a query.
        self._asleep: tuple[object, ...] | None = None
        self._lock = threading.RLock()
        self._listeners: list[Listener] = []
        self._pending: list[Change] = []
        # What this connection last knew of each folder, and SQLite's data_version then:
        # the base from which changes other processes committed are derived (``shared``).
        self._known: dict[int, _FolderMark] = {}
        self._data_version = _UNKNOWN
        # Several workers: a descriptor of the file for flock(2), held shared around every
        # write (and the checkpoint at close) so a backup can hold it exclusively.
        self._writing_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if Mailbox.shared else -1

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, key: bytes) -> Mailbox:
        box = cls(open_encrypted(path, key, MIGRATIONS), path, key)
        if Mailbox.shared:
            box.poll_external()  # the base from which other processes' changes are derived
        return box

    @classmethod
    def create(cls, path: Path, key: bytes, spool_private: bytes) -> Mailbox:
        """Create a new mailbox file with the default folders and the user's spool key."""
        if path.exists():
            raise StoreError(f"{path.name} already exists")
        box = cls(open_encrypted(path, key, MIGRATIONS, create=True), path, key)
        with box._tx():
            box._set_meta("spool_private", spool_private)
            box._set_meta("modseq", 1)
            box._set_meta("usage", 0)
            for name, use in DEFAULT_FOLDERS:
                box._insert_folder(name, use)
        return box

    def close(self) -> None:
        with self._lock, self._writing():
            if self._connection is not None:
                self._connection.close()  # the last connection to close checkpoints: a write
                self._connection = None
            self._asleep = None
            self._key = None
        if self._writing_fd >= 0:
            os.close(self._writing_fd)
            self._writing_fd = -1

    # -- hibernation: an idle mailbox without its SQLite connection ----------------------

    @property
    def _conn(self) -> apsw.Connection:
        """The connection, reopened first if the mailbox hibernates (any use wakes it)."""
        conn = self._connection
        if conn is None:
            conn = self._wake()
        return conn

    def _wake(self) -> apsw.Connection:
        with self._lock:
            if self._connection is not None:
                return self._connection
            if self._key is None:
                raise StoreError("the mailbox is closed")
            self._connection = open_encrypted(self.path, self._key, MIGRATIONS)
            self._asleep = None
            if Mailbox.shared:
                # data_version belongs to a connection: this new one's is not comparable with
                # the old one's, so the next look compares every folder with ``_known``.
                self._data_version = _REOPENED
            return self._connection

    @property
    def hibernating(self) -> bool:
        return self._connection is None and self._key is not None

    @contextmanager
    def using(self) -> Iterator[None]:
        """Around a session's call (MailboxHandle.run): no hibernation while it runs."""
        with self._lock:
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1

    def hibernate(self) -> bool:
        """Close the SQLite connection (about 160 KiB: page cache, schema, the cipher's
        state) while keeping the key, the listeners and what is known of each folder; the
        next use reopens it. For a mailbox whose every session is in IDLE (the registry
        decides). False if a call is in flight, or the box cannot hibernate.

        With several workers, changes other processes commit while it sleeps are noticed by
        :meth:`poll_external` from the file's signature, without reopening: so no commit may
        fall between the last look and the signature, and the exclusive flock(2) (which
        every writer takes shared around its transaction) holds them off for that moment.
        """
        with self._lock:
            if self._connection is None or self._key is None or self._users:
                return False
            if self._writing_fd >= 0:
                fcntl.flock(self._writing_fd, fcntl.LOCK_EX)
            try:
                if Mailbox.shared:
                    self.poll_external()  # everything committed until now is told
                conn, self._connection = self._connection, None
                conn.close()
                self._asleep = _file_signature(self.path)
            finally:
                if self._writing_fd >= 0:
                    fcntl.flock(self._writing_fd, fcntl.LOCK_UN)
            return True

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Shared flock(2) on the file while this process may write it (several workers):
        :func:`writers_excluded` waits for every such writer in every process."""
        if self._writing_fd < 0:
            yield
            return
        fcntl.flock(self._writing_fd, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(self._writing_fd, fcntl.LOCK_UN)

    def __enter__(self) -> Mailbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[apsw.Connection]:
        """One transaction; listeners hear about its changes only after it commits."""
        with self._lock, self._writing():
            self._pending = []
            try:
                with write_transaction(self._conn):
                    if Mailbox.shared:
                        # Changes other processes committed before this transaction took
                        # the write lock: heard first, then this transaction's own.
                        self._pending = self._external_changes()
                    yield self._conn
                    if Mailbox.shared:
                        self._known = self._folder_marks()
            except BaseException:
                self._pending = []
                raise
            changes, self._pending = self._pending, []
        self._tell(changes)

    def _tell(self, changes: list[Change]) -> None:
        for change in changes:
            for listener in list(self._listeners):
                listener(change)

    # -- changes made by other processes (several workers, workers.py) -----------------

    # Set once per process when other processes may write the same mailbox files at the same
    # time (more than one worker): every transaction and :meth:`poll_external` then derive
    # the changes other connections committed, by MODSEQ, and tell this process's listeners.
    shared: bool = False

    def poll_external(self) -> int:
        """Tell listeners what other processes committed since this connection last looked
        (RFC 7162 §3.1: every change has a MODSEQ, every expunge is in ``expunged``); returns
        how many changes were told. Cheap when nothing changed: one ``PRAGMA data_version``."""
        with self._lock:
            if self._connection is None:
                if self._asleep is not None and self._asleep == _file_signature(self.path):
                    return 0  # hibernating and nothing was written since
            elif self._read_data_version() == self._data_version:
                return 0
            # A read transaction (one snapshot for every query), not the write lock.
            self._conn.execute("BEGIN DEFERRED")
            try:
                changes = self._external_changes()
            finally:
                self._conn.execute("COMMIT")
        self._tell(changes)
        return len(changes)

    def quiesced(self, work: Callable[[], T]) -> T:
        """Run ``work`` (a copy of the file, in this thread) with no write of this process in
        between and the WAL folded into the main file first, so the file alone is the whole
        mailbox (the backup's and a move's copy)."""
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            return work()

    def _read_data_version(self) -> int:
        # Changes whenever another connection commits, never for this one's own commits.
        return int(self._q("PRAGMA data_version")[0][0])

    def _folder_marks(self) -> dict[int, _FolderMark]:
        rows = self._q("SELECT id, name, uidvalidity, uidnext, highestmodseq FROM folders")
        return {int(r[0]): _FolderMark(str(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows}

    def _external_changes(self) -> list[Change]:
        """Inside a transaction: the changes since ``_known``, as the change feed has them."""
        version = self._read_data_version()
        if version == self._data_version:
            return []
        first = self._data_version == _UNKNOWN
        self._data_version = version
        marks = self._folder_marks()
        known, self._known = self._known, marks
        if first:
            return []  # the base is taken now: nothing was known before
        out: list[Change] = []
        if {i: (m.name, m.uidvalidity) for i, m in marks.items()} != {
            i: (m.name, m.uidvalidity) for i, m in known.items()
        }:
            out.append(Change("folders", 0, (), 0))
        for folder_id, mark in marks.items():
            before = known.get(folder_id)
            if before is None or before.uidvalidity != mark.uidvalidity:
                continue  # a new or renamed folder: the "folders" change covers it
            if mark.highestmodseq <= before.highestmodseq and mark.uidnext == before.uidnext:
                continue
            out += self._folder_changes(folder_id, before, mark)
        return out

    def _folder_changes(
        self, folder_id: int, before: _FolderMark, now: _FolderMark
    ) -> list[Change]:
        since = before.highestmodseq
        out: list[Change] = []
        gone = [
            int(r[0])
            for r in self._q(
                "SELECT uid FROM expunged WHERE folder_id=? AND modseq>? AND uid<? ORDER BY uid",
                (folder_id, since, before.uidnext),
            )
        ]
        if gone:
            out.append(Change("expunge", folder_id, tuple(gone), now.highestmodseq))
        rows = self._q(
            "SELECT uid FROM messages WHERE folder_id=? AND modseq>? ORDER BY uid",
            (folder_id, since),
        )
        new = tuple(int(r[0]) for r in rows if int(r[0]) >= before.uidnext)
        flagged = tuple(int(r[0]) for r in rows if int(r[0]) < before.uidnext)
        if new:
            out.append(Change("append", folder_id, new, now.highestmodseq))
        if flagged:
            out.append(Change("flags", folder_id, flagged, now.highestmodseq))
        return out

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Hear every committed change; returns the function that unsubscribes."""
        with self._lock:
            self._listeners.append(listener)

        def cancel() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return cancel

    def _q(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, args).fetchall()

    def _meta(self, key: str) -> Any:
        rows = self._q("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0][0] if rows else None

    def _set_meta(self, key: str, value: object) -> None:
        self._conn.execute("INSERT OR REPLACE INTO meta VALUES(?, ?)", (key, value))

    def _next_modseq(self) -> int:
        value = int(self._meta("modseq") or 1) + 1
        self._set_meta("modseq", value)
        return value

    def _add_usage(self, delta: int) -> None:
        self._set_meta("usage", int(self._meta("usage") or 0) + delta)

    def _emit(
        self,
        kind: str,
        folder_id: int,
        uids: Iterable[int],
        modseq: int,
        origin: object,
        source: int | None = None,
    ) -> None:
        self._pending.append(Change(kind, folder_id, tuple(uids), modseq, origin, source))

    # -- user secrets kept inside the mailbox ------------------------------------------

    def spool_private_key(self) -> bytes:
        with self._lock:
            return bytes(self._meta("spool_private"))

    def get_blob(self, key: str) -> bytes | None:
        """Per-user data other packages keep here (the filter's user model)."""
        with self._lock:
            value = self._meta(f"blob:{key}")
        return None if value is None else bytes(value)

    def set_blob(self, key: str, value: bytes) -> None:
        with self._tx():
            self._set_meta(f"blob:{key}", value)

    # -- folders -----------------------------------------------------------------------

    _FOLDER_COLS = (
        "id, name, special_use, uidvalidity, uidnext, highestmodseq,"
        " EXISTS(SELECT 1 FROM subscriptions s WHERE s.name=folders.name)"
    )

    @staticmethod
    def _folder(row: tuple[Any, ...]) -> Folder:
        return Folder(
            int(row[0]),
            str(row[1]),
            None if row[2] is None else str(row[2]),
            int(row[3]),
            int(row[4]),
            int(row[5]),
            bool(row[6]),
        )

    def _new_uidvalidity(self) -> int:
        # Strictly increasing across deletes and recreations of the same name (RFC 9051
        # §2.3.1.1): seconds since the epoch, bumped past the last one handed out.
        last = int(self._meta("uidvalidity") or 0)
        value = max(int(time.time()), last + 1) & 0xFFFFFFFF
        self._set_meta("uidvalidity", value)
        return value

    def _insert_folder(self, name: str, special_use: str | None) -> Folder:
        uidvalidity = self._new_uidvalidity()
        self._conn.execute(
            "INSERT INTO folders(name, special_use, uidvalidity, created) VALUES(?, ?, ?, ?)",
            (name, special_use, uidvalidity, int(time.time())),
        )
        folder_id = int(self._conn.last_insert_rowid())
        # A new folder is subscribed, as before subscriptions had a table of their own.
        self._conn.execute("INSERT OR IGNORE INTO subscriptions VALUES(?)", (name,))
        self._emit("folders", folder_id, (), 0, None)
        return Folder(folder_id, name, special_use, uidvalidity, 1, 1, True)

    def folders(self) -> list[Folder]:
        with self._lock:
            rows = self._q(f"SELECT {self._FOLDER_COLS} FROM folders ORDER BY name")
        return [self._folder(r) for r in rows]

    def folder(self, name: str) -> Folder:
        try:
            name = normalise_folder_name(name)
        except BadFolderName:
            raise NoSuchFolder(f"no folder named {name!r}") from None
        with self._lock:
            rows = self._q(f"SELECT {self._FOLDER_COLS} FROM folders WHERE name=?", (name,))
        if not rows:
            raise NoSuchFolder(f"no folder named {name!r}")
        return self._folder(rows[0])

    def folder_by_id(self, folder_id: int) -> Folder:
        with self._lock:
            rows = self._q(f"SELECT {self._FOLDER_COLS} FROM folders WHERE id=?", (folder_id,))
        if not rows:
            raise NoSuchFolder("folder no longer exists")
        return self._folder(rows[0])

    def folder_by_use(self, special_use: str) -> Folder | None:
        with self._lock:
            rows = self._q(
                f"SELECT {self._FOLDER_COLS} FROM folders WHERE special_use=? ORDER BY id",
                (special_use,),
            )
        return self._folder(rows[0]) if rows else None

    def create_folder(self, name: str, special_use: str | None = None) -> Folder:
        """Create ``name`` and any missing parents (RFC 9051 §6.3.4)."""
        name = normalise_folder_name(name)
        if special_use is not None and special_use not in SPECIAL_USES:
            raise StoreError(f"unsupported special use {special_use}")
        with self._tx():
            if self._q("SELECT 1 FROM folders WHERE name=?", (name,)):
                raise FolderExists(f"folder {name!r} already exists")
            parts = name.split(DELIMITER)
            for depth in range(1, len(parts)):
                parent = DELIMITER.join(parts[:depth])
                if not self._q("SELECT 1 FROM folders WHERE name=?", (parent,)):
                    self._insert_folder(parent, None)
            return self._insert_folder(name, special_use)

    def delete_folder(self, name: str) -> None:
        folder = self.folder(name)
        if folder.name == INBOX:
            raise FolderInUse("INBOX cannot be deleted")
        with self._tx():
            if self._q(
                "SELECT 1 FROM folders WHERE name LIKE ? ESCAPE '\\' LIMIT 1",
                (_like_prefix(folder.name + DELIMITER),),
            ):
                raise FolderInUse(f"folder {folder.name!r} has subfolders; delete them first")
            uids = [
                int(r[0])
                for r in self._q("SELECT uid FROM messages WHERE folder_id=?", (folder.id,))
            ]
            self._remove_messages(folder.id, uids)
            self._conn.execute("DELETE FROM expunged WHERE folder_id=?", (folder.id,))
            self._conn.execute("DELETE FROM folders WHERE id=?", (folder.id,))
            self._emit("folders", folder.id, (), 0, None)

    def rename_folder(self, old: str, new: str) -> None:
        """Rename a folder and its children; renaming INBOX moves its messages (§6.3.6)."""
        source = self.folder(old)
        new = normalise_folder_name(new)
        if source.name == INBOX:
            self._rename_inbox(source, new)
            return
        with self._tx():
            if self._q("SELECT 1 FROM folders WHERE name=?", (new,)):
                raise FolderExists(f"folder {new!r} already exists")
            if new.startswith(source.name + DELIMITER):
                raise BadFolderName("cannot move a folder into itself")
            parts = new.split(DELIMITER)
            for depth in range(1, len(parts)):
                parent = DELIMITER.join(parts[:depth])
                if not self._q("SELECT 1 FROM folders WHERE name=?", (parent,)):
                    self._insert_folder(parent, None)
            rows = self._q(
                "SELECT id, name FROM folders WHERE name=? OR name LIKE ? ESCAPE '\\'",
                (source.name, _like_prefix(source.name + DELIMITER)),
            )
            self._rename_subscriptions(source.name, new)
            for folder_id, name in rows:
                renamed = new + str(name)[len(source.name) :]
                # A renamed folder is a new folder to clients: its UIDs must not be trusted
                # against a cache of the old name (RFC 9051 §6.3.6), so UIDVALIDITY changes.
                self._conn.execute(
                    "UPDATE folders SET name=?, uidvalidity=? WHERE id=?",
                    (renamed, self._new_uidvalidity(), folder_id),
                )
            self._emit("folders", source.id, (), 0, None)

    def _rename_inbox(self, inbox: Folder, new: str) -> None:
        target = self.create_folder(new)
        uids = [m.uid for m in self.messages(inbox.id)]
        if uids:
            self.move(inbox.id, uids, target.id)

    def _rename_subscriptions(self, old: str, new: str) -> None:
        """A renamed folder and its children keep their subscriptions, as in Dovecot."""
        rows = self._q(
            "SELECT name FROM subscriptions WHERE name=? OR name LIKE ? ESCAPE '\\'",
            (old, _like_prefix(old + DELIMITER)),
        )
        for (name,) in rows:
            self._conn.execute("DELETE FROM subscriptions WHERE name=?", (name,))
            renamed = new + str(name)[len(old) :]
            self._conn.execute("INSERT OR IGNORE INTO subscriptions VALUES(?)", (renamed,))

    def subscriptions(self) -> list[str]:
        """Every subscribed name, whether or not its folder exists, in name order."""
        with self._lock:
            return [str(r[0]) for r in self._q("SELECT name FROM subscriptions ORDER BY name")]

    def subscribe_folder(self, name: str, subscribed: bool) -> None:
        """SUBSCRIBE needs an existing folder; UNSUBSCRIBE takes any subscribed name, so that
        the name of a deleted folder can be removed (RFC 9051 §6.3.8)."""
        if subscribed:
            name = self.folder(name).name
        else:
            try:
                name = normalise_folder_name(name)
            except BadFolderName:
                raise NoSuchFolder(f"no folder named {name!r}") from None
        with self._tx():
            if subscribed:
                self._conn.execute("INSERT OR IGNORE INTO subscriptions VALUES(?)", (name,))
            else:
                self._conn.execute("DELETE FROM subscriptions WHERE name=?", (name,))
                if not self._conn.changes() and not self._q(
                    "SELECT 1 FROM folders WHERE name=?", (name,)
                ):
                    raise NoSuchFolder(f"no folder named {name!r}")
            self._emit("folders", 0, (), 0, None)

    def status(self, folder_id: int) -> FolderStatus:
        with self._lock:
            folder = self.folder_by_id(folder_id)
            row = self._q(
                "SELECT count(*), total(size), count(*) - total(seen), total(deleted), "
                "total(uid >= (SELECT recent_floor FROM folders WHERE id=?)) "
                "FROM messages WHERE folder_id=?",
                (folder_id, folder_id),
            )[0]
        return FolderStatus(
            messages=int(row[0]),
            size=int(row[1]),
            unseen=int(row[2]),
            deleted=int(row[3]),
            uidnext=folder.uidnext,
            uidvalidity=folder.uidvalidity,
            highestmodseq=folder.highestmodseq,
            recent=int(row[4]),
        )

    # -- reading messages --------------------------------------------------------------

    def take_recent(self, folder_id: int, uids: Sequence[int], *, claim: bool) -> list[int]:
        """RFC 3501 §2.3.2 \\Recent: which of ``uids`` no session has been shown as recent.

        With ``claim`` (a read-write IMAP4rev1 session) they become the caller's alone: the
        folder's recent floor moves above them in the same transaction, so no other session,
        in this process or another, ever sees them recent. Without it (EXAMINE) nothing
        changes (RFC 3501 §6.3.2: EXAMINE does not take \\Recent away).
        """
        with self._tx():
            rows = self._q("SELECT recent_floor FROM folders WHERE id=?", (folder_id,))
            if not rows or not uids:
                return []
            floor = int(rows[0][0])
            recent = [uid for uid in uids if uid >= floor]
            if claim and recent:
                self._conn.execute(
                    "UPDATE folders SET recent_floor=? WHERE id=?", (max(recent) + 1, folder_id)
                )
        return recent

    def keywords(self, folder_id: int) -> set[str]:
        """Every keyword set on some message of the folder (RFC 9051 §2.3.2), as spelled."""
        with self._lock:
            rows = self._q(
                "SELECT DISTINCT flags FROM messages WHERE folder_id=? AND flags != ''",
                (folder_id,),
            )
        return {f for (text,) in rows for f in _flags_from_text(str(text)) if f[0] != "\\"}

    def uids(self, folder_id: int) -> list[int]:
        """Every UID in the folder, ascending: a session's sequence-number map."""
        with self._lock:
            rows = self._q("SELECT uid FROM messages WHERE folder_id=? ORDER BY uid", (folder_id,))
        return [int(r[0]) for r in rows]

    _INFO_COLS = "uid, modseq, flags, internaldate, tzoffset, size, crlf_size"

    @staticmethod
    def _info(row: tuple[Any, ...]) -> MessageInfo:
        return MessageInfo(
            int(row[0]),
            int(row[1]),
            _flags_from_text(str(row[2])),
            _to_datetime(int(row[3]), int(row[4])),
            int(row[5]),
            int(row[6]),
        )

    def messages(self, folder_id: int, uids: Iterable[int] | None = None) -> list[MessageInfo]:
        """Metadata of the given UIDs (all when None), in UID order; absent UIDs are skipped."""
        with self._lock:
            if uids is None:
                rows = self._q(
                    f"SELECT {self._INFO_COLS} FROM messages WHERE folder_id=? ORDER BY uid",
                    (folder_id,),
                )
            else:
                rows = self._select_uids(self._INFO_COLS, folder_id, uids)
        return [self._info(r) for r in rows]

    def _select_uids(
        self, cols: str, folder_id: int, uids: Iterable[int], join: str = ""
    ) -> list[tuple[Any, ...]]:
        wanted = sorted(set(uids))
        if not wanted:
            return []
        # A JSON array parameter keeps any number of UIDs to one statement (no 999-variable
        # limit) and lets SQLite walk the primary key.
        return self._q(
            f"SELECT {cols} FROM messages m {join} WHERE m.folder_id=? AND m.uid IN "
            "(SELECT value FROM json_each(?)) ORDER BY m.uid",
            (folder_id, _json_ints(wanted)),
        )

    def changed_since(self, folder_id: int, modseq: int) -> list[MessageInfo]:
        """Messages whose MODSEQ is above ``modseq`` (CONDSTORE CHANGEDSINCE)."""
        with self._lock:
            rows = self._q(
                f"SELECT {self._INFO_COLS} FROM messages WHERE folder_id=? AND modseq>? "
                "ORDER BY uid",
                (folder_id, modseq),
            )
        return [self._info(r) for r in rows]

    def vanished_since(self, folder_id: int, modseq: int) -> list[int]:
        """UIDs expunged after ``modseq`` (QRESYNC VANISHED (EARLIER))."""
        with self._lock:
            rows = self._q(
                "SELECT uid FROM expunged WHERE folder_id=? AND modseq>? ORDER BY uid",
                (folder_id, modseq),
            )
        return [int(r[0]) for r in rows]

    def structures(self, folder_id: int, uids: Iterable[int]) -> list[CachedStructure]:
        with self._lock:
            rows = self._select_uids(
                "m.uid, b.envelope, b.structure", folder_id, uids, "JOIN bodies b ON b.id=m.body_id"
            )
        return [CachedStructure(int(r[0]), str(r[1]), str(r[2])) for r in rows]

    def raw(self, folder_id: int, uid: int) -> bytes:
        with self._lock:
            rows = self._q(
                "SELECT r.raw FROM messages m JOIN raws r ON r.body_id=m.body_id "
                "WHERE m.folder_id=? AND m.uid=?",
                (folder_id, uid),
            )
        if not rows:
            raise StoreError("no such message")
        return bytes(rows[0][0])

    def search_text(self, folder_id: int, field: str, text: str) -> set[int] | None:
        """UIDs whose indexed text contains ``text`` as a substring (RFC 9051 §6.4.4).

        ``field`` is ``text`` (headers and body), ``body`` or ``headers``. Matching is on the
        decoded text (MIME parts decoded, HTML reduced), case- and diacritic-insensitive
        (:mod:`postvern.store.fulltext`). None when the needle is too short for the trigram
        index (one or two characters): the caller must scan the text itself.
        """
        query = fulltext.match_query(text)
        if query is None:
            return None
        column = {"text": "{headers body}", "body": "body", "headers": "headers"}[field]
        with self._lock:
            rows = self._q(
                "SELECT m.uid FROM fts JOIN messages m ON m.body_id = fts.rowid "
                "WHERE fts MATCH ? AND m.folder_id=?",
                (f"{column} : {query}", folder_id),
            )
        return {int(r[0]) for r in rows}

    def usage(self) -> int:
        with self._lock:
            return int(self._meta("usage") or 0)

    # -- writing messages --------------------------------------------------------------

    def append(
        self,
        folder_id: int,
        raw: bytes,
        flags: Iterable[str] = (),
        internaldate: datetime.datetime | None = None,
        *,
        quota: int = 0,
        origin: object = None,
    ) -> tuple[int, int]:
        """Store one message; returns (uid, uidvalidity). Parses it once, here."""
        (uid,), uidvalidity = self.append_many(
            folder_id, [(raw, flags, internaldate)], quota=quota, origin=origin
        )
        return uid, uidvalidity

    def append_many(
        self,
        folder_id: int,
        items: Sequence[tuple[bytes, Iterable[str], datetime.datetime | None]],
        *,
        quota: int = 0,
        origin: object = None,
        spool_ids: Sequence[str] | None = None,
    ) -> tuple[list[int], int]:
        """Store several messages in one transaction (MULTIAPPEND, spool import)."""
        prepared = [
            (_prepare_body(raw), normalise_flags(flags), internaldate or _now())
            for raw, flags, internaldate in items
        ]
        with self._tx():
            folder = self.folder_by_id(folder_id)
            added = sum(len(p[0].raw) for p in prepared)
            self._check_quota(added, quota)
            modseq = self._next_modseq()
            uids: list[int] = []
            for index, (body, flags, when) in enumerate(prepared):
                if spool_ids is not None:
                    if self._q("SELECT 1 FROM spool_imported WHERE id=?", (spool_ids[index],)):
                        continue  # imported before a crash; the file outlived the commit
                    self._conn.execute(
                        "INSERT INTO spool_imported VALUES(?, ?)",
                        (spool_ids[index], int(time.time())),
                    )
                body_id = self._insert_body(body)
                uid = folder.uidnext + len(uids)
                self._insert_message(folder_id, uid, body_id, modseq, flags, when, body)
                uids.append(uid)
            if uids:
                self._conn.execute(
                    "UPDATE folders SET uidnext=?, highestmodseq=? WHERE id=?",
                    (folder.uidnext + len(uids), modseq, folder_id),
                )
                self._add_usage(sum(p[0].size for p in prepared[: len(uids)]))
                self._emit("append", folder_id, uids, modseq, origin)
            faults.point("store.append.before-commit")
        return uids, folder.uidvalidity

    def _check_quota(self, added: int, quota: int) -> None:
        if quota and self.usage() + added > quota:
            raise OverQuota("mailbox is over its storage quota")

    def _insert_body(self, body: _PreparedBody) -> int:
        self._conn.execute(
            "INSERT INTO bodies(size, envelope, structure, refs) VALUES(?, ?, ?, 1)",
            (body.size, body.envelope, body.structure),
        )
        body_id = int(self._conn.last_insert_rowid())
        self._conn.execute("INSERT INTO raws VALUES(?, ?)", (body_id, body.raw))
        self._conn.execute(
            "INSERT INTO fts(rowid, headers, body) VALUES(?, ?, ?)",
            (body_id, body.headers_text, body.body_text),
        )
        return body_id

    def _insert_message(
        self,
        folder_id: int,
        uid: int,
        body_id: int,
        modseq: int,
        flags: tuple[str, ...],
        when: datetime.datetime,
        body: _PreparedBody,
    ) -> None:
        offset = when.utcoffset()
        tzoffset = int(offset.total_seconds() // 60) if offset is not None else 0
        self._conn.execute(
            "INSERT INTO messages(folder_id, uid, body_id, modseq, flags, internaldate, tzoffset,"
            " size, crlf_size) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                folder_id,
                uid,
                body_id,
                modseq,
                " ".join(flags),
                int(when.timestamp()),
                tzoffset,
                body.size,
                body.crlf_size,
            ),
        )

    def store_flags(
        self,
        folder_id: int,
        uids: Iterable[int],
        operation: str,
        flags: Iterable[str],
        *,
        unchangedsince: int | None = None,
        origin: object = None,
    ) -> StoreResult:
        """``operation`` is ``add``, ``remove`` or ``replace`` (STORE +FLAGS/-FLAGS/FLAGS).

        Messages whose flags end up unchanged keep their MODSEQ. With ``unchangedsince``,
        a message modified after that MODSEQ is left alone and reported in ``modified``.
        """
        given = normalise_flags(flags)
        lowered = {f.lower() for f in given}
        changed: list[MessageInfo] = []
        modified: list[int] = []
        with self._tx():
            current = [self._info(r) for r in self._select_uids(self._INFO_COLS, folder_id, uids)]
            modseq = 0
            for info in current:
                if unchangedsince is not None and info.modseq > unchangedsince:
                    modified.append(info.uid)
                    continue
                if operation == "add":
                    new = normalise_flags(info.flags + given)
                elif operation == "remove":
                    new = tuple(f for f in info.flags if f.lower() not in lowered)
                elif operation == "replace":
                    new = given
                else:
                    raise ValueError(operation)
                if new == info.flags:
                    continue
                if not modseq:
                    modseq = self._next_modseq()
                self._conn.execute(
                    "UPDATE messages SET flags=?, modseq=? WHERE folder_id=? AND uid=?",
                    (" ".join(new), modseq, folder_id, info.uid),
                )
                changed.append(
                    MessageInfo(info.uid, modseq, new, info.internaldate, info.size, info.crlf_size)
                )
            if changed:
                self._conn.execute(
                    "UPDATE folders SET highestmodseq=? WHERE id=?", (modseq, folder_id)
                )
                self._emit("flags", folder_id, [c.uid for c in changed], modseq, origin)
        return StoreResult(tuple(changed), tuple(modified))

    def copy(
        self,
        source_id: int,
        uids: Iterable[int],
        target_id: int,
        *,
        quota: int = 0,
        origin: object = None,
    ) -> tuple[list[tuple[int, int]], int]:
        """Copy messages (sharing their bodies); returns ([(src uid, new uid)], uidvalidity)."""
        with self._tx():
            pairs, uidvalidity = self._copy(source_id, uids, target_id, quota, origin)
        return pairs, uidvalidity

    def _copy(
        self, source_id: int, uids: Iterable[int], target_id: int, quota: int, origin: object
    ) -> tuple[list[tuple[int, int]], int]:
        target = self.folder_by_id(target_id)
        rows = self._select_uids(
            "uid, body_id, flags, internaldate, tzoffset, size, crlf_size", source_id, uids
        )
        if not rows:
            return [], target.uidvalidity
        self._check_quota(sum(int(r[5]) for r in rows), quota)
        modseq = self._next_modseq()
        pairs = []
        for offset, (uid, body_id, flags, idate, tz, size, crlf_size) in enumerate(rows):
            new_uid = target.uidnext + offset
            self._conn.execute(
                "INSERT INTO messages(folder_id, uid, body_id, modseq, flags, internaldate,"
                " tzoffset, size, crlf_size) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (target_id, new_uid, body_id, modseq, flags, idate, tz, size, crlf_size),
            )
            self._conn.execute("UPDATE bodies SET refs=refs+1 WHERE id=?", (body_id,))
            pairs.append((int(uid), new_uid))
        self._conn.execute(
            "UPDATE folders SET uidnext=?, highestmodseq=? WHERE id=?",
            (target.uidnext + len(rows), modseq, target_id),
        )
        self._add_usage(sum(int(r[5]) for r in rows))
        self._emit("append", target_id, [p[1] for p in pairs], modseq, origin, source_id)
        return pairs, target.uidvalidity

    def move(
        self,
        source_id: int,
        uids: Iterable[int],
        target_id: int,
        *,
        origin: object = None,
    ) -> tuple[list[tuple[int, int]], int]:
        """Copy then expunge from the source, atomically (RFC 6851). A move within one
        folder is what COPY and EXPUNGE would do there: the messages get new UIDs."""
        with self._tx():
            # Usage is unchanged: _copy adds the sizes that _expunge takes away again.
            pairs, uidvalidity = self._copy(source_id, uids, target_id, 0, origin)
            self._expunge(source_id, [p[0] for p in pairs], origin, only_deleted=False)
        return pairs, uidvalidity

    def expunge(
        self, folder_id: int, uids: Iterable[int] | None = None, *, origin: object = None
    ) -> list[int]:
        """Remove messages flagged \\Deleted (only among ``uids`` if given: UID EXPUNGE)."""
        with self._tx():
            return self._expunge(folder_id, uids, origin, only_deleted=True)

    def remove(self, folder_id: int, uids: Iterable[int], *, origin: object = None) -> list[int]:
        """Expunge the given messages whatever their flags (a withdrawn delivery, POP3 DELE)."""
        with self._tx():
            return self._expunge(folder_id, uids, origin, only_deleted=False)

    def _expunge(
        self, folder_id: int, uids: Iterable[int] | None, origin: object, *, only_deleted: bool
    ) -> list[int]:
        if uids is None:
            rows = self._q(
                "SELECT uid FROM messages WHERE folder_id=? AND deleted ORDER BY uid",
                (folder_id,),
            )
        else:
            cols = "uid, deleted"
            rows = [
                (r[0],)
                for r in self._select_uids(cols, folder_id, uids)
                if r[1] or not only_deleted
            ]
        gone = [int(r[0]) for r in rows]
        if not gone:
            return []
        modseq = self._next_modseq()
        self._remove_messages(folder_id, gone)
        self._conn.executemany(
            "INSERT OR REPLACE INTO expunged VALUES(?, ?, ?)",
            [(folder_id, uid, modseq) for uid in gone],
        )
        self._conn.execute("UPDATE folders SET highestmodseq=? WHERE id=?", (modseq, folder_id))
        self._emit("expunge", folder_id, gone, modseq, origin)
        return gone

    def _remove_messages(self, folder_id: int, uids: list[int]) -> None:
        if not uids:
            return
        rows = self._select_uids("body_id, size", folder_id, uids)
        self._conn.execute(
            "DELETE FROM messages WHERE folder_id=? AND uid IN (SELECT value FROM json_each(?))",
            (folder_id, _json_ints(uids)),
        )
        for body_id, _size in rows:
            self._conn.execute("UPDATE bodies SET refs=refs-1 WHERE id=?", (body_id,))
        orphans = self._q(
            "SELECT id FROM bodies WHERE refs<=0 AND id IN (SELECT value FROM json_each(?))",
            (_json_ints(int(r[0]) for r in rows),),
        )
        for (body_id,) in orphans:
            self._conn.execute("DELETE FROM fts WHERE rowid=?", (body_id,))
            self._conn.execute("DELETE FROM bodies WHERE id=?", (body_id,))
        self._add_usage(-sum(int(r[1]) for r in rows))

    # -- the sealed spool's import bookkeeping -----------------------------------------

    def imported_spool_ids(self) -> set[str]:
        with self._lock:
            return {str(r[0]) for r in self._q("SELECT id FROM spool_imported")}

    def forget_spool_ids(self, ids: Iterable[str]) -> None:
        """Drop import records whose files are gone for good (keeps the table small)."""
        with self._tx():
            self._conn.executemany("DELETE FROM spool_imported WHERE id=?", [(i,) for i in ids])


@contextmanager
def writers_excluded(path: Path) -> Iterator[None]:
    """No process writes the mailbox file at ``path`` (nor checkpoints into it) meanwhile:
    exclusive flock(2) against the shared one each :class:`Mailbox` of a worker holds while
    it writes. A backup copies the bytes under it (backup/snapshot.py)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class _FolderMark:
    """One folder as a connection last saw it (the base of :meth:`Mailbox.poll_external`)."""

    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int


@dataclass(frozen=True, slots=True)
class _PreparedBody:
    raw: bytes
    size: int
    crlf_size: int
    envelope: str
    structure: str
    headers_text: str
    body_text: str


def _prepare_body(raw: bytes) -> _PreparedBody:
    """Everything computed once per message, before the transaction takes the lock."""
    envelope, body = mime.describe(raw)
    headers_text, body_text = fulltext.index_texts(raw, body)
    return _PreparedBody(
        raw=raw,
        size=len(raw),
        # Bare LFs become CRLF on the POP3 wire; the size announced must match what is sent.
        crlf_size=len(raw) + raw.count(b"\n") - raw.count(b"\r\n"),
        envelope=envelope_to_json(envelope),
        structure=body_to_json(body),
        headers_text=headers_text,
        body_text=body_text,
    )


def _json_ints(values: Iterable[int]) -> str:
    return "[" + ",".join(str(int(v)) for v in values) + "]"


def _like_prefix(prefix: str) -> str:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"
