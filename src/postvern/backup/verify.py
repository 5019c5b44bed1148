"""Verify: download a snapshot, check every hash and signature, restore it, check the result.

What is checked without any user's secret:

* every header's Ed25519 signature; the body's hash (signed); every object's ciphertext hash
  (listed in the body), its ChaCha20-Poly1305 tag, and every piece's plaintext hash;
* the restored directory, queue and abuse databases in full with the server key (SQLite's
  ``integrity_check``, and the directory's schema version against the manifest's);
* a directory in PostgreSQL (its sealed export, directory/pgdump.py): the export opens with
  the server key and parses, its schema version is the manifest's, every sealed key slot and
  DKIM key opens in its own row, and — when the role may create a schema — it is loaded into
  a scratch schema of the directory's database in a transaction that is rolled back, so every
  constraint and reference is checked by PostgreSQL itself and the rows counted there;
* every user in the directory has a mailbox file, and every mailbox file is structurally
  a SQLite3 Multiple Ciphers ChaCha20 file: the plaintext part of its header names a page size
  and the per-page reserve of the cipher (nonce + Poly1305 tag), and its length is a whole
  number of pages.

What cannot be checked: the pages' own authentication. sqlite3mc derives each page's Poly1305
key from the database key, which only the user's secrets unwrap — by design, the server
cannot tell a mailbox's page from random bytes. The object-level hashes and tags above are
what guarantee those bytes are the ones that were backed up.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import apsw

from postvern.backup import keys
from postvern.backup.catalog import Catalog
from postvern.backup.manifest import ManifestError, Opening
from postvern.backup.restore import materialise
from postvern.backup.snapshot import DIRECTORY_EXPORT, MAILBOX_DIR, SERVER_DATABASES, STAGING
from postvern.backup.targets import TargetError, Targets
from postvern.crypto.serverkey import ServerKey

if TYPE_CHECKING:
    from postvern.directory.pg import PostgresTarget

log = logging.getLogger(__name__)

# The part of a SQLite header that sqlite3mc leaves in clear (bytes 16..23): the page size,
# the file format versions (2 = WAL) and, at byte 20, the bytes reserved per page — 32 for
# the ChaCha20 cipher (a 16-byte nonce and a 16-byte Poly1305 tag).
HEADER_CLEAR = slice(16, 24)
CHACHA20_RESERVED = 32
PAYLOAD_FRACTIONS = b"\x40\x20\x20"  # fixed by the SQLite file format (§1.3)


@dataclass
class VerifyReport:
    snapshot: str | None
    problems: list[str] = field(default_factory=list)
    objects: int = 0
    files: int = 0
    users: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # how the directory was checked

    @property
    def ok(self) -> bool:
        return not self.problems


def check_mailbox_file(path: Path) -> str | None:
    """A problem with the file's structure, or None."""
    data = path.read_bytes()[:100]
    size = path.stat().st_size
    if len(data) < 24:
        return "too short to be a database"
    clear = data[HEADER_CLEAR]
    page = int.from_bytes(clear[0:2], "big")
    page = 65536 if page == 1 else page
    if page < 512 or page & (page - 1):
        return "bad page size in the header"
    if clear[4] != CHACHA20_RESERVED or clear[5:8] != PAYLOAD_FRACTIONS:
        return "not a ChaCha20 SQLite3 Multiple Ciphers file"
    if size % page:
        return "length is not a whole number of pages (torn)"
    return None


def _integrity(path: Path, key: bytes) -> tuple[str | None, int, apsw.Connection | None]:
    try:
        conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READWRITE)
        conn.execute("PRAGMA cipher='chacha20'")
        conn.execute(f"PRAGMA key='raw:{key.hex()}'")
        result = conn.execute("PRAGMA integrity_check").fetchall()
        version = conn.execute("PRAGMA user_version").fetchall()[0][0]
        assert isinstance(version, int)
    except apsw.Error as e:
        return f"does not open with the server key ({type(e).__name__})", 0, None
    if result != [("ok",)]:
        conn.close()
        return "integrity_check failed", version, None
    return None, version, conn


