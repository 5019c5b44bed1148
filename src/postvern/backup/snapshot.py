"""Taking a snapshot: consistent copies of every file, packed, encrypted and uploaded.

What a snapshot holds: every regular file of the data directory (the directory, queue and
abuse databases, each mailbox, the sealed spool, DKIM keys inside the directory, the TLS key
and certificate, ``postvern.toml``) except ``server.key`` — which travels only sealed to the
offline key, in the header — and the ``backup/`` folder itself, WAL/SHM side files (folded
in by the consistent copy) and temp files.

**Consistency.** A file is never read while it is being written:

* The server-key databases (directory, queue, abuse) are copied with SQLite's online backup
  API (``sqlite3_backup``) from a connection holding the server-derived key into a new file
  encrypted under the same key: SQLite takes the read snapshot, so the copy is one
  transaction's state.
* A mailbox cannot be opened without its user's key, so its file is copied as bytes — which is
  only correct while no connection writes it. SQLite's own locks would not do here: a reader's
  WAL read-lock does not stop a checkpoint from writing pages into the main file (it only
  stops the WAL from being reset), and POSIX locks taken in the server's own process neither
  conflict with its connections nor survive our closing the descriptor. What does hold is the
  store's rule of one writer per mailbox: the :class:`Guard` runs the copy under the
  registry's per-user lock (no unlock, no spool import) and, when the mailbox is open, under
  the mailbox's own lock after ``PRAGMA wal_checkpoint(TRUNCATE)`` — no transaction can start
  until the copy is done, and the main file then holds every committed page. A locked
  mailbox has no open connection at all (closing the last one checkpoints it); a WAL left
  by a crash is copied beside it and recovered by SQLite at the next open.
* A user's spool segments are immutable once renamed; they are linked (not copied) under
  the same hold as the mailbox, so an import cannot move a message between the two unseen.

**Incremental by content.** Files are cut into 1 MiB pieces at fixed offsets (SQLite writes
pages in place, so unchanged pages give unchanged pieces); a piece whose SHA-256 the last
snapshot already stored is referenced, not uploaded. Files whose stat fingerprint is
unchanged are not even read. New pieces are packed several to an object.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import apsw

from postvern.abuse.personal import derive_key
from postvern.backup import keys
from postvern.backup.manifest import (
    BODY_PREFIX,
    HEADER_PREFIX,
    OBJECT_PREFIX,
    FileEntry,
    Manifest,
    ObjectInfo,
    Piece,
    encrypt,
    new_id,
    object_ad,
    pad_size,
    seal_manifest,
)
from postvern.backup.targets import TargetError, Targets
from postvern.crypto.serverkey import ServerKey
from postvern.store.mailbox import writers_excluded

if TYPE_CHECKING:
    from postvern.directory.pg import PostgresTarget

log = logging.getLogger(__name__)
T = TypeVar("T")

PIECE_BYTES = 1 << 20  # 1 MiB: a fraction of a big mailbox, many SQLite pages
PACK_BYTES = 4 << 20  # objects up to 4 MiB: few requests, bounded memory per upload
MIN_OBJECT_PAD = 64 << 10  # the smallest size class of an object
UPLOAD_THREADS = 8
MAX_PACKS_IN_FLIGHT = 16  # bounds memory: 16 × 4 MiB × targets


def _abuse_database_key(server_key: ServerKey) -> bytes:
    return derive_key(server_key.derive("abuse"), "database")  # as abuse/service.py does


# The databases that the server key opens, and how each one's key is derived from it.
SERVER_DATABASES: dict[str, Callable[[ServerKey], bytes]] = {
    "directory.sqlite": lambda k: k.derive("directory database"),
    "queue.sqlite": lambda k: k.derive("queue"),
    "abuse.sqlite": _abuse_database_key,
}
MAILBOX_DIR = "mailboxes"
SPOOL_DIR = "spool"
# A PostgreSQL directory's sealed export (directory/pgdump.py) in a snapshot, and in a
# restored data directory until it is loaded; a snapshot makes its own, never copies one.
DIRECTORY_EXPORT = "directory.pgdump"
SKIPPED_TOP = {keys.BACKUP_DIR, "server.key", DIRECTORY_EXPORT}
STAGING = "tmp"
OFFLINE_PUBLIC = f"{keys.BACKUP_DIR}/{keys.OFFLINE_PUBLIC_FILE}"


class BackupError(Exception):
    """A snapshot could not be completed (the message says which target or file)."""


class Guard(Protocol):
    def still(self, user_id: str, work: Callable[[], T]) -> T:
        """Run ``work`` while nobody writes the user's mailbox or imports their spool."""
        ...


