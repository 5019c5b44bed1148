"""Restoring a snapshot: the whole data directory, or one user's mailbox at a point in time.

Every object is checked three ways before a byte of it is written: the SHA-256 of its
ciphertext against the signed manifest, its AEAD tag (which also binds it to its snapshot and
name), and the SHA-256 of every piece taken from it. A failure names the object.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from postvern.backup.catalog import Catalog, Point
from postvern.backup.manifest import ManifestError, decrypt, object_ad
from postvern.backup.snapshot import DIRECTORY_EXPORT, MAILBOX_DIR, SPOOL_DIR
from postvern.backup.targets import TargetError

DOWNLOAD_THREADS = 8
SERVER_KEY_FILE = "server.key"


class RestoreError(Exception):
    pass


@dataclass
class RestoreReport:
    snapshot: str
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


_Slice = tuple[str, int, int, int, str]  # file, offset in it, offset in the object, length, sha


def _plan(point: Point, wanted: Callable[[str], bool]) -> dict[str, list[_Slice]]:
    """object → the slices of it that go into files."""
    by_object: dict[str, list[_Slice]] = {}
    for rel, entry in point.files.items():
        if not wanted(rel):
            continue
        position = 0
        for p in entry.pieces:
            by_object.setdefault(p.obj, []).append((rel, position, p.offset, p.length, p.sha256))
            position += p.length
    return by_object


def fetch_object(catalog: Catalog, point: Point, name: str) -> bytes:
    """Download one object and check its hash and tag; raises ManifestError naming it."""
    info = point.objects.get(name)
    if info is None:
        raise ManifestError(f"{name}: referenced but not in the manifest")
    try:
        sealed = catalog.target.get(name)
    except TargetError as e:
        raise ManifestError(f"{name}: missing or unreadable ({e})") from None
    if len(sealed) != info.size or hashlib.sha256(sealed).hexdigest() != info.sha256:
        raise ManifestError(f"{name}: hash mismatch (damaged or tampered)")
    key = point.keys.get(info.key_id)
    if key is None:
        raise ManifestError(f"{name}: its key is not in the manifest")
    try:
        return decrypt(key, sealed, object_ad(info.key_id, name))
    except ManifestError:
        raise ManifestError(f"{name}: does not authenticate") from None


def materialise(
    catalog: Catalog,
    point: Point,
    dest: Path,
    *,
    wanted: Callable[[str], bool] = lambda rel: True,
    rename: Callable[[str], str] = lambda rel: rel,
    progress: Callable[[int], None] | None = None,
) -> RestoreReport:
    """Write the files of ``point`` (those ``wanted``) under ``dest``; collect problems."""
    started = time.monotonic()
    report = RestoreReport(point.summary.id)
    plan = _plan(point, wanted)
    for rel, entry in point.files.items():
        if not wanted(rel):
            continue
        path = dest / rename(rel)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, entry.size)
        os.close(fd)
        report.files += 1
        report.bytes += entry.size

    def one(name: str) -> None:
        try:
            plain = fetch_object(catalog, point, name)
        except ManifestError as e:
            report.problems.append(str(e))
            return
        for rel, position, offset, length, sha in plan[name]:
            data = plain[offset : offset + length]
            if hashlib.sha256(data).hexdigest() != sha:
                report.problems.append(f"{name}: a piece does not match its hash")
                continue
            fd = os.open(dest / rename(rel), os.O_WRONLY)
            try:
                os.pwrite(fd, data, position)
            finally:
                os.close(fd)
        if progress is not None:
            progress(1)

    with ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="backup-restore") as pool:
        list(pool.map(one, plan))
    for rel in point.files:
        if wanted(rel):
            fd = os.open(dest / rename(rel), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    report.seconds = time.monotonic() - started
    return report


def restore_all(
    catalog: Catalog,
    point: Point,
    dest: Path,
    *,
    server_root: bytes | None,
    progress: Callable[[int], None] | None = None,
) -> RestoreReport:
    """A whole data directory into ``dest`` (absent or empty); the server key written 0600."""
    if dest.exists() and any(dest.iterdir()):
        raise RestoreError(f"{dest}: exists and is not empty")
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(dest, 0o700)
    report = materialise(catalog, point, dest, progress=progress)
    if report.problems:
        return report
    if server_root is not None:
        fd = os.open(dest / SERVER_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, server_root.hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    return report


def load_directory(data_dir: Path, *, replace: bool = False) -> str | None:
    """Put a restored data directory's PostgreSQL directory back: its export
    (``directory.pgdump``, sealed under the server key) goes into the database its
    ``postvern.toml`` names, over TLS as the server connects; the export is removed once
    loaded. None when the snapshot held no export (a SQLite directory); else what was done.

    A database that already holds a directory is refused (RestoreError) unless ``replace``;
    the export then stays, to be loaded with ``postvern directory load-export``.
    """
    exported = data_dir / DIRECTORY_EXPORT
    if not exported.exists():
        return None
    from postvern import config
    from postvern.crypto.serverkey import ServerKey
    from postvern.directory import pgdump
    from postvern.directory.pg import target_from_settings

    settings = config.load(data_dir)
    target = target_from_settings(settings)
    if target is None:
        raise RestoreError(
            f"the snapshot's directory was in PostgreSQL but {data_dir}/postvern.toml names no"
            " [directory] url; set it, then: postvern directory load-export"
        )
    server_key = ServerKey.load(data_dir)
    try:
        dump = pgdump.parse(pgdump.read_sealed(exported, pgdump.dump_key(server_key)))
        counts = pgdump.load(target, dump, replace=replace)
    except pgdump.DirectoryNotEmpty as e:
        raise RestoreError(f"{e} (postvern directory load-export --replace-directory)") from None
    except (pgdump.DumpError, pgdump.psycopg.Error) as e:
        raise RestoreError(f"the directory was not loaded into {target.describe()}: {e}") from None
    exported.unlink()
    return (
        f"directory loaded into PostgreSQL {target.describe()}: {counts['users']} user(s),"
        f" {sum(counts.values())} row(s), schema {dump.schema}"
    )


def restore_user(
    catalog: Catalog, point: Point, data_dir: Path, user_id: str, *, keep_current: bool = True
) -> RestoreReport:
    """One user's mailbox (and sealed spool) as it was at ``point``; no one else is touched.

    The mailbox key is random and never changes (a new password only rewraps it), so the old
    file opens with the user's current password. The current file is kept beside it as
    ``mailboxes/<id>.sqlite.before-restore-<time>`` unless ``keep_current`` is false. Spool
    segments of the point that are no longer in the spool come back; the mailbox's own record
    of imported items keeps them from being imported twice. Mail that arrived after the point
    and still waits in the spool stays.

    The caller makes sure the mailbox is not open (the server is stopped, or the user is not
    logged in and the registry's hold is taken).
    """
    if not user_id.isalnum():
        raise RestoreError("bad user id")
    mailbox_rel = f"{MAILBOX_DIR}/{user_id}.sqlite"
    spool_prefix = f"{SPOOL_DIR}/{user_id}/"
    if mailbox_rel not in point.files:
        raise RestoreError("that user has no mailbox in this snapshot")
    staging = data_dir / "backup" / "tmp" / f"user-{user_id}-{time.time_ns()}"
    staging.mkdir(parents=True, mode=0o700)
    try:
        current_spool = data_dir / SPOOL_DIR / user_id

        def wanted(rel: str) -> bool:
            if rel in (mailbox_rel, mailbox_rel + "-wal"):
                return True
            return rel.startswith(spool_prefix) and not (data_dir / rel).exists()

        report = materialise(catalog, point, staging, wanted=wanted)
        if report.problems:
            return report
        live = data_dir / mailbox_rel
        if live.exists() and keep_current:
            aside = live.with_name(f"{live.name}.before-restore-{int(time.time())}")
            os.replace(live, aside)
        for side in ("-wal", "-shm"):
            live.with_name(live.name + side).unlink(missing_ok=True)
        live.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.replace(staging / mailbox_rel, live)
        wal = staging / (mailbox_rel + "-wal")
        if wal.exists():
            os.replace(wal, live.with_name(live.name + "-wal"))
        restored_spool = staging / SPOOL_DIR / user_id
        if restored_spool.is_dir():
            for root, _dirs, names in os.walk(restored_spool):
                for name in names:
                    src = Path(root) / name
                    target = current_spool / src.relative_to(restored_spool)
                    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                    os.replace(src, target)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)
