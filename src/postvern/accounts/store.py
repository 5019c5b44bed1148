"""SQL for the accounts tables (schema.py), run on the directory database's connection.

The tables live in the directory database so that a user's second factors, tokens and
settings go with the user (ON DELETE CASCADE) and share its encryption; this module uses the
directory's own connection, lock and transactions for them rather than a second connection
that would race the first. Methods are synchronous: callers run them in a worker thread.
The SQL is written to run on both directory databases, SQLite and PostgreSQL (directory/pg.py):
``?`` placeholders, ``ON CONFLICT`` rather than ``INSERT OR …``, integer flags as ``=1``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from postvern.directory.db import Connection, Directory


class AccountStore:
    def __init__(self, directory: Directory) -> None:
        self.directory = directory

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        with self.directory._tx() as c:
            yield c

    def rows(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        return self.directory._rows(sql, args)

    def execute(self, sql: str, args: tuple[object, ...] = ()) -> int:
        """Run one statement in its own transaction; returns how many rows it changed."""
        with self.tx() as c:
            c.execute(sql, args)
            return int(c.changes())


def now() -> int:
    return int(time.time())