class OfflineGuard:
    """For a stopped server (the CLI): nothing else writes the data directory."""

    def still(self, user_id: str, work: Callable[[], T]) -> T:
        return work()


@dataclass
class State:
    """The effective content of the latest snapshot, which the next one builds on."""

    files: dict[str, FileEntry] = field(default_factory=dict)
    objects: dict[str, ObjectInfo] = field(default_factory=dict)
    keys: dict[str, bytes] = field(default_factory=dict, repr=False)
    base: Manifest | None = None  # the full snapshot deltas are taken against
    last_id: str | None = None
    last_created: float = 0.0

    def piece_index(self, on_every_target: set[str] | None) -> dict[str, Piece]:
        index: dict[str, Piece] = {}
        for entry in self.files.values():
            for piece in entry.pieces:
                if on_every_target is None or piece.obj in on_every_target:
                    index[piece.sha256] = piece
        return index


@dataclass
class Result:
    manifest: Manifest
    uploaded_bytes: int
    uploaded_objects: int
    files_read: int
    seconds: float


def _stamp(*paths: Path) -> int:
    """A fingerprint of the files' stat (size, mtime, inode): unchanged means not re-read."""
    h = hashlib.sha256()
    for path in paths:
        try:
            st = path.stat()
        except FileNotFoundError:
            h.update(b"-")
            continue
        h.update(struct.pack(">qqq", st.st_size, st.st_mtime_ns, st.st_ino))
    return int.from_bytes(h.digest()[:7], "big")


def _copy_server_db(src: Path, key: bytes, dst: Path) -> int:
    """The online backup API: a transaction-consistent copy under the same key."""
    source = apsw.Connection(str(src), flags=apsw.SQLITE_OPEN_READWRITE)
    try:
        source.setbusytimeout(10_000)
        source.execute("PRAGMA cipher='chacha20'")
        source.execute(f"PRAGMA key='raw:{key.hex()}'")
        version = source.execute("PRAGMA user_version").fetchall()[0][0]
        assert isinstance(version, int)
        target = apsw.Connection(
            str(dst), flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
        )
        try:
            target.execute("PRAGMA cipher='chacha20'")
            target.execute(f"PRAGMA key='raw:{key.hex()}'")
            with target.backup("main", source, "main") as job:
                job.step(-1)
        finally:
            target.close()
    finally:
        source.close()
    os.chmod(dst, 0o600)
    return version


