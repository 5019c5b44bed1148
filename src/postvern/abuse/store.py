"""The abuse database: bans and greylisting entries in an encrypted SQLite file.

Ban records name client addresses, which are personal data, so the file is encrypted like
every other Postvern database (``encdb``) under a key the caller derives from the server key.
Greylisting triplets are stored only as keyed hashes. One worker thread owns the connection;
the event loop awaits it and never touches SQLite itself.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import apsw

from postvern.abuse.bans import Ban
from postvern.abuse.greylist import Entry
from postvern.encdb import open_encrypted, write_transaction

FILE_NAME = "abuse.sqlite"


def _v1(conn: apsw.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE bans (
            network  TEXT PRIMARY KEY,  -- "192.0.2.1", "2001:db8::/64", "192.0.2.0/24"
            until    REAL NOT NULL,     -- seconds since the epoch
            reason   TEXT NOT NULL,
            offences INTEGER NOT NULL,
            created  REAL NOT NULL,
            updated  REAL NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE greylist (
            triplet    BLOB PRIMARY KEY,  -- HMAC of (network, sender, recipient)
            entry      BLOB NOT NULL,     -- greylist.Entry.pack()
            keep_until REAL NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX greylist_keep ON greylist(keep_until);
        """
    )


def _v2(conn: apsw.Connection) -> None:
    # Rate-limit counters shared by the worker processes of one server when there is no
    # Redis (workers.py): fixed windows, keyed by the same pseudonyms as in Redis.
    conn.execute(
        """
        CREATE TABLE counters (
            key     TEXT PRIMARY KEY,  -- the limits library's key: namespace/amount/.../who
            count   INTEGER NOT NULL,
            expires REAL NOT NULL      -- end of the window, seconds since the epoch
        ) WITHOUT ROWID;
        """
    )


def _v3(conn: apsw.Connection) -> None:
    # A counter that every change of the ban table moves, kept by triggers: with several
    # workers the file changes with every counter hit, and a worker reloads its bans only
    # when this moves. (Count and latest update together miss a removal that brings the
    # table back to a state seen before.)
    conn.execute(
        """
        CREATE TABLE ban_epoch (n INTEGER NOT NULL);
        INSERT INTO ban_epoch VALUES (0);
        CREATE TRIGGER bans_inserted AFTER INSERT ON bans
            BEGIN UPDATE ban_epoch SET n = n + 1; END;
        CREATE TRIGGER bans_updated AFTER UPDATE ON bans
            BEGIN UPDATE ban_epoch SET n = n + 1; END;
        CREATE TRIGGER bans_deleted AFTER DELETE ON bans
            BEGIN UPDATE ban_epoch SET n = n + 1; END;
        """
    )


MIGRATIONS = [_v1, _v2, _v3]


