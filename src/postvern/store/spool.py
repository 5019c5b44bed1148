"""The sealed spool: mail for a locked mailbox, sealed to its public key, imported at unlock.

The MX cannot open a mailbox it has no key for, so it encrypts the message to the mailbox's
HPKE public key (:mod:`postvern.crypto.seal`) and writes it durably — temp file, fsync,
rename, fsync of the directory — before it answers 250. Deliveries that arrive together are
written together: one *segment* file holds several sealed items, so one pair of fsyncs makes
them all durable (group commit, as databases do for their logs); each item is still sealed
on its own and bound to its user, segment and place in it.

The next unlock imports every item exactly once: the mailbox records each imported item id in
the same transaction as the message, and a segment is unlinked only after all its items are
committed. A crash between any two steps leaves either the file (re-import is skipped by the
record) or the committed message.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import secrets
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from postvern.crypto.seal import Opener, Sealer, SealError
from postvern.durable import TEMP_PREFIX, fsync_dir, write_durably
from postvern.store import faults
from postvern.store.mailbox import INBOX, Mailbox

log = logging.getLogger(__name__)

SPOOL_DIR = "spool"
SUFFIX = ".sealed"
MAGIC = b"PVS2"
_RECORD = struct.Struct(">II")  # item index in the segment, sealed length
# A sealed item is at most the largest message plus a little: anything longer in a record
# header is damage, not data, and is not allocated.
MAX_ITEM_BYTES = 1 << 30
# Import in batches: one transaction per batch amortises the fsync of the commit, while a
# bounded batch bounds the memory held for decrypted messages.
IMPORT_BATCH = 256
IMPORT_BATCH_BYTES = 64 * 1024 * 1024
# A temp file older than this is a deposit a crash interrupted; younger, one may still be in
# progress in another worker. A deposit is written and renamed within seconds.
STALE_TEMP_SECONDS = 3600.0


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
    # A cluster front's id for this copy (cluster/relay.py): a copy sent again after a
    # failover is stored once, however many times it arrives.
    delivery_id: str | None = None

    def encode(self) -> bytes:
        meta = {
            "use": self.special_use,
            "flags": list(self.flags),
            "date": self.internaldate.isoformat(),
        }
        if self.delivery_id is not None:
            meta["id"] = self.delivery_id
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
            delivery_id=meta.get("id"),
        )


DELIVERY_PREFIX = "delivery:"


def delivery_key(item: SpoolItem) -> str | None:
    """The import record that makes a copy with a delivery id idempotent. Unlike a spool
    item's own id (segment/index, forgotten once the segment is gone), it is kept: the same
    copy may arrive again later, sent once more by a front after a failover."""
    return None if item.delivery_id is None else DELIVERY_PREFIX + item.delivery_id


def _info(user_id: str, item_id: str) -> bytes:
    # Binds a sealed item to its user and its place: an item copied into another user's
    # spool, or into another segment of the same user, does not open.
    return f"postvern spool v2 {user_id} {item_id}".encode()


def item_id(segment: str, index: int) -> str:
    return f"{segment}/{index}"


@dataclass(frozen=True, slots=True)
class Deposit:
    user_id: str
    public_key: bytes = field(repr=False)
    item: SpoolItem = field(repr=False)


class Spool:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / SPOOL_DIR

    def user_dir(self, user_id: str) -> Path:
        if not user_id.isalnum():
            raise SpoolError("bad user id")
        return self.root / user_id

    def deposit(self, user_id: str, public_key: bytes, item: SpoolItem) -> str:
        """Seal and write one item durably; returns its id. Only then may SMTP answer 250."""
        return self.deposit_batch([Deposit(user_id, public_key, item)])[0]

    def deposit_batch(self, deposits: list[Deposit]) -> list[str]:
        """Seal and write several items durably, one segment per user; ids in input order."""
        faults.fail("spool.deposit")
        by_user: dict[str, list[int]] = {}
        for position, deposit in enumerate(deposits):
            by_user.setdefault(deposit.user_id, []).append(position)
        ids = [""] * len(deposits)
        directories: list[Path] = []
        written: list[Path] = []
        try:
            for user_id, positions in by_user.items():
                directory, path = self._write_segment(user_id, positions, deposits, ids)
                directories.append(directory)
                written.append(path)
            for directory in directories:
                fsync_dir(directory)
        except BaseException:
            # All or nothing: a caller told of a failure retries every item of the batch.
            for path in written:
                path.unlink(missing_ok=True)
            raise
        return ids

    def _write_segment(
        self, user_id: str, positions: list[int], deposits: list[Deposit], ids: list[str]
    ) -> tuple[Path, Path]:
        """One user's share of a batch as one segment file; fills in ``ids``."""
        directory = self.user_dir(user_id)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Names sort by arrival, so import keeps delivery order.
        segment = f"{time.time_ns():020d}-{secrets.token_hex(8)}"
        records = [MAGIC]
        for index, position in enumerate(positions):
            deposit = deposits[position]
            ids[position] = item_id(segment, index)
            sealed = Sealer(deposit.public_key).seal(
                deposit.item.encode(), _info(user_id, ids[position])
            )
            records += [_RECORD.pack(index, len(sealed)), sealed]
        write_durably(directory, segment + SUFFIX, b"".join(records))
        return directory, directory / (segment + SUFFIX)

    def pending(self, user_id: str) -> list[str]:
        """Segments waiting to be imported, oldest first."""
        directory = self.user_dir(user_id)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        # A temp file is a deposit whose write never finished: it was never acknowledged.
        return sorted(
            n[: -len(SUFFIX)] for n in names if n.endswith(SUFFIX) and not n.startswith(TEMP_PREFIX)
        )

    def count(self, user_id: str) -> int:
        return sum(len(self.read(user_id, segment)) for segment in self.pending(user_id))

    def read(self, user_id: str, segment: str) -> list[tuple[str, bytes]]:
        """The (item id, sealed bytes) of one segment; raises SpoolError on damage."""
        data = (self.user_dir(user_id) / (segment + SUFFIX)).read_bytes()
        if not data.startswith(MAGIC):
            raise SpoolError("not a sealed spool segment")
        items = []
        pos = len(MAGIC)
        while pos < len(data):
            if pos + _RECORD.size > len(data):
                raise SpoolError("truncated spool segment")
            index, length = _RECORD.unpack_from(data, pos)
            pos += _RECORD.size
            if length > MAX_ITEM_BYTES or pos + length > len(data):
                raise SpoolError("truncated spool segment")
            items.append((item_id(segment, index), data[pos : pos + length]))
            pos += length
        return items

    def remove(self, user_id: str, segment: str) -> None:
        try:
            os.unlink(self.user_dir(user_id) / (segment + SUFFIX))
        except FileNotFoundError:
            pass

    def withdraw(self, user_id: str, spool_id: str) -> None:
        """Take back one deposit durably (the delivery it belonged to failed as a whole).

        The segment is rewritten without it (or removed when it was the last), with the same
        durability steps as a deposit; the other items keep their ids.
        """
        segment, _, _ = spool_id.partition("/")
        directory = self.user_dir(user_id)
        try:
            items = self.read(user_id, segment)
        except FileNotFoundError:
            return
        kept = [(i, sealed) for i, sealed in items if i != spool_id]
        if kept:
            records = [MAGIC]
            for i, sealed in kept:
                records += [_RECORD.pack(int(i.rpartition("/")[2]), len(sealed)), sealed]
            write_durably(directory, segment + SUFFIX, b"".join(records))
        else:
            self.remove(user_id, segment)
        fsync_dir(directory)

    def size(self, user_id: str) -> int:
        """Bytes waiting in the spool (sealed sizes, close to the messages' own)."""
        directory = self.user_dir(user_id)
        try:
            return sum(e.stat().st_size for e in os.scandir(directory) if e.name.endswith(SUFFIX))
        except FileNotFoundError:
            return 0

    def quarantine(self, user_id: str, name: str, data: bytes | None = None) -> None:
        """Set aside what does not open — a damaged segment, or one item's bytes — so it
        neither blocks import nor is lost."""
        bad = self.user_dir(user_id) / "unreadable"
        bad.mkdir(exist_ok=True, mode=0o700)
        if data is None:
            os.rename(self.user_dir(user_id) / (name + SUFFIX), bad / (name + SUFFIX))
        else:
            write_durably(bad, name.replace("/", "-") + SUFFIX, data)

    def clean_temp(self, user_id: str) -> None:
        """Remove temp files a crash left before their rename (they were never answered 250).

        With several workers (workers.py, ``Mailbox.shared``) only stale ones: another
        process may be writing a deposit into this directory right now, and its temp file
        must stay. One process alone has no deposit in flight while it imports.
        """
        directory = self.user_dir(user_id)
        if not directory.is_dir():
            return
        stale = time.time() - STALE_TEMP_SECONDS if Mailbox.shared else float("inf")
        for name in os.listdir(directory):
            if name.startswith(TEMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(directory / name).st_mtime < stale:
                        os.unlink(directory / name)

    def remove_user(self, user_id: str) -> None:
        directory = self.user_dir(user_id)
        if not directory.exists():
            return
        for path in sorted(directory.rglob("*"), reverse=True):
            path.unlink() if not path.is_dir() else path.rmdir()
        directory.rmdir()


def _batches(
    spool: Spool, user_id: str, segments: list[str]
) -> Iterator[tuple[list[str], list[tuple[str, bytes]]]]:
    """Whole segments, grouped up to the batch bounds: (segment names, their items)."""
    names: list[str] = []
    batch: list[tuple[str, bytes]] = []
    size = 0
    for segment in segments:
        try:
            items = spool.read(user_id, segment)
        except FileNotFoundError:
            continue
        except SpoolError:
            spool.quarantine(user_id, segment)
            continue
        names.append(segment)
        batch += items
        size += sum(len(sealed) for _, sealed in items)
        if len(batch) >= IMPORT_BATCH or size >= IMPORT_BATCH_BYTES:
            yield names, batch
            names, batch, size = [], [], 0
    if names:
        yield names, batch


def import_spool(box: Mailbox, spool: Spool, user_id: str) -> list[tuple[int, int]]:
    """Move every sealed item into the mailbox, exactly once; returns their (folder, uid).

    Mail already accepted with 250 is imported even past the quota: refusing it here would
    lose it. The quota is enforced at RCPT time.
    """
    if not spool.pending(user_id):
        spool.clean_temp(user_id)
        return []
    with _import_lock(spool.user_dir(user_id)):
        spool.clean_temp(user_id)
        return _import_locked(box, spool, user_id, spool.pending(user_id))


@contextlib.contextmanager
def _import_lock(directory: Path) -> Iterator[None]:
    """One importer per user at a time, across processes: two workers that both have the
    mailbox open import the same segments otherwise, and one may forget an item's import
    record (``forget_spool_ids``) while the other, having read the segment before it was
    unlinked, is about to check that record. flock(2) on the directory itself."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _import_locked(
    box: Mailbox, spool: Spool, user_id: str, segments: list[str]
) -> list[tuple[int, int]]:
    opener = Opener(box.spool_private_key())
    already = box.imported_spool_ids()
    imported: list[tuple[int, int]] = []
    for names, batch in _batches(spool, user_id, segments):
        by_folder: dict[int, list[tuple[str, str, SpoolItem]]] = {}
        done: list[str] = []
        for spool_id, sealed in batch:
            if spool_id in already:
                done.append(spool_id)  # committed before a crash: only the unlink is left
                continue
            try:
                item = SpoolItem.decode(opener.open(sealed, _info(user_id, spool_id)))
            except (SealError, SpoolError, ValueError, KeyError):
                log.warning("spool item for a mailbox does not open; set aside")
                spool.quarantine(user_id, spool_id, sealed)
                continue
            key = delivery_key(item) or spool_id
            if key in already:
                done.append(spool_id)  # this copy is stored already (sent twice)
                continue
            folder = _target_folder(box, item.special_use)
            by_folder.setdefault(folder, []).append((spool_id, key, item))
        for folder_id, entries in by_folder.items():
            faults.point("spool.before-insert")
            uids, _ = box.append_many(
                folder_id,
                [(item.raw, item.flags, item.internaldate) for _, _, item in entries],
                spool_ids=[key for _, key, _ in entries],  # append_many skips a known key
            )
            imported += [(folder_id, uid) for uid in uids]
            done += [spool_id for spool_id, _, _ in entries]  # delivery keys are kept
            faults.point("spool.after-commit")
        for segment in names:
            spool.remove(user_id, segment)
        faults.point("spool.after-unlink")
        fsync_dir(spool.user_dir(user_id))
        faults.point("spool.after-fsync")
        box.forget_spool_ids(done)
    return imported


def _target_folder(box: Mailbox, special_use: str | None) -> int:
    if special_use:
        folder = box.folder_by_use(special_use)
        if folder is not None:
            return folder.id
    return box.folder(INBOX).id