def check_directory_export(
    path: Path,
    server_key: ServerKey,
    schema: dict[str, int],
    directory: PostgresTarget | None,
    notes: list[str],
) -> tuple[list[str], set[str]]:
    """A PostgreSQL directory's export in a restored snapshot (see the module doc);
    (problems, the users it holds). ``notes`` says how far it was checked."""
    from postvern.directory import pgdump

    try:
        dump = pgdump.parse(pgdump.read_sealed(path, pgdump.dump_key(server_key)))
    except pgdump.DumpError as e:
        return [f"{DIRECTORY_EXPORT}: {e}"], set()
    problems = [f"{DIRECTORY_EXPORT}: {p}" for p in pgdump.check(dump, server_key.derive(
        "directory database"))]  # fmt: skip
    if dump.schema != schema.get("directory"):
        problems.append(f"{DIRECTORY_EXPORT}: schema {dump.schema}, manifest says {schema}")
    if directory is None:
        notes.append("directory export checked with the server key (no PostgreSQL to load it)")
        return problems, pgdump.user_ids(dump)
    try:
        counts = pgdump.trial_load(directory, dump)
    except pgdump.NoScratch as e:
        notes.append(f"directory export checked with the server key; no scratch schema ({e})")
    except pgdump.psycopg.Error as e:
        problems.append(f"{DIRECTORY_EXPORT}: does not load into PostgreSQL ({e})")
    else:
        if counts != dump.counts():
            problems.append(f"{DIRECTORY_EXPORT}: rows loaded {counts} differ from the export")
        notes.append(
            f"directory export loaded into a scratch schema: {sum(counts.values())} row(s)"
        )
    return problems, pgdump.user_ids(dump)


def check_restored(
    root: Path,
    server_key: ServerKey,
    schema: dict[str, int],
    directory: PostgresTarget | None = None,
    notes: list[str] | None = None,
) -> tuple[list[str], int]:
    """Structural checks of a restored data directory; (problems, number of users).
    ``directory``: the PostgreSQL directory to load an export into, on trial."""
    problems: list[str] = []
    users: set[str] = set()
    exported = root / DIRECTORY_EXPORT
    if exported.exists():
        problems, users = check_directory_export(
            exported, server_key, schema, directory, [] if notes is None else notes
        )
    for rel, database_key in SERVER_DATABASES.items():
        path = root / rel
        if not path.exists():
            if rel == "directory.sqlite" and not exported.exists():
                problems.append("the directory database is missing")
            continue
        problem, version, conn = _integrity(path, database_key(server_key))
        if problem is not None:
            problems.append(f"{rel}: {problem}")
            continue
        assert conn is not None
        try:
            if rel == "directory.sqlite" and not exported.exists():
                if version != schema.get("directory"):
                    problems.append(f"{rel}: schema {version}, manifest says {schema}")
                users = {row[0] for row in conn.execute("SELECT id FROM users")}
        finally:
            conn.close()
    boxes = root / MAILBOX_DIR
    files = {p.name[: -len(".sqlite")] for p in boxes.glob("*.sqlite")} if boxes.is_dir() else set()
    for uid in sorted(users - files):
        problems.append(f"a user of the directory has no mailbox file ({uid[:8]}…)")
    for uid in sorted(files):
        problem = check_mailbox_file(boxes / f"{uid}.sqlite")
        if problem is not None:
            problems.append(f"{MAILBOX_DIR}/{uid}.sqlite: {problem}")
    return problems, len(users)


def verify(
    data_dir: Path,
    server_key: ServerKey,
    targets: Targets,
    snapshot: str | None = None,
    *,
    opening: Opening | None = None,
    progress: Callable[[int], None] | None = None,
    directory: PostgresTarget | None = None,
) -> VerifyReport:
    """Verify ``snapshot`` (default: the newest) on every target, restoring it to a temp dir
    (and a PostgreSQL directory's export into a scratch schema of ``directory``)."""
    started = time.monotonic()
    opening = opening or Opening(server_key=server_key)
    report = VerifyReport(snapshot)
    for number, target in enumerate(targets.targets):
        catalog = Catalog(target, opening)
        try:
            summaries, header_problems = catalog.summaries()
            report.problems += [f"{target.url}: {p}" for p in header_problems]
            if not summaries:
                report.problems.append(f"{target.url}: holds no snapshot")
                continue
            sid = snapshot or summaries[-1].id
            report.snapshot = sid
            point = catalog.point(sid)
        except (ManifestError, TargetError) as e:
            report.problems.append(f"{target.url}: {e}")
            continue
        scratch = keys.backup_dir(data_dir) / STAGING / f"verify-{secrets.token_hex(8)}"
        try:
            restored = materialise(catalog, point, scratch, progress=progress)
            report.problems += [f"{target.url}: {p}" for p in restored.problems]
            report.objects = max(
                report.objects, len({p.obj for e in point.files.values() for p in e.pieces})
            )
            report.files = restored.files
            if number == 0 and not restored.problems:
                problems, report.users = check_restored(
                    scratch, server_key, point.schema, directory, report.notes
                )
                report.problems += problems
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    report.seconds = time.monotonic() - started
    return report
