"""A small bounded pool of directory connections (docs/cluster.md, "Directory connections").

With one connection per process, the directory's lock made a process's directory calls run
one at a time, each waiting out the round trips of the others; bench/directory_pg.py measured
what that costs under concurrent callers (the figures are in docs/cluster.md). The pool keeps
up to ``size`` :class:`~postvern.directory.pg.PGConnection` objects — each with its TLS
settings, its reconnect-once rule and its transaction stack — and gives the directory the same
face as one of them, so :class:`~postvern.directory.db.Directory` needs no lock of its own:

* a statement outside a transaction borrows an idle connection for that statement alone
  (its rows are read before the connection goes back);
* ``with pool:`` borrows one for the calling thread until the outermost block ends; every
  statement and nested block of that thread inside it uses the same connection, and the
  outermost block still takes the directory's advisory lock first (pg.py), so writers on
  every connection of every node stay serialised as before;
* ``changes()`` is the calling thread's last statement's.

Connections are opened when first needed (a process that never has two callers at once keeps
one), and a caller waits when all ``size`` are busy. Why not psycopg_pool: it would hand out
raw psycopg connections, and the reconnect-once rule and the nested transactions with the
advisory lock would have to be built again on top of it; this reuses the tested ones, and
needs no new dependency.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from postvern.directory.pg import MAX_POOL, PGConnection


class Rows:
    """Rows already read, so the connection they came from can serve someone else."""

    __slots__ = ("_rows",)

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self._rows = rows

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self._rows


class PGPool:
    def __init__(self, first: PGConnection, make: Callable[[], PGConnection], size: int) -> None:
        if not 1 <= size <= MAX_POOL:
            raise ValueError(f"a pool of 1 to {MAX_POOL} connections, not {size}")
        self._make = make
        self._size = size
        self._idle = [first]
        self._made = 1
        self._ready = threading.Condition()
        self._local = threading.local()  # .held (a connection in a transaction), .depth, .changes

    def _borrow(self) -> PGConnection:
        with self._ready:
            while not self._idle and self._made >= self._size:
                self._ready.wait()
            if self._idle:
                return self._idle.pop()
            self._made += 1
        try:
            return self._make()
        except BaseException:
            with self._ready:
                self._made -= 1
                self._ready.notify()
            raise

    def _give_back(self, conn: PGConnection) -> None:
        with self._ready:
            self._idle.append(conn)
            self._ready.notify()

    def execute(self, sql: str, args: Sequence[object] = ()) -> Rows:
        held: PGConnection | None = getattr(self._local, "held", None)
        conn = held or self._borrow()
        try:
            rows = Rows(conn.execute(sql, args).fetchall())
            self._local.changes = conn.changes()
        finally:
            if held is None:
                self._give_back(conn)
        return rows

    def changes(self) -> int:
        return int(getattr(self._local, "changes", 0))

    def __enter__(self) -> PGPool:
        held: PGConnection | None = getattr(self._local, "held", None)
        outermost = held is None
        conn = held or self._borrow()
        try:
            conn.__enter__()  # the outermost takes the advisory lock (pg.py)
        except BaseException:
            if outermost:
                self._give_back(conn)
            raise
        if outermost:
            self._local.held, self._local.depth = conn, 0
        self._local.depth += 1
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn: PGConnection = self._local.held
        self._local.depth -= 1
        try:
            conn.__exit__(kind, value, tb)
        finally:
            if self._local.depth == 0:
                self._local.held = None
                self._give_back(conn)

    def close(self) -> None:
        with self._ready:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    @property
    def opened(self) -> int:
        """Connections made so far (at most ``size``)."""
        return self._made
