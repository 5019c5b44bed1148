"""Encrypted SQLite files: SQLite3 Multiple Ciphers with ChaCha20-Poly1305, keyed by raw keys.

Every database Postvern writes (each mailbox, the directory, the queue) goes through here, so
the cipher, the durability pragmas and the migration rule live in one place. Keys are full
entropy, so they are given raw (``PRAGMA key="raw:<hex>"``): the cipher's own password KDF
would cost ~25 ms per open for nothing (DESIGN.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import apsw

KEY_BYTES = 32
BUSY_TIMEOUT_MS = 10_000

Migration = Callable[[apsw.Connection], None]


# The WAL index header (https://sqlite.org/walformat.html §2.1): its first copy holds a
# counter of write transactions, the frame count and the WAL salts, so it changes with every
# commit by any connection, and with nothing else a reader does.
WAL_INDEX_HEADER = 48


def wal_index_header(path: Path) -> bytes | None:
    """The first copy of ``path``'s WAL index header, read from ``<path>-shm`` without
    opening the database (it is neither encrypted nor secret: counters and salts); None
    when there is none (no connection has the file open in WAL mode). A cheap "has anyone
    committed since?" that takes no SQLite call.

    Only while no connection of this process has ``path`` open: closing any descriptor of
    a file drops every POSIX lock the process holds on it (fcntl(2)), SQLite's included.
    For a file that is open here, read SQLite's own descriptor (login_cache.WalIndexWatch).
    """
    try:
        fd = os.open(f"{path}-shm", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        header = os.pread(fd, WAL_INDEX_HEADER, 0)
    finally:
        os.close(fd)
    return header if len(header) == WAL_INDEX_HEADER else None


@contextlib.contextmanager
def write_transaction(conn: apsw.Connection) -> Iterator[apsw.Connection]:
    """A write transaction on ``conn``: committed if the block ends normally, rolled back if
    it raises; inside another transaction, a savepoint (apsw's ``with conn:``).

    Use this, not ``with conn:``, to begin an outermost transaction. apsw's context manager
    begins it in a way that, when the write lock is held by another connection *of the same
    process* (two Abuse stores of one test, a reader and a writer of one file), keeps
    answering SQLITE_BUSY until the busy timeout runs out even after the holder committed —
    and blocks the holder's next transaction meanwhile: 10 s stalls and "database is locked"
    (measured: 5 of 300 contended pairs with apsw 3.54; 0 of 400 with a plain
    ``BEGIN IMMEDIATE`` statement, which waits and then succeeds as soon as the lock is
    free). Across processes both forms behave.
    """
    if conn.in_transaction:
        with conn:
            yield conn
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    try:
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class WrongKey(Exception):
    """The file exists but does not open with this key (or is not a database)."""


class SchemaTooNew(Exception):
    """The file was written by a newer Postvern; refusing to guess its layout."""


def open_encrypted(
    path: Path,
    key: bytes,
    migrations: Sequence[Migration],
    *,
    create: bool = False,
) -> apsw.Connection:
    """Open (or create) ``path`` with ``key`` and bring its schema up to date.

    ``migrations[i]`` moves the schema from version i to i+1 (``PRAGMA user_version``); each
    runs in its own transaction, so a crash mid-upgrade leaves a consistent older version.
    """
    if len(key) != KEY_BYTES:
        raise ValueError("database key must be 32 bytes")
    flags = apsw.SQLITE_OPEN_READWRITE | (apsw.SQLITE_OPEN_CREATE if create else 0)
    if not create and not path.exists():
        raise FileNotFoundError(path)
    conn = apsw.Connection(str(path), flags=flags)
    try:
        conn.setbusytimeout(BUSY_TIMEOUT_MS)
        # Every transaction (write_transaction, or ``with conn:`` nested) takes the write
        # lock when it begins. A deferred one that reads first and then writes fails at once
        # with SQLITE_BUSY (no busy wait) if another connection — another worker process
        # (workers.py) — committed between its read and its write; an immediate one waits
        # its turn and reads fresh data.
        conn.transaction_mode = "IMMEDIATE"
        conn.execute("PRAGMA cipher='chacha20'")
        conn.execute(f"PRAGMA key='raw:{key.hex()}'")
        try:
            conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()
        except (apsw.NotADBError, apsw.CorruptError):
            raise WrongKey(f"{path.name}: wrong key or not a Postvern database") from None
        # WAL pages are encrypted like the main file. synchronous=FULL makes every commit
        # durable (fsync of the WAL) — "250 means fsynced". Temporary tables and sort
        # spills stay in memory so no plaintext temp file is ever written.
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.execute("PRAGMA foreign_keys=ON")
        _migrate(conn, migrations, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: apsw.Connection, migrations: Sequence[Migration], path: Path) -> None:
    version = int(conn.execute("PRAGMA user_version").fetchall()[0][0] or 0)
    if version > len(migrations):
        raise SchemaTooNew(f"{path.name}: schema version {version} is newer than this Postvern")
    for number in range(version, len(migrations)):
        with write_transaction(conn):
            # Read again under the write lock: another process opening the same file at the
            # same time (a second worker, workers.py) may have migrated it meanwhile.
            if int(conn.execute("PRAGMA user_version").fetchall()[0][0] or 0) > number:
                continue
            migrations[number](conn)
            conn.execute(f"PRAGMA user_version={number + 1}")