class AbuseStore:
    """Async access to ``abuse.sqlite`` through one worker thread."""

    def __init__(self, path: Path, key: bytes) -> None:
        self.path = path
        self._key = key
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="abuse-db")
        self._conn: apsw.Connection | None = None

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        conn = open_encrypted(self.path, self._key, MIGRATIONS, create=True)
        # WAL with synchronous=NORMAL: a power cut may lose the last few greylisting or ban
        # writes, never corrupt the file. Losing a ban costs an attacker's guesses a restart;
        # an fsync per greylisted RCPT would cost every MX more than that.
        conn.execute("PRAGMA synchronous=NORMAL")
        self._conn = conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self._close)
        self._executor.shutdown(wait=True)

    def _close(self) -> None:
        assert self._conn is not None
        self._conn.close()
        self._conn = None

    @property
    def conn(self) -> apsw.Connection:
        if self._conn is None:
            raise RuntimeError("abuse store is not open")
        return self._conn

    # -- bans ----------------------------------------------------------------------------

    async def load_bans(self) -> list[Ban]:
        result: list[Ban] = await self._run(self._load_bans)
        return result

    def _load_bans(self) -> list[Ban]:
        rows = self.conn.execute(
            "SELECT network, until, reason, offences, created, updated FROM bans"
        )
        return [Ban(*row) for row in rows]

    async def save_ban(self, ban: Ban) -> None:
        await self._run(self._save_ban, ban)

    def _save_ban(self, ban: Ban) -> None:
        with write_transaction(self.conn):
            self.conn.execute(
                "INSERT INTO bans(network, until, reason, offences, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(network) DO UPDATE SET until=excluded.until,"
                " reason=excluded.reason, offences=excluded.offences,"
                " created=excluded.created, updated=excluded.updated"
                " WHERE excluded.updated >= bans.updated",
                (ban.network, ban.until, ban.reason, ban.offences, ban.created, ban.updated),
            )

    async def delete_bans(self, networks: list[str]) -> None:
        if networks:
            await self._run(self._delete_bans, networks)

    def _delete_bans(self, networks: list[str]) -> None:
        with write_transaction(self.conn):
            self.conn.executemany("DELETE FROM bans WHERE network = ?", [(n,) for n in networks])

    async def ban_epoch(self) -> int:
        """A number that every change of the ban table, by any process, moves on: with
        several workers the file changes with every counter hit, and the bans need
        reloading only when this does."""
        epoch: int = await self._run(self._ban_epoch)
        return epoch

    def _ban_epoch(self) -> int:
        return cast(int, self.conn.execute("SELECT n FROM ban_epoch").fetchall()[0][0])

    async def data_version(self) -> int:
        """Changes when another connection (``postvern ban`` in another process) commits."""
        version: int = await self._run(self._data_version)
        return version

    def _data_version(self) -> int:
        value = self.conn.execute("PRAGMA data_version").fetchall()[0][0]
        return cast(int, value)

    # -- greylisting ---------------------------------------------------------------------

    async def grey_get(self, triplet: bytes) -> Entry | None:
        entry: Entry | None = await self._run(self._grey_get, triplet)
        return entry

    def _grey_get(self, triplet: bytes) -> Entry | None:
        rows = self.conn.execute(
            "SELECT entry FROM greylist WHERE triplet = ?", (triplet,)
        ).fetchall()
        return Entry.unpack(cast(bytes, rows[0][0])) if rows else None

    async def grey_put(self, triplet: bytes, entry: Entry, keep_until: float) -> None:
        await self._run(self._grey_put, triplet, entry, keep_until)

    def _grey_put(self, triplet: bytes, entry: Entry, keep_until: float) -> None:
        with write_transaction(self.conn):
            self.conn.execute(
                "INSERT OR REPLACE INTO greylist(triplet, entry, keep_until) VALUES (?, ?, ?)",
                (triplet, entry.pack(), keep_until),
            )

    # -- rate-limit counters (several workers, no Redis) ----------------------------------

    async def counter_incr(
        self, hits: list[tuple[str, float, int]], now: float
    ) -> list[tuple[int, float]]:
        """Add each ``(key, seconds, amount)``: ``amount`` to the window of ``key`` (a new
        one of ``seconds`` if it has ended); the count after and the window's end. One
        transaction for them all, so every worker sees every hit and a message's several
        counters cost one commit."""
        counts: list[tuple[int, float]] = await self._run(self._counter_incr, hits, now)
        return counts

    def _counter_incr(
        self, hits: list[tuple[str, float, int]], now: float
    ) -> list[tuple[int, float]]:
        counts = []
        with write_transaction(self.conn):
            for key, seconds, amount in hits:
                rows = self.conn.execute(
                    "INSERT INTO counters(key, count, expires) VALUES (?, ?, ?)"
                    " ON CONFLICT(key) DO UPDATE SET"
                    " count = CASE WHEN expires > ? THEN count + excluded.count"
                    " ELSE excluded.count END,"
                    " expires = CASE WHEN expires > ? THEN expires ELSE excluded.expires END"
                    " RETURNING count, expires",
                    (key, amount, now + seconds, now, now),
                ).fetchall()
                counts.append((cast(int, rows[0][0]), cast(float, rows[0][1])))
        return counts

    async def counter_release(self, returns: list[tuple[str, float, int]]) -> None:
        """Take ``amount`` back off each ``(key, window end, amount)``: hits a worker
        reserved (ratelimit.py's leases) and did not spend. A window that has ended or been
        replaced since is left alone."""
        await self._run(self._counter_release, returns)

    def _counter_release(self, returns: list[tuple[str, float, int]]) -> None:
        with write_transaction(self.conn):
            self.conn.executemany(
                "UPDATE counters SET count = max(0, count - ?) WHERE key = ? AND expires = ?",
                [(amount, key, expires) for key, expires, amount in returns],
            )

    async def counter_get(self, key: str, now: float) -> int:
        count: int = await self._run(self._counter_get, key, now)
        return count

    def _counter_get(self, key: str, now: float) -> int:
        rows = self.conn.execute(
            "SELECT count FROM counters WHERE key = ? AND expires > ?", (key, now)
        ).fetchall()
        return cast(int, rows[0][0]) if rows else 0

    async def counter_clear(self, key: str) -> None:
        await self._run(self._counter_clear, key)

    def _counter_clear(self, key: str) -> None:
        with write_transaction(self.conn):
            self.conn.execute("DELETE FROM counters WHERE key = ?", (key,))

    async def purge_greylist(self, now: float) -> int:
        count: int = await self._run(self._purge_greylist, now)
        return count

    def _purge_greylist(self, now: float) -> int:
        with write_transaction(self.conn):
            self.conn.execute("DELETE FROM greylist WHERE keep_until < ?", (now,))
            purged = int(self.conn.changes())
            self.conn.execute("DELETE FROM counters WHERE expires <= ?", (now,))
        return purged
