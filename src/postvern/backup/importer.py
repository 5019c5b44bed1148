"""Importing mail into a mailbox: from an mbox file, a Maildir, or another IMAP server.

Folders, flags and dates are kept (like imapsync). The mailbox is opened with its user's
password — the server has no other way in — and the messages are stored through the store's
own ``append_many``, so they are indexed, counted and encrypted like any delivery.

**Resumable.** After each batch the importer records, *inside the mailbox* (encrypted, like
everything there), how far it got in each folder of this source: for IMAP the folder's
UIDVALIDITY and the last UID done, for mbox and Maildir the number of messages done in the
source's order. Running the same import again continues where it stopped and brings only
what is new. A crash between a batch's commit and its record costs at most that one batch
(``IMPORT_BATCH`` messages) imported twice — never a lost message.
"""

from __future__ import annotations

import datetime
import hashlib
import imaplib
import ipaddress
import json
import mailbox
import re
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from postvern.imap import utf7
from postvern.store.mailbox import INBOX, FolderExists, Mailbox, NoSuchFolder

IMPORT_BATCH = 100
IMPORT_BATCH_BYTES = 16 << 20
FETCH_CHUNK = 50  # UIDs per UID FETCH: bounded responses, few round trips
PROGRESS_BLOB = "import progress "
IMAP_TIMEOUT_SECONDS = 60
# Pauses before trying LOGIN again after a temporary failure ([UNAVAILABLE]): a loaded
# authentication service (Dovecot's answers so when its auth process is slow) recovers in
# seconds; three tries over ~10 s, then the import stops and may be run again.
LOGIN_RETRY_PAUSES = (2.0, 8.0)
# Maildir info flags (https://cr.yp.to/proto/maildir.html) and mbox Status/X-Status letters.
MAILDIR_FLAGS = {
    "D": "\\Draft",
    "F": "\\Flagged",
    "R": "\\Answered",
    "S": "\\Seen",
    "T": "\\Deleted",
}
MBOX_FLAGS = {"R": "\\Seen", "A": "\\Answered", "F": "\\Flagged", "D": "\\Deleted", "T": "\\Draft"}
FLAGS_TO_MAILDIR = {v: k for k, v in MAILDIR_FLAGS.items()}
FLAGS_TO_MBOX = {v: k for k, v in MBOX_FLAGS.items()}


class ImportError_(Exception):
    """The source cannot be read (the message says which and why)."""


@dataclass(frozen=True)
class SourceMessage:
    key: int  # ascending within a folder: the position, or the IMAP UID
    raw: bytes
    flags: tuple[str, ...]
    date: datetime.datetime | None


class Source(Protocol):
    ident: str  # stable across runs: where the progress record is kept

    def folders(self) -> list[str]: ...
    def validity(self, folder: str) -> int: ...
    def count(self, folder: str) -> int: ...
    def messages(self, folder: str, after: int) -> Iterator[SourceMessage]: ...
    def close(self) -> None: ...


def _mailbox_keys(box: mailbox.mbox) -> list[str]:
    return list(box.keys())


class MboxSource:
    def __init__(self, path: Path, folder: str = INBOX) -> None:
        self.path = path
        self.folder = folder
        self.ident = f"mbox {path.resolve()}"
        self._box = mailbox.mbox(path, create=False)
        self._keys = _mailbox_keys(self._box)

    def folders(self) -> list[str]:
        return [self.folder]

    def validity(self, folder: str) -> int:
        return 0

    def count(self, folder: str) -> int:
        return len(self._keys)

    def messages(self, folder: str, after: int) -> Iterator[SourceMessage]:
        for position, key in enumerate(self._keys, start=1):
            if position <= after:
                continue
            message = self._box[key]
            raw = self._box.get_bytes(key)
            flags = tuple(MBOX_FLAGS[f] for f in message.get_flags() if f in MBOX_FLAGS)
            yield SourceMessage(position, raw, flags, _from_line_date(message.get_from()))

    def close(self) -> None:
        self._box.close()


def _from_line_date(from_line: str) -> datetime.datetime | None:
    """The date of an mbox ``From `` line (asctime, as written by MTAs), if it parses."""
    parts = from_line.split()
    for start in range(1, len(parts)):
        try:
            moment = datetime.datetime.strptime(
                " ".join(parts[start : start + 5]), "%a %b %d %H:%M:%S %Y"
            )
        except ValueError:
            continue
        return moment.replace(tzinfo=datetime.UTC)
    return None


