"""Copy a directory into another: the way from one machine's SQLite file to PostgreSQL.

Every row of every directory table is copied in one transaction of the target, so the
target is either the whole copy or untouched. Nothing is re-derived: wrapped key slots,
sealed TOTP secrets and keyed hashes move as they are (both directories take their keys from
the same server key), so every password, app password, passkey slot, recovery key, second
factor and API token goes on working. The two secrets PostgreSQL seals because its database is
not encrypted as a whole — DKIM private keys and the wrapped keys of key slots — are sealed for
the target on the way (directory/pg.py).
"""

from __future__ import annotations

from typing import Any

from postvern.directory.db import Connection, Directory, DirectoryError

# Parents before children (foreign keys). users.rowid of PostgreSQL is not copied: users are
# inserted in the source's creation order, which is what it records.
TABLES = (
    "domains",
    "users",
    "keyslots",
    "aliases",
    "e2e_keys",
    "totp",
    "recovery_codes",
    "passkeys",
    "api_tokens",
    "account_settings",
    "sender_lists",
    "login_history",
    "invitations",
    "forwards",
)
# Identity columns whose counters must move past the copied ids (PostgreSQL).
IDENTITY_TABLES = ("keyslots", "recovery_codes", "passkeys", "api_tokens", "login_history")
_ORDER = {"users": "created, rowid", "domains": "created, name"}


def _columns(source: Directory, table: str) -> list[str]:
    rows = source._rows(
        "SELECT name FROM pragma_table_info(?) ORDER BY cid",
        (table,),
    )
    return [str(r[0]) for r in rows]


def copy_directory(source: Directory, target: Directory) -> dict[str, int]:
    """Copy the SQLite directory ``source`` into the empty ``target``; rows per table."""
    if target.domains() or target.users():
        raise DirectoryError("the target directory is not empty; copy only into a new one")
    counts: dict[str, int] = {}
    with target._tx() as c:
        for table in TABLES:
            columns = _columns(source, table)
            names = ", ".join(columns)
            order = _ORDER.get(table, "1")
            rows = source._rows(f"SELECT {names} FROM {table} ORDER BY {order}")
            marks = ", ".join("?" * len(columns))
            for row in rows:
                if table == "keyslots":
                    row = _keyslot_row(target, columns, row)
                c.execute(f"INSERT INTO {table}({names}) VALUES({marks})", row)
            counts[table] = len(rows)
        counts["dkim_keys"] = _copy_dkim(source, target, c)
        if target.backend == "postgresql":  # identity counters past the copied ids
            for table in IDENTITY_TABLES:
                c.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                    f" (SELECT COALESCE(max(id), 0) + 1 FROM {table}), false)"
                )
    return counts


def _keyslot_row(target: Directory, columns: list[str], row: tuple[Any, ...]) -> tuple[Any, ...]:
    """The row with its wrapped key sealed as the target keeps it (PostgreSQL seals it)."""
    values = dict(zip(columns, row, strict=True))
    values["ciphertext"] = target._seal_slot(
        str(values["user_id"]),
        str(values["kind"]),
        bytes(values["salt"]),
        bytes(values["ciphertext"]),
    )
    return tuple(values[c] for c in columns)


def _copy_dkim(source: Directory, target: Directory, c: Connection) -> int:
    copied = 0
    for domain in source.domains():
        for key in source.dkim_keys(domain):
            target._insert_dkim(c, key)
            copied += 1
    return copied
