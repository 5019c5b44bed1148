"""encdb.write_transaction: commit, rollback, nesting, and two connections of one process
that contend for the write lock (the stall apsw's ``with conn:`` showed, see its docstring)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import apsw
import pytest

from postvern.encdb import open_encrypted, write_transaction


def _schema(conn: apsw.Connection) -> None:
    conn.execute("CREATE TABLE counters(key TEXT PRIMARY KEY, count INTEGER NOT NULL)")


def _open(path: Path, key: bytes) -> apsw.Connection:
    return open_encrypted(path, key, [_schema], create=True)


def _count(conn: apsw.Connection) -> int:
    rows = conn.execute("SELECT count FROM counters WHERE key = 'k'").fetchall()
    return int(rows[0][0]) if rows else 0


def _hit(conn: apsw.Connection) -> None:
    with write_transaction(conn):
        conn.execute(
            "INSERT INTO counters VALUES ('k', 1) ON CONFLICT(key) DO UPDATE SET count = count + 1"
        )


def test_commits_rolls_back_and_nests_as_a_savepoint(tmp_path: Path) -> None:
    conn = _open(tmp_path / "a.sqlite", os.urandom(32))
    _hit(conn)
    assert _count(conn) == 1 and not conn.in_transaction
    with pytest.raises(RuntimeError), write_transaction(conn):
        _hit(conn)  # nested: a savepoint inside this transaction
        assert conn.in_transaction and _count(conn) == 2
        raise RuntimeError("undo")
    assert _count(conn) == 1 and not conn.in_transaction
    with write_transaction(conn):
        with pytest.raises(RuntimeError), write_transaction(conn):
            _hit(conn)
            raise RuntimeError("undo the inner one only")
        _hit(conn)
    assert _count(conn) == 2


def test_two_connections_of_one_process_take_turns(tmp_path: Path) -> None:
    """Each thread owns one connection to the same file; every transaction of both must
    commit. With apsw's ``with conn:`` about 1 pair in 60 failed with "database is locked"
    after the whole busy timeout, although the other had committed long before."""
    path, key = tmp_path / "shared.sqlite", os.urandom(32)
    pairs = 150
    one_pool, two_pool = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    try:
        one = one_pool.submit(_open, path, key).result()
        two = two_pool.submit(_open, path, key).result()
        for _ in range(pairs):
            jobs = [one_pool.submit(_hit, one), two_pool.submit(_hit, two)]
            for job in jobs:
                job.result()  # raises apsw.BusyError if a transaction gave up
        assert one_pool.submit(_count, one).result() == 2 * pairs
        one_pool.submit(one.close).result()
        two_pool.submit(two.close).result()
    finally:
        one_pool.shutdown()
        two_pool.shutdown()
