"""The sealed spool: mail for a locked mailbox, sealed to its public key, imported at unlock.

The MX cannot open a mailbox it has no key for, so it encrypts the message to the mailbox's
HPKE public key (:mod:`postvern.crypto.seal`) and writes it durably — temp file, fsync,
rename, fsync of the directory — before it answers 250. The next unlock imports every file
exactly once: the mailbox records each imported spool id in the same transaction as the
message, and the file is unlinked only after that commit. A crash between any two steps
leaves either the file (re-import is skipped by the record) or the committed message.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from postvern.crypto.seal import Opener, Sealer, SealError
from postvern.store import faults
from postvern.store.mailbox import INBOX, Mailbox

log = logging.getLogger(__name__)

SPOOL_DIR = "spool"
SUFFIX = ".sealed"
MAGIC = b"PVS1"
# Import in batches: one transaction per batch amortises the fsync of the commit, while a
# bounded batch bounds the memory held for decrypted messages.
IMPORT_BATCH = 64
IMPORT_BATCH_BYTES = 64 * 1024 * 1024


class SpoolError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class SpoolItem:
    """What delivery hands the spool: the final message and where it should be filed."""

    raw: bytes
    special_use: str | None = None  # None means INBOX; "\\Junk" files it as junk
    flags: tuple[str, ...] = ()
    internaldate: datetime.datetime = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC).astimezone()
    )

    def encode(self) -> bytes:
        meta = {
            "use": self.special_use,
            "flags": list(self.flags),
            "date": self.internaldate.isoformat(),
        }
        return json.dumps(meta).encode() + b"\n" + self.raw

    @classmethod
    def decode(cls, data: bytes) -> SpoolItem:
        head, sep, raw = data.partition(b"\n")
        if not sep:
            raise SpoolError("malformed spool item")
        meta = json.loads(head)
        return cls(
            raw=raw,
            special_use=meta["use"],
            flags=tuple(meta["flags"]),
            internaldate=datetime.datetime.fromisoformat(meta["date"]),
        )


def _info(user_id: str) -> bytes:
    # Binds a sealed file to its user: a file moved into another user's spool does not open.
    return b"postvern spool v1 " + user_id.encode()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / SPOOL_DIR

    def user_dir(self, user_id: str) -> Path:
        if not user_id.isalnum():
            raise SpoolError("bad user id")
        return self.root / user_id

    def deposit(self, user_id: str, public_key: bytes, item: SpoolItem) -> str:
        """Seal and write durably; returns the spool id. Only then may SMTP answer 250."""
        faults.fail("spool.deposit")
        sealed = MAGIC + Sealer(public_key).seal(item.encode(), _info(user_id))
        directory = self.user_dir(user_id)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Names sort by arrival, so import keeps delivery order.
        spool_id = f"{time.time_ns():020d}-{secrets.token_hex(8)}"
        tmp = directory / f".tmp-{spool_id}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(sealed)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, directory / (spool_id + SUFFIX))
        _fsync_dir(directory)
        return spool_id

    def pending(self, user_id: str) -> list[str]:
        directory = self.user_dir(user_id)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        return sorted(n[: -len(SUFFIX)] for n in names if n.endswith(SUFFIX))

    def count(self, user_id: str) -> int:
        return len(self.pending(user_id))

    def read(self, user_id: str, spool_id: str) -> bytes:
        data = (self.user_dir(user_id) / (spool_id + SUFFIX)).read_bytes()
        if not data.startswith(MAGIC):
            raise SpoolError("not a sealed spool file")
        return data[len(MAGIC) :]

    def remove(self, user_id: str, spool_id: str) -> None:
        try:
            os.unlink(self.user_dir(user_id) / (spool_id + SUFFIX))
        except FileNotFoundError:
            pass

    def withdraw(self, user_id: str, spool_id: str) -> None:
        """Take back a deposit durably (the delivery it belonged to failed as a whole)."""
        self.remove(user_id, spool_id)
        _fsync_dir(self.user_dir(user_id))

    def size(self, user_id: str) -> int:
        """Bytes waiting in the spool (sealed sizes, close to the messages' own)."""
        directory = self.user_dir(user_id)
        try:
            return sum(e.stat().st_size for e in os.scandir(directory) if e.name.endswith(SUFFIX))
        except FileNotFoundError:
            return 0

    def quarantine(self, user_id: str, spool_id: str) -> None:
        """Set aside a file that does not open, so it neither blocks import nor is lost."""
        bad = self.user_dir(user_id) / "unreadable"
        bad.mkdir(exist_ok=True, mode=0o700)
        os.rename(self.user_dir(user_id) / (spool_id + SUFFIX), bad / (spool_id + SUFFIX))

    def clean_temp(self, user_id: str) -> None:
        """Remove temp files a crash left before their rename (they were never answered 250)."""
        directory = self.user_dir(user_id)
        if directory.is_dir():
            for name in os.listdir(directory):
                if name.startswith(".tmp-"):
                    os.unlink(directory / name)

    def remove_user(self, user_id: str) -> None:
        directory = self.user_dir(user_id)
        if not directory.exists():
            return
        for path in sorted(directory.rglob("*"), reverse=True):
            path.unlink() if not path.is_dir() else path.rmdir()
        directory.rmdir()


def _batches(spool: Spool, user_id: str, ids: list[str]) -> Iterator[list[tuple[str, bytes]]]:
    batch: list[tuple[str, bytes]] = []
    size = 0
    for spool_id in ids:
        try:
            data = spool.read(user_id, spool_id)
        except FileNotFoundError:
            continue
        except SpoolError:
            spool.quarantine(user_id, spool_id)
            continue
        batch.append((spool_id, data))
        size += len(data)
        if len(batch) >= IMPORT_BATCH or size >= IMPORT_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def import_spool(box: Mailbox, spool: Spool, user_id: str) -> list[tuple[int, int]]:
    """Move every sealed item into the mailbox, exactly once; returns their (folder, uid).

    Mail already accepted with 250 is imported even past the quota: refusing it here would
    lose it. The quota is enforced at RCPT time.
    """
    spool.clean_temp(user_id)
    ids = spool.pending(user_id)
    if not ids:
        return []
    opener = Opener(box.spool_private_key())
    info = _info(user_id)
    already = box.imported_spool_ids()
    imported: list[tuple[int, int]] = []
    for batch in _batches(spool, user_id, ids):
        by_folder: dict[int, list[tuple[str, SpoolItem]]] = {}
        done: list[str] = []
        for spool_id, data in batch:
            if spool_id in already:
                done.append(spool_id)  # committed before a crash: only the unlink is left
                continue
            try:
                item = SpoolItem.decode(opener.open(data, info))
            except (SealError, SpoolError, ValueError, KeyError):
                log.warning("spool item for a mailbox does not open; set aside")
                spool.quarantine(user_id, spool_id)
                continue
            folder = _target_folder(box, item.special_use)
            by_folder.setdefault(folder, []).append((spool_id, item))
        for folder_id, entries in by_folder.items():
            faults.point("spool.before-insert")
            uids, _ = box.append_many(
                folder_id,
                [(item.raw, item.flags, item.internaldate) for _, item in entries],
                spool_ids=[spool_id for spool_id, _ in entries],
            )
            imported += [(folder_id, uid) for uid in uids]
            done += [spool_id for spool_id, _ in entries]
            faults.point("spool.after-commit")
        for spool_id in done:
            spool.remove(user_id, spool_id)
        faults.point("spool.after-unlink")
        _fsync_dir(spool.user_dir(user_id))
        faults.point("spool.after-fsync")
        box.forget_spool_ids(done)
    return imported


def _target_folder(box: Mailbox, special_use: str | None) -> int:
    if special_use:
        folder = box.folder_by_use(special_use)
        if folder is not None:
            return folder.id
    return box.folder(INBOX).id
