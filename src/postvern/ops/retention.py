"""Log retention: a random key per day for the pseudonyms, daily log files, and their end.

Each UTC day gets a fresh 256-bit key (``logs/keys/YYYY-MM-DD.key`` in the data directory);
:mod:`postvern.ops.logs` turns every client network and account in that day's lines into a
keyed pseudonym under it. The key is not derived from anything: once its file is removed,
``retention_days`` after its day, nobody — the administrator included — can tell whose a
pseudonym of that day was, so the lines that may still exist elsewhere (a copy, journald)
name no one. Within the window, ``postvern logs search --ip ADDR --day D`` recomputes the
pseudonym with that day's key and finds the lines.

With ``[log] directory`` set, the server also writes its lines to ``postvern-YYYY-MM-DD.log``
there and removes files past retention; without it, lines go to stderr only and the service
manager's own retention applies (the Ansible role sets journald's to the same period).

Several processes of one server share the directory: a day's key is created with ``link(2)``
(the first process wins, the others read its key) and log lines are appended with
``O_APPEND``, which keeps each line whole.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from postvern import config
from postvern.ops import logs

KEY_DIR = "logs/keys"
KEY_BYTES = 32
LOG_NAME = "postvern-{day}.log"
_DAY_FILE = re.compile(r"(?:postvern-)?(\d{4}-\d{2}-\d{2})\.(?:key|log)$")


class RetentionError(Exception):
    """A day outside the retention window (its key is gone) or a malformed day."""


def utc_day(epoch: float) -> datetime.date:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).date()


def parse_day(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise RetentionError(f"{text!r}: expected a day as YYYY-MM-DD") from None


class DailyKeys:
    """The pseudonym key of each day, created on first use, destroyed after retention."""

    def __init__(
        self, directory: Path, retention_days: int, clock: Callable[[], float] = time.time
    ) -> None:
        self.directory = directory
        self.retention_days = retention_days
        self._clock = clock
        self._cache: dict[datetime.date, bytes] = {}

    def _path(self, day: datetime.date) -> Path:
        return self.directory / f"{day.isoformat()}.key"

    def expired(self, day: datetime.date) -> bool:
        return day < utc_day(self._clock()) - datetime.timedelta(days=self.retention_days)

    def key(self, day: datetime.date) -> bytes:
        """The key of ``day``, made now if this is the first line of the day (logging)."""
        found = self._cache.get(day)
        if found is not None:
            return found
        path = self._path(day)
        try:
            found = path.read_bytes()
        except FileNotFoundError:
            found = self._create(path)
        self.prune()  # a new day for this process: the oldest key may be due
        if len(self._cache) > 2:  # today and yesterday are all a running server needs
            self._cache.clear()
        self._cache[day] = found
        return found

    def existing(self, day: datetime.date) -> bytes:
        """The key of a past day, for a search; RetentionError when it is gone."""
        try:
            return self._path(day).read_bytes()
        except FileNotFoundError:
            raise RetentionError(
                f"no pseudonym key for {day}: keys are destroyed {self.retention_days} days"
                " after their day (or nothing was logged then), so its lines name no one"
            ) from None

    def _create(self, path: Path) -> bytes:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = secrets.token_bytes(KEY_BYTES)
        temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)  # fails if another process made the day's key first
        except FileExistsError:
            key = path.read_bytes()
        finally:
            os.unlink(temp)
        return key

    def prune(self) -> list[Path]:
        """Remove the keys of days past retention; returns what was removed."""
        return _prune(self.directory, self.expired)


def _prune(directory: Path, expired: Callable[[datetime.date], bool]) -> list[Path]:
    removed: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return removed
    for path in entries:
        match = _DAY_FILE.match(path.name)
        if match is None:
            continue
        try:
            day = datetime.date.fromisoformat(match.group(1))
        except ValueError:
            continue
        if expired(day):
            # Unlinking is what we can do: on a journaling file system or an SSD the blocks
            # may survive until reused, which is why the data directory's disk should be
            # encrypted too (docs/security.md).
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class DailyFileHandler(logging.Handler):
    """Appends each line to the file of its UTC day; prunes old files when the day turns."""

    def __init__(self, directory: Path, keys: DailyKeys) -> None:
        super().__init__()
        self.directory = directory
        self.keys = keys
        self._day: datetime.date | None = None
        self._fd: int | None = None
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode("utf-8", "replace")
            day = utc_day(record.created)
            if day != self._day or self._fd is None:
                self._open(day)
            assert self._fd is not None
            os.write(self._fd, line)
        except Exception:
            self.handleError(record)

    def _open(self, day: datetime.date) -> None:
        if self._fd is not None:
            os.close(self._fd)
        path = self.directory / LOG_NAME.format(day=day.isoformat())
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._day = day
        self.prune()

    def prune(self) -> list[Path]:
        return _prune(self.directory, self.keys.expired) + self.keys.prune()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        super().close()


def log_file(directory: Path, day: datetime.date) -> Path:
    return directory / LOG_NAME.format(day=day.isoformat())


def matching(lines: Iterable[str], needles: list[str]) -> Iterator[str]:
    """Lines naming any of the pseudonyms, as text (``ip=P``) or JSON (``"ip": "P"``)."""
    for line in lines:
        if any(n in line for n in needles):
            yield line


def configure(settings: config.Settings) -> DailyKeys:
    """The server's logging as ``[log]`` describes it: daily keys, stderr, daily files."""
    s = settings.log
    keys = DailyKeys(settings.path(KEY_DIR), s.retention_days)
    keys.prune()
    extra: list[logging.Handler] = []
    if s.directory:
        extra.append(DailyFileHandler(settings.path(s.directory), keys))
    logs.configure(
        s.level, keys.key, anonymise=s.anonymise, json_lines=s.format == "json", extra=extra
    )
    return keys


def search(
    settings: config.Settings,
    day: datetime.date,
    *,
    ips: Iterable[str] = (),
    accounts: Iterable[str] = (),
    lines: Iterable[str] | None = None,
) -> Iterator[str]:
    """That day's lines about the given clients: read from the day's file under ``[log]
    directory``, or from ``lines`` (``journalctl -o cat | postvern logs search …``)."""
    keys = DailyKeys(settings.path(KEY_DIR), settings.log.retention_days)
    if keys.expired(day):
        raise RetentionError(f"{day} is past the {keys.retention_days}-day retention period")
    key = keys.existing(day)
    needles = [f"ip={logs.pseudonym(key, 'ip', ip)}" for ip in ips]
    needles += [f'"ip": "{logs.pseudonym(key, "ip", ip)}"' for ip in ips]
    for account in accounts:
        name = logs.pseudonym(key, "account", account)
        needles += [f"account={name}", f'"account": "{name}"']
    if lines is None:
        if not settings.log.directory:
            raise RetentionError("no [log] directory: pipe the day's lines in (journalctl -o cat)")
        path = log_file(settings.path(settings.log.directory), day)
        try:
            with path.open(encoding="utf-8", errors="replace") as f:
                yield from (line.rstrip("\n") for line in matching(f, needles))
        except FileNotFoundError:
            raise RetentionError(f"no log file for {day} ({path})") from None
        return
    yield from (line.rstrip("\n") for line in matching(lines, needles))