def copy_mailbox_files(src: Path, dst: Path) -> None:
    """Bytes of a mailbox (and a WAL left by a crash) — call only under a :class:`Guard`.

    With several workers another process may have the mailbox open: its writes (and
    checkpoints) wait meanwhile (``writers_excluded``), so the main file and WAL copied are
    one committed state.
    """
    with writers_excluded(src):
        shutil.copyfile(src, dst)
        wal = src.with_name(src.name + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            shutil.copyfile(wal, dst.with_name(dst.name + "-wal"))


class _Uploader:
    """Packs new pieces into objects and writes each to every target that lacks it."""

    def __init__(self, targets: Targets, snapshot_id: str, key: bytes) -> None:
        self.targets = targets
        self.snapshot_id = snapshot_id
        self.key = key
        self.pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="backup-upload")
        self.slots = threading.Semaphore(MAX_PACKS_IN_FLIGHT)
        self.futures: list[Future[None]] = []
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.pending: list[tuple[str, int, int]] = []  # sha, offset, length in the open pack
        self.name = self._new_name()
        self.objects: dict[str, ObjectInfo] = {}
        self.uploaded_bytes = 0

    @staticmethod
    def _new_name() -> str:
        return OBJECT_PREFIX + new_id()

    def add(self, sha: str, data: bytes) -> Piece:
        if self.buffered + len(data) > PACK_BYTES:
            self.flush()
        piece = Piece(sha, self.name, self.buffered, len(data))
        self.buffer.append(data)
        self.buffered += len(data)
        return piece

    def flush(self) -> None:
        if not self.buffered:
            return
        plain = b"".join(self.buffer)
        plain += bytes(pad_size(len(plain), MIN_OBJECT_PAD) - len(plain))
        name = self.name
        sealed = encrypt(self.key, plain, object_ad(self.snapshot_id, name))
        self.objects[name] = ObjectInfo(
            self.snapshot_id, len(sealed), hashlib.sha256(sealed).hexdigest()
        )
        self.buffer, self.buffered, self.name = [], 0, self._new_name()
        self.put(name, sealed)

    def put(self, name: str, data: bytes) -> None:
        self.slots.acquire()
        for target in self.targets.targets:
            future = self.pool.submit(self.targets.put, target, name, data)
            self.futures.append(future)
        self.uploaded_bytes += len(data) * len(self.targets.targets)
        # release the slot when every target has it
        pending = self.futures[-len(self.targets.targets) :]
        remaining = [len(pending)]
        lock = threading.Lock()

        def done(_: Future[None]) -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    self.slots.release()

        for future in pending:
            future.add_done_callback(done)

    def wait(self) -> None:
        """Every object on every target, or the first failure, loudly."""
        errors: list[str] = []
        for future in self.futures:
            try:
                future.result()
            except TargetError as e:
                errors.append(str(e))
        self.futures.clear()
        if errors:
            raise BackupError(f"upload failed on a target ({len(errors)} object(s)): {errors[0]}")

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class Snapshotter:
    """Takes full and delta snapshots of one data directory to its targets."""

    def __init__(
        self,
        data_dir: Path,
        server_key: ServerKey,
        server_root: bytes,
        offline_public: bytes,
        targets: Targets,
        guard: Guard | None = None,
        directory: PostgresTarget | None = None,
    ) -> None:
        self.data_dir = data_dir
        # The directory in PostgreSQL ([directory] url): exported at every snapshot.
        self.directory = directory
        self.server_key = server_key
        self.server_root = server_root
        self.offline_public = offline_public
        self.targets = targets
        self.guard: Guard = guard or OfflineGuard()
        self.state = State()
        self.present: set[str] | None = None  # objects on every target, when listed

    # -- what is there ---------------------------------------------------------------

    def _walk(self) -> Iterator[str]:
        """Relative paths of the files to back up that are not databases or user units."""
        for root, dirs, files in os.walk(self.data_dir):
            rel_root = Path(root).relative_to(self.data_dir)
            if rel_root == Path("."):
                dirs[:] = [d for d in dirs if d not in SKIPPED_TOP | {MAILBOX_DIR, SPOOL_DIR}]
            for name in files:
                rel = str(rel_root / name) if rel_root != Path(".") else name
                if rel in SKIPPED_TOP or rel in SERVER_DATABASES:
                    continue
                if name.endswith(("-wal", "-shm", "-journal")) or name.startswith(".tmp-"):
                    continue
                if stat.S_ISREG(os.lstat(Path(root) / name).st_mode):
                    yield rel
        # The offline key's public half: a restored server goes on backing up at once.
        if (self.data_dir / OFFLINE_PUBLIC).exists():
            yield OFFLINE_PUBLIC

    def _users(self) -> list[str]:
        ids: set[str] = set()
        for sub, suffix in ((MAILBOX_DIR, ".sqlite"), (SPOOL_DIR, "")):
            try:
                names = os.listdir(self.data_dir / sub)
            except FileNotFoundError:
                continue
            for name in names:
                if suffix and not name.endswith(suffix):
                    continue
                uid = name[: -len(suffix)] if suffix else name
                if uid.isalnum():
                    ids.add(uid)
        return sorted(ids)

    # -- the snapshot ----------------------------------------------------------------

    def list_present(self) -> set[str]:
        """Objects held by every target (a piece elsewhere is uploaded again)."""
        present: set[str] | None = None
        for target in self.targets.targets:
            names = set(target.list(OBJECT_PREFIX))
            present = names if present is None else present & names
        return present or set()

    def take(
        self, kind: str = "full", progress: Callable[[int], None] | None = None
    ) -> Result | None:
        """One snapshot; ``kind`` "delta" records only what changed since the last full one
        (and writes nothing, returning None, when nothing did)."""
        started = time.monotonic()
        if kind == "delta" and self.state.base is None:
            kind = "full"
        if self.present is None:
            self.present = self.list_present()
        sid = new_id()
        snapshot_key = os.urandom(32)
        staging = keys.backup_dir(self.data_dir) / STAGING / sid
        staging.mkdir(parents=True, mode=0o700)
        uploader = _Uploader(self.targets, sid, snapshot_key)
        index = self.state.piece_index(self.present)
        files: dict[str, FileEntry] = {}
        schema: dict[str, int] = {}
        read = 0
        try:

            def add_file(rel: str, staged: Path, stamp: int) -> None:
                nonlocal read
                files[rel] = self._pieces(staged, stamp, index, uploader)
                read += 1
                if progress is not None:
                    progress(1)

            def unchanged(rel: str, stamp: int) -> bool:
                old = self.state.files.get(rel)
                if old is None or old.stamp != stamp:
                    return False
                present = self.present or set()
                if all(p.obj in present for p in old.pieces):
                    files[rel] = old
                    wal = self.state.files.get(rel + "-wal")
                    if wal is not None:
                        files[rel + "-wal"] = wal
                    if progress is not None:
                        progress(1)
                    return True
                return False

            for rel, database_key in SERVER_DATABASES.items():
                src = self.data_dir / rel
                if not src.exists():
                    continue
                stamp = _stamp(src, src.with_name(rel + "-wal"))
                if rel == "directory.sqlite" and self.state.base is not None:
                    schema["directory"] = self.state.base.schema.get("directory", 0)
                if unchanged(rel, stamp):
                    continue
                staged = staging / rel
                version = _copy_server_db(src, database_key(self.server_key), staged)
                if rel == "directory.sqlite":
                    schema["directory"] = version
                add_file(rel, staged, stamp)
                staged.unlink()

            if self.directory is not None:
                schema["directory"] = self._directory_export(staging, unchanged, add_file)

            for rel in self._walk():
                src = self.data_dir / rel
                stamp = _stamp(src)
                if unchanged(rel, stamp):
                    continue
                staged = staging / "plain"
                try:
                    shutil.copyfile(src, staged)
                except FileNotFoundError:
                    continue
                add_file(rel, staged, stamp)
                staged.unlink()

            for uid in self._users():
                self._user_unit(uid, staging, unchanged, add_file)

            uploader.flush()
            uploader.wait()
        except BaseException:
            uploader.close()
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        uploader.close()
        if kind == "delta" and not read and set(files) == set(self.state.files):
            return None

        new_objects = dict(self.state.objects)
        new_objects.update(uploader.objects)
        new_keys = dict(self.state.keys)
        new_keys[sid] = snapshot_key
        manifest = self._manifest(sid, kind, files, schema, new_objects, new_keys)
        header, body = seal_manifest(
            manifest, snapshot_key, self.server_key, self.offline_public, self.server_root
        )
        # The body first, the header last: a snapshot exists once its header does.
        self._put_everywhere(BODY_PREFIX + sid, body)
        self._put_everywhere(HEADER_PREFIX + sid, header)
        self.present |= set(uploader.objects)
        self._advance(manifest, files, new_objects, new_keys)
        uploaded = uploader.uploaded_bytes + (len(body) + len(header)) * len(self.targets.targets)
        return Result(manifest, uploaded, len(uploader.objects), read, time.monotonic() - started)

    def _directory_export(
        self,
        staging: Path,
        unchanged: Callable[[str, int], bool],
        add_file: Callable[[str, Path, int], None],
    ) -> int:
        """The PostgreSQL directory, exported in one consistent transaction and sealed under
        the server key before it is written (directory/pgdump.py); its schema version.
        An export equal to the last one is referenced, not uploaded again."""
        from postvern.directory import pgdump

        assert self.directory is not None
        try:
            plain, version = pgdump.export(self.directory)
        except (pgdump.DumpError, pgdump.psycopg.Error) as e:
            raise BackupError(f"the directory in PostgreSQL: {e}") from None
        stamp = pgdump.fingerprint(pgdump.stamp_key(self.server_key), plain)
        if unchanged(DIRECTORY_EXPORT, stamp):
            return version
        staged = staging / DIRECTORY_EXPORT
        pgdump.write_sealed(staged, pgdump.dump_key(self.server_key), plain)
        add_file(DIRECTORY_EXPORT, staged, stamp)
        staged.unlink()
        return version

    def _user_unit(
        self,
        uid: str,
        staging: Path,
        unchanged: Callable[[str, int], bool],
        add_file: Callable[[str, Path, int], None],
    ) -> None:
        mailbox = self.data_dir / MAILBOX_DIR / f"{uid}.sqlite"
        spool = self.data_dir / SPOOL_DIR / uid
        unit = staging / uid  # made only when something of this user changed
        staged: list[tuple[str, Path, int]] = []

        def hold() -> None:
            if mailbox.exists():
                rel = f"{MAILBOX_DIR}/{uid}.sqlite"
                stamp = _stamp(mailbox, mailbox.with_name(mailbox.name + "-wal"))
                if not unchanged(rel, stamp):
                    unit.mkdir(mode=0o700, exist_ok=True)
                    copy_mailbox_files(mailbox, unit / "mailbox")
                    staged.append((rel, unit / "mailbox", stamp))
                    wal = unit / "mailbox-wal"
                    if wal.exists():
                        staged.append((rel + "-wal", wal, stamp))
            for root, _dirs, names in os.walk(spool) if spool.is_dir() else ():
                for name in names:
                    if name.startswith(".tmp-"):
                        continue  # never answered 250; removed at the next import
                    src = Path(root) / name
                    rel = str(src.relative_to(self.data_dir))
                    stamp = _stamp(src)
                    if unchanged(rel, stamp):
                        continue
                    unit.mkdir(mode=0o700, exist_ok=True)
                    link = unit / f"s{len(staged)}"
                    try:
                        os.link(src, link)  # immutable once renamed: a link is a copy
                    except FileNotFoundError:
                        continue
                    staged.append((rel, link, stamp))

        self.guard.still(uid, hold)
        for rel, path, stamp in staged:
            add_file(rel, path, stamp)
        if staged:
            shutil.rmtree(unit, ignore_errors=True)

    def _pieces(
        self, path: Path, stamp: int, index: dict[str, Piece], uploader: _Uploader
    ) -> FileEntry:
        pieces: list[Piece] = []
        size = 0
        with path.open("rb") as f:
            while chunk := f.read(PIECE_BYTES):
                size += len(chunk)
                sha = hashlib.sha256(chunk).hexdigest()
                piece = index.get(sha)
                if piece is None:
                    piece = uploader.add(sha, chunk)
                    index[sha] = piece
                pieces.append(piece)
        return FileEntry(size, stamp, pieces)

    def _manifest(
        self,
        sid: str,
        kind: str,
        files: dict[str, FileEntry],
        schema: dict[str, int],
        objects: dict[str, ObjectInfo],
        all_keys: dict[str, bytes],
    ) -> Manifest:
        base = self.state.base
        if kind == "delta" and base is not None:
            recorded = {rel: entry for rel, entry in files.items() if base.files.get(rel) != entry}
            deleted = sorted(set(base.files) - set(files))
            base_id: str | None = base.id
        else:
            recorded, deleted, base_id = files, [], None
        used = {p.obj for entry in recorded.values() for p in entry.pieces}
        used_objects = {name: objects[name] for name in used}
        used_keys = {info.key_id: all_keys[info.key_id] for info in used_objects.values()}
        used_keys[sid] = all_keys[sid]
        return Manifest(
            id=sid,
            created=time.time(),
            kind=kind,
            base=base_id,
            schema=schema,
            keys=used_keys,
            objects=used_objects,
            files=recorded,
            deleted=deleted,
        )

    def _advance(
        self,
        manifest: Manifest,
        files: dict[str, FileEntry],
        objects: dict[str, ObjectInfo],
        all_keys: dict[str, bytes],
    ) -> None:
        used = {p.obj for entry in files.values() for p in entry.pieces}
        self.state.objects = {n: o for n, o in objects.items() if n in used}
        kept = {o.key_id for o in self.state.objects.values()}
        self.state.keys = {k: v for k, v in all_keys.items() if k in kept or k == manifest.id}
        self.state.files = files
        self.state.last_id = manifest.id
        self.state.last_created = manifest.created
        if manifest.kind == "full":
            self.state.base = manifest

    def _put_everywhere(self, name: str, data: bytes) -> None:
        errors = []
        for target in self.targets.targets:
            try:
                self.targets.put(target, name, data)
            except TargetError as e:
                errors.append(str(e))
        if errors:
            raise BackupError(f"upload failed: {errors[0]}")
