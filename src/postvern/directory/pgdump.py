"""Backing up and restoring a directory that lives in PostgreSQL (issues #18 and #20).

The snapshot of a server whose directory is in PostgreSQL holds a *logical export* of the
directory's tables, taken through psycopg over the directory's own verified-TLS connection
settings (directory/pg.py), in one ``REPEATABLE READ READ ONLY`` transaction: every table is
read from the same database snapshot, so the export is one consistent state however many
nodes write meanwhile. Why not ``pg_dump``: it would need a client of the server's major
version (or newer) on every mail node, the password handed to another process (a passfile),
and a format we cannot check without PostgreSQL; the export needs none of that, and its
every row can be checked by ``verify`` with the server key alone.

**The export** (plaintext, only ever in memory) is JSON lines::

    {"format": "postvern-directory-dump", "version": 1, "schema": 8}
    {"table": "domains", "columns": [...], "bytes": [indexes of BYTEA columns], "rows": N}
    [value, ...]                        N rows; BYTEA values as base64 text
    ... every table, parents before children ...
    {"end": true, "tables": 15}

Secret columns stay as the database holds them: key slots' wrapped keys and DKIM private
keys sealed (pg.py), TOTP secrets sealed, codes and tokens as keyed hashes.

**Sealed as a file** under a subkey of the server key, as ``directory.sqlite`` is encrypted
under one: ChaCha20-Poly1305 (RFC 8439) in 1 MiB chunks, each bound to the file's random id,
its index and whether it is the last (so chunks cannot be reordered, dropped or the file cut
short unseen). That sealed file is what a snapshot stores — and the snapshot encrypts it
once more like every object — and what a restored data directory holds until it is loaded.

**Loading** creates the tables at the export's schema version (the migrations of pg.py, up
to that number), copies the rows in (``COPY … FROM STDIN``; identity columns keep their
values, their sequences are moved past them), all in one transaction under the directory's
advisory lock: the database is either the whole export or as it was. It refuses a database
that holds a directory with any domain or user unless told to replace it. The next open of
the directory migrates it to the current schema as usual.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import IsolationLevel, sql

from postvern.crypto.serverkey import ServerKey
from postvern.directory.copy import TABLES as ROW_TABLES
from postvern.directory.db import _dkim_context, _slot_context
from postvern.directory.pg import (
    ADVISORY_LOCK,
    LATEST,
    MIGRATIONS,
    SCHEMA_TABLE,
    ColumnSeal,
    PostgresTarget,
    connection_params,
)

FORMAT = "postvern-directory-dump"
FORMAT_VERSION = 1
# Every table of the directory, parents before children (foreign keys): those a copy moves
# row by row, and the DKIM keys. postvern_schema is not exported: its one number travels in
# the header. tests/test_backup_pg.py checks that this is every table a fresh directory has,
# so a migration that adds one cannot be left out of backups.
TABLES = (*ROW_TABLES, "dkim_keys")
SEAL_MAGIC = b"PVPGDUMP1\n"
CHUNK_BYTES = 1 << 20  # sealed 1 MiB at a time: bounded memory for the file's reader
NONCE_BYTES = 12
FILE_ID_BYTES = 16
TAG_BYTES = 16
# Stamps are 56-bit, as the snapshot's stat fingerprints are.
STAMP_BYTES = 7
# A verify's scratch schema: a name no directory uses, random so two verifies never meet.
SCRATCH_PREFIX = "postvern_verify_"


class DumpError(Exception):
    """An export that cannot be made, opened, parsed or loaded (the message says which)."""


class DirectoryNotEmpty(DumpError):
    """The database already holds a directory with domains or users."""


@dataclass
class Table:
    name: str
    columns: list[str]
    binary: list[int]  # indexes of BYTEA columns
    rows: list[list[Any]]


@dataclass
class Dump:
    schema: int
    tables: list[Table]

    def table(self, name: str) -> Table | None:
        return next((t for t in self.tables if t.name == name), None)

    def counts(self) -> dict[str, int]:
        return {t.name: len(t.rows) for t in self.tables}


def dump_key(server_key: ServerKey) -> bytes:
    return server_key.derive("directory dump")


def stamp_key(server_key: ServerKey) -> bytes:
    return server_key.derive("directory dump stamp")


def fingerprint(key: bytes, plain: bytes) -> int:
    """A keyed digest of an export: equal exports give equal stamps (an unchanged directory
    is not uploaded again), and a stamp says nothing about the content to a reader."""
    digest = hmac.new(key, plain, hashlib.sha256).digest()
    return int.from_bytes(digest[:STAMP_BYTES], "big")


# -- export ------------------------------------------------------------------------------


def _present(conn: psycopg.Connection[Any]) -> set[str]:
    rows = conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
    ).fetchall()
    return {str(r[0]) for r in rows}


def _columns(conn: psycopg.Connection[Any], table: str) -> tuple[list[str], list[int]]:
    rows = conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position",
        (table,),
    ).fetchall()
    names = [str(r[0]) for r in rows]
    return names, [i for i, r in enumerate(rows) if r[1] == "bytea"]


def _json_value(value: object) -> object:
    if isinstance(value, (bytes, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    return value


def export(target: PostgresTarget) -> tuple[bytes, int]:
    """The directory's export (see the module doc) and its schema version, read on a
    connection of its own (the server's directory calls go on meanwhile)."""
    params = connection_params(target)
    with psycopg.connect(**params) as conn:
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            return _export(conn)


def _export(conn: psycopg.Connection[Any]) -> tuple[bytes, int]:
    rows = conn.execute(f"SELECT version FROM {SCHEMA_TABLE}").fetchall()
    if not rows:
        raise DumpError("the directory database has no schema version (not a directory?)")
    schema = int(rows[0][0])
    present = _present(conn)
    missing = [t for t in TABLES if t not in present]
    if missing:
        raise DumpError(f"the directory database lacks table(s) {', '.join(missing)}")
    out: list[bytes] = [_line({"format": FORMAT, "version": FORMAT_VERSION, "schema": schema})]
    for table in TABLES:
        columns, binary = _columns(conn, table)
        names = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
        # Every column in the ORDER BY: the same content gives the same bytes, so an
        # unchanged directory has an unchanged stamp.
        order = sql.SQL(", ").join(sql.Literal(i + 1) for i in range(len(columns)))
        query = sql.SQL("SELECT {} FROM {} ORDER BY {}").format(names, sql.Identifier(table), order)
        # Rows become Python objects one at a time (the result itself stays in libpq's
        # compact buffer): the memory of a big table is its JSON, not its tuples.
        cursor = conn.execute(query)
        count = cursor.rowcount
        out.append(_line({"table": table, "columns": columns, "bytes": binary, "rows": count}))
        out.extend(_line([_json_value(v) for v in row]) for row in cursor)
    out.append(_line({"end": True, "tables": len(TABLES)}))
    return b"".join(out), schema


def _line(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


# -- reading an export -------------------------------------------------------------------


def parse(plain: bytes) -> Dump:
    """The export's tables, every line checked for shape; :class:`DumpError` if malformed."""
    lines = iter(plain.split(b"\n"))
    try:
        head = json.loads(next(lines))
        if head.get("format") != FORMAT or head.get("version") != FORMAT_VERSION:
            raise DumpError("not a directory export of a version this Postvern reads")
        schema = int(head["schema"])
        if schema > LATEST:
            raise DumpError(f"the export is of schema {schema}, newer than this Postvern")
        tables: list[Table] = []
        while True:
            meta = json.loads(next(lines))
            if meta.get("end"):
                if meta.get("tables") != len(tables):
                    raise DumpError("the export ends early")
                break
            tables.append(_table(meta, lines))
    except (StopIteration, ValueError, KeyError, TypeError, AttributeError):
        raise DumpError("the export is cut short or malformed") from None
    if [t.name for t in tables] != list(TABLES):
        raise DumpError("the export does not hold the directory's tables in order")
    return Dump(schema, tables)


def _table(meta: dict[str, Any], lines: Iterator[bytes]) -> Table:
    columns = [str(c) for c in meta["columns"]]
    binary = [int(i) for i in meta["bytes"]]
    rows: list[list[Any]] = []
    for _ in range(int(meta["rows"])):
        row = json.loads(next(lines))
        if not isinstance(row, list) or len(row) != len(columns):
            raise DumpError(f"{meta['table']}: a row does not match the columns")
        for i in binary:
            if row[i] is not None:
                row[i] = base64.b64decode(row[i], validate=True)
        rows.append(row)
    return Table(str(meta["table"]), columns, binary, rows)


def check(dump: Dump, directory_key: bytes) -> list[str]:
    """What can be checked without a database: every sealed key slot and DKIM key opens
    with the server key in its own row, and every row points at an existing user."""
    problems: list[str] = []
    seal = ColumnSeal(directory_key)
    users = {row[0] for row in _rows(dump, "users", "id")}
    for user_id, kind, salt, ciphertext in _rows(dump, "keyslots", "user_id", "kind", "salt",
                                                 "ciphertext"):  # fmt: skip
        if user_id not in users:
            problems.append("a key slot of a user who does not exist")
            continue
        try:
            seal.open(ciphertext, _slot_context(user_id, kind, salt))
        except Exception:  # InvalidTag: altered, or sealed under another key
            problems.append(f"a {kind} key slot does not open with the server key")
    for domain, selector, private in _rows(dump, "dkim_keys", "domain", "selector",
                                           "private_key"):  # fmt: skip
        try:
            seal.open(private, _dkim_context(domain, selector))
        except Exception:
            problems.append(f"the DKIM key {selector} of {domain} does not open")
    return problems


def _rows(dump: Dump, table: str, *columns: str) -> Iterator[tuple[Any, ...]]:
    found = dump.table(table)
    if found is None:
        return
    where = [found.columns.index(c) for c in columns]
    for row in found.rows:
        yield tuple(row[i] for i in where)


def user_ids(dump: Dump) -> set[str]:
    return {str(row[0]) for row in _rows(dump, "users", "id")}


# -- the sealed file ---------------------------------------------------------------------


def _nonce_ad(file_id: bytes, index: int, last: bool) -> bytes:
    return SEAL_MAGIC + file_id + struct.pack(">Q?", index, last)


def write_sealed(path: Path, key: bytes, plain: bytes) -> None:
    """``plain`` sealed into a new file (0600): the export never reaches a disk readable."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    aead = ChaCha20Poly1305(key)
    file_id = secrets.token_bytes(FILE_ID_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(SEAL_MAGIC + file_id)
        chunks = range(0, max(len(plain), 1), CHUNK_BYTES)
        for index, start in enumerate(chunks):
            last = start + CHUNK_BYTES >= len(plain)
            nonce = secrets.token_bytes(NONCE_BYTES)
            sealed = aead.encrypt(
                nonce, plain[start : start + CHUNK_BYTES], _nonce_ad(file_id, index, last)
            )
            f.write(struct.pack(">I", len(sealed)) + nonce + sealed)


def read_sealed(path: Path, key: bytes) -> bytes:
    """The export in a sealed file; :class:`DumpError` if any chunk is altered or missing."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    aead = ChaCha20Poly1305(key)
    data = path.read_bytes()
    if not data.startswith(SEAL_MAGIC):
        raise DumpError(f"{path.name}: not a sealed directory export")
    at = len(SEAL_MAGIC)
    file_id = data[at : at + FILE_ID_BYTES]
    at += FILE_ID_BYTES
    out: list[bytes] = []
    index = 0
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        nonce = data[at + 4 : at + 4 + NONCE_BYTES]
        sealed = data[at + 4 + NONCE_BYTES : at + 4 + NONCE_BYTES + length]
        at += 4 + NONCE_BYTES + length
        last = at >= len(data)
        try:
            out.append(aead.decrypt(nonce, sealed, _nonce_ad(file_id, index, last)))
        except InvalidTag:
            raise DumpError(f"{path.name}: does not open with the server key (altered?)") from None
        index += 1
    if not index:
        raise DumpError(f"{path.name}: empty")
    return b"".join(out)


# -- loading -----------------------------------------------------------------------------


def _holds_directory(conn: psycopg.Connection[Any]) -> bool:
    present = _present(conn)
    for table in ("domains", "users"):
        if (
            table in present
            and conn.execute(
                sql.SQL("SELECT 1 FROM {} LIMIT 1").format(sql.Identifier(table))
            ).fetchall()
        ):
            return True
    return False


def _create(conn: psycopg.Connection[Any], schema: int) -> None:
    """The tables as migrations up to ``schema`` leave them."""
    for version in sorted(MIGRATIONS):
        if version <= schema:
            conn.execute(MIGRATIONS[version])
    conn.execute(f"CREATE TABLE {SCHEMA_TABLE}(version INTEGER NOT NULL)")
    conn.execute(f"INSERT INTO {SCHEMA_TABLE}(version) VALUES(%s)", (schema,))


def _fill(conn: psycopg.Connection[Any], dump: Dump) -> None:
    for table in dump.tables:
        names = sql.SQL(", ").join(sql.Identifier(c) for c in table.columns)
        # COPY writes identity columns' values as given (users.rowid keeps the creation order).
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(sql.Identifier(table.name), names)
        with conn.cursor().copy(statement) as copy:
            for row in table.rows:
                copy.write_row(row)
    identities = conn.execute(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND is_identity = 'YES'"
    ).fetchall()
    for table_name, column in identities:
        conn.execute(
            sql.SQL(
                "SELECT setval(pg_get_serial_sequence({}, {}),"
                " (SELECT COALESCE(max({}), 0) + 1 FROM {}), false)"
            ).format(
                sql.Literal(table_name),
                sql.Literal(column),
                sql.Identifier(column),
                sql.Identifier(table_name),
            )
        )


def load(target: PostgresTarget, dump: Dump, *, replace: bool = False) -> dict[str, int]:
    """Put ``dump`` into the database of ``target``; rows per table.

    A database holding a directory with a domain or a user is refused
    (:class:`DirectoryNotEmpty`) unless ``replace``: then the directory's tables are dropped
    and made anew in the same transaction. Empty directory tables (a server started on the
    empty database) are replaced without asking.
    """
    params = connection_params(target)
    with psycopg.connect(**params) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK,))
        if _holds_directory(conn) and not replace:
            raise DirectoryNotEmpty(
                f"the PostgreSQL database at {target.describe()} already holds a directory;"
                " give --replace-directory to overwrite it"
            )
        present = _present(conn)
        for table in (*reversed(TABLES), SCHEMA_TABLE):
            if table in present:
                conn.execute(sql.SQL("DROP TABLE {} CASCADE").format(sql.Identifier(table)))
        _create(conn, dump.schema)
        _fill(conn, dump)
    return dump.counts()


class NoScratch(Exception):
    """The role may not create a scratch schema: the export was checked without loading it."""


def trial_load(target: PostgresTarget, dump: Dump) -> dict[str, int]:
    """Load ``dump`` into a scratch schema of the directory's own database inside one
    transaction that is always rolled back — so nothing of it is ever committed, whatever
    happens — and count the rows it holds there: the export loads (every constraint, key
    and reference holds) without touching the directory. :class:`NoScratch` when the role
    may not create a schema."""
    params = connection_params(target)
    scratch = SCRATCH_PREFIX + secrets.token_hex(8)
    with psycopg.connect(**params) as conn:
        try:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(scratch)))
        except psycopg.errors.InsufficientPrivilege as e:
            conn.rollback()
            raise NoScratch(str(e).splitlines()[0]) from None
        try:
            conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(scratch)))
            _create(conn, dump.schema)
            _fill(conn, dump)
            counts = {}
            for table in TABLES:
                query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
                counts[table] = int(conn.execute(query).fetchall()[0][0])
        finally:
            conn.rollback()
    return counts