class MaildirSource:
    """A Maildir, and its Maildir++ sub-folders (``.Work.Projects`` → ``Work/Projects``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ident = f"maildir {path.resolve()}"
        self._root = mailbox.Maildir(path, factory=None, create=False)
        self._cache: dict[str, tuple[mailbox.Maildir, list[str]]] = {}

    def _folder(self, folder: str) -> tuple[mailbox.Maildir, list[str]]:
        if folder not in self._cache:
            box = self._root if folder == INBOX else self._root.get_folder(folder.replace("/", "."))
            # Delivery time, then name: a stable order, as Dovecot assigns UIDs.
            keys = sorted(box.keys(), key=lambda k: (box.get_message(k).get_date(), k))
            self._cache[folder] = (box, keys)
        return self._cache[folder]

    def folders(self) -> list[str]:
        return [INBOX, *sorted(name.replace(".", "/") for name in self._root.list_folders())]

    def validity(self, folder: str) -> int:
        return 0

    def count(self, folder: str) -> int:
        return len(self._folder(folder)[1])

    def messages(self, folder: str, after: int) -> Iterator[SourceMessage]:
        box, keys = self._folder(folder)
        for position, key in enumerate(keys, start=1):
            if position <= after:
                continue
            message = box.get_message(key)
            flags = tuple(MAILDIR_FLAGS[f] for f in message.get_flags() if f in MAILDIR_FLAGS)
            date = datetime.datetime.fromtimestamp(message.get_date(), datetime.UTC)
            yield SourceMessage(position, box.get_bytes(key), flags, date)

    def close(self) -> None:
        return None


_LIST = re.compile(rb'\((?P<attrs>[^)]*)\) (?:"(?P<delim>[^"]*)"|NIL) (?P<name>.+)$')
_FETCH_META = re.compile(rb"UID (\d+)|FLAGS \(([^)]*)\)|INTERNALDATE \"([^\"]+)\"")


class IMAPSource:
    """Another IMAP server (RFC 9051/3501): every selectable folder, read-only (EXAMINE)."""

    def __init__(self, url: str, password: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("imap", "imaps") or not parts.hostname or not parts.username:
            raise ImportError_("an IMAP source is imap://USER@HOST[:PORT] or imaps://…")
        host = parts.hostname
        self.ident = f"imap {parts.username}@{host}:{parts.port or ''}"
        context = ssl.create_default_context()
        try:
            if parts.scheme == "imaps":
                self._imap: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                    host, parts.port or 993, ssl_context=context, timeout=IMAP_TIMEOUT_SECONDS
                )
            else:
                self._imap = imaplib.IMAP4(host, parts.port or 143, timeout=IMAP_TIMEOUT_SECONDS)
                if "STARTTLS" in self._imap.capabilities:
                    self._imap.starttls(ssl_context=context)
                elif not _is_loopback(host):
                    raise ImportError_(f"{host} offers no STARTTLS: the password would go in clear")
            self._login(urllib.parse.unquote(parts.username), password)
        except (OSError, imaplib.IMAP4.error) as e:
            raise ImportError_(f"{host}: {e}") from None
        self._folders: dict[str, str] = {}  # our name → the server's (mUTF-7) name
        self._selected: str | None = None
        self._validity: dict[str, int] = {}

    def _login(self, user: str, password: str) -> None:
        """LOGIN, tried again after a pause when the server says its failure is temporary
        (RFC 5530 ``[UNAVAILABLE]``: a busy or restarting authentication service), as a
        client should; any other refusal is final."""
        for pause in (*LOGIN_RETRY_PAUSES, None):
            try:
                self._imap.login(user, password)
                return
            except imaplib.IMAP4.error as e:
                if pause is None or b"[UNAVAILABLE]" not in str(e).encode():
                    raise
                time.sleep(pause)

    def folders(self) -> list[str]:
        status, lines = self._imap.list()
        if status != "OK":
            raise ImportError_("LIST failed")
        for line in lines:
            if not isinstance(line, bytes):
                continue
            m = _LIST.match(line)
            if m is None or b"\\noselect" in m.group("attrs").lower():
                continue
            wire = m.group("name").decode().strip('"')
            delim = (m.group("delim") or b"/").decode()
            name = utf7.decode(wire)
            name = INBOX if name.upper() == INBOX else name.replace(delim, "/")
            self._folders[name] = wire
        return sorted(self._folders, key=lambda n: (n != INBOX, n))

    def _select(self, folder: str) -> None:
        if self._selected == folder:
            return
        status, _ = self._imap.select(f'"{self._folders[folder]}"', readonly=True)
        if status != "OK":
            raise ImportError_(f"cannot EXAMINE {folder}")
        validity = self._imap.response("UIDVALIDITY")[1]
        self._validity[folder] = int(validity[0]) if validity and validity[0] else 0
        self._selected = folder

    def validity(self, folder: str) -> int:
        self._select(folder)
        return self._validity[folder]

    def _uids(self, folder: str, after: int) -> list[int]:
        self._select(folder)
        status, data = self._imap.uid("SEARCH", f"UID {after + 1}:*")
        if status != "OK":
            raise ImportError_(f"UID SEARCH failed in {folder}")
        return sorted(u for u in (int(x) for x in data[0].split()) if u > after)

    def count(self, folder: str) -> int:
        return len(self._uids(folder, 0))

    def messages(self, folder: str, after: int) -> Iterator[SourceMessage]:
        uids = self._uids(folder, after)
        for start in range(0, len(uids), FETCH_CHUNK):
            chunk = ",".join(str(u) for u in uids[start : start + FETCH_CHUNK])
            status, data = self._imap.uid("FETCH", chunk, "(UID FLAGS INTERNALDATE BODY.PEEK[])")
            if status != "OK":
                raise ImportError_(f"UID FETCH failed in {folder}")
            found = []
            for item in data:
                if not isinstance(item, tuple):
                    continue
                meta, raw = item
                uid, date = 0, None
                flags: tuple[str, ...] = ()
                for m in _FETCH_META.finditer(meta):
                    if m.group(1):
                        uid = int(m.group(1))
                    elif m.group(2) is not None:
                        flags = tuple(
                            f for f in m.group(2).decode().split() if f.lower() != "\\recent"
                        )
                    elif m.group(3):
                        date = _internaldate(m.group(3))
                found.append(SourceMessage(uid, raw, flags, date))
            yield from sorted(found, key=lambda s: s.key)

    def close(self) -> None:
        try:
            self._imap.logout()
        except (OSError, imaplib.IMAP4.error):
            pass


def _internaldate(text: bytes) -> datetime.datetime | None:
    try:
        return datetime.datetime.strptime(text.decode(), "%d-%b-%Y %H:%M:%S %z")
    except ValueError:
        return None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def open_source(spec: str, password: str | None = None, folder: str = INBOX) -> Source:
    if spec.startswith(("imap://", "imaps://")):
        if password is None:
            raise ImportError_("an IMAP source needs its password")
        return IMAPSource(spec, password)
    path = Path(spec.removeprefix("mbox:").removeprefix("maildir:"))
    if spec.startswith("maildir:") or (path / "cur").is_dir():
        return MaildirSource(path)
    if path.is_file():
        return MboxSource(path, folder)
    raise ImportError_(f"{spec}: not an mbox file, a Maildir or an imap:// URL")


@dataclass
class ImportResult:
    imported: int = 0
    skipped: int = 0  # already imported by an earlier run
    folders: int = 0


_Item = tuple[bytes, tuple[str, ...], datetime.datetime | None]


def _folder_id(box: Mailbox, name: str) -> int:
    try:
        return box.folder(name).id
    except NoSuchFolder:
        try:
            return box.create_folder(name).id
        except FolderExists:
            return box.folder(name).id


def import_into(
    box: Mailbox, source: Source, progress: Callable[[int], None] | None = None
) -> ImportResult:
    """Copy every folder of ``source`` into ``box``, continuing an earlier run."""
    blob = PROGRESS_BLOB + hashlib.sha256(source.ident.encode()).hexdigest()[:32]
    stored = box.get_blob(blob)
    state: dict[str, list[int]] = json.loads(stored) if stored else {}
    result = ImportResult()

    def store(target: int, folder: str, validity: int, last: int, batch: list[_Item]) -> None:
        if not batch:
            return
        box.append_many(target, batch)
        state[folder] = [validity, last]
        box.set_blob(blob, json.dumps(state).encode())
        result.imported += len(batch)
        if progress is not None:
            progress(len(batch))

    for folder in source.folders():
        validity = source.validity(folder)
        done_validity, done = state.get(folder, [validity, 0])
        if done_validity != validity:
            done = 0  # the source renumbered the folder (RFC 9051 §2.3.1.1): start over
        result.folders += 1
        result.skipped += done if validity == 0 else 0
        target = _folder_id(box, folder)
        batch: list[_Item] = []
        size = 0
        last = done
        for message in source.messages(folder, done):
            batch.append((message.raw, message.flags, message.date))
            size += len(message.raw)
            last = message.key
            if len(batch) >= IMPORT_BATCH or size >= IMPORT_BATCH_BYTES:
                store(target, folder, validity, last, batch)
                batch, size = [], 0
        store(target, folder, validity, last, batch)
    return result
