"""The operations behind ``postvern backup …`` and the server's task, on one data directory.

One lock (``backup/lock``, flock) serialises snapshots, pruning and restores between the CLI
and the server. A running server also holds ``backup/serving`` shared for its lifetime, so
the CLI can tell that the server is there: a snapshot taken from outside the server could
not hold the registry's per-user locks (see :mod:`postvern.backup.snapshot`), so the CLI
refuses and leaves snapshots to the server.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from postvern import config
from postvern.backup import catalog, keys, retention
from postvern.backup.catalog import Catalog
from postvern.backup.manifest import Opening
from postvern.backup.snapshot import Guard, Result, Snapshotter
from postvern.backup.targets import Targets
from postvern.backup.verify import VerifyReport, verify
from postvern.crypto.serverkey import ServerKey

if TYPE_CHECKING:
    from postvern.directory.pg import PostgresTarget

LOCK_FILE = "lock"
# Replication points are thinned (retention) at least this often, not only at the daily
# full snapshot: a day of 15-second points would otherwise make listing slow.
PRUNE_INTERVAL_SECONDS = 3600.0
DAMAGED_OBJECT = re.compile(r"\bo/[0-9a-f]{32}\b")
SERVING_FILE = "serving"


class BackupBusy(Exception):
    """Another backup operation holds the lock, or the server is running."""


def server_root(data_dir: Path) -> bytes:
    """The server key's root secret, to seal it to the offline key (and nowhere else)."""
    return ServerKey.load(data_dir)._root


def policy(settings: config.Settings) -> retention.Policy:
    b = settings.backup
    return retention.Policy(b.keep_daily, b.keep_weekly, b.keep_monthly, b.keep_points_hours)


@contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            raise BackupBusy("another backup operation is running") from None
        yield
    finally:
        os.close(fd)


def server_running(data_dir: Path) -> bool:
    """Whether a server on ``data_dir`` holds ``backup/serving`` (it does while it runs)."""
    path = keys.backup_dir(data_dir) / SERVING_FILE
    try:
        with _flock(path, fcntl.LOCK_EX | fcntl.LOCK_NB):
            return False
    except BackupBusy:
        return True


class BackupService:
    def __init__(
        self,
        data_dir: Path,
        settings: config.Settings,
        server_key: ServerKey,
        *,
        targets: Targets | None = None,
        guard: Guard | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.settings = settings
        self.server_key = server_key
        self.targets = targets or Targets.from_urls(settings.backup.targets)
        self.guard = guard
        self._snapshotter: Snapshotter | None = None
        self._serving_fd: int | None = None

    # -- locks -------------------------------------------------------------------------

    @contextmanager
    def locked(self, *, wait: bool = True) -> Iterator[None]:
        mode = fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB)
        with _flock(keys.backup_dir(self.data_dir) / LOCK_FILE, mode):
            yield

    def mark_serving(self) -> None:
        fd = os.open(keys.backup_dir(self.data_dir) / SERVING_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._serving_fd = fd

    def unmark_serving(self) -> None:
        if self._serving_fd is not None:
            os.close(self._serving_fd)
            self._serving_fd = None

    def refuse_if_serving(self) -> None:
        if server_running(self.data_dir):
            raise BackupBusy(
                "the server is running and takes its own snapshots ([backup]); stop it to take"
                " one from the command line"
            )

    # -- operations --------------------------------------------------------------------

    def opening(self) -> Opening:
        return Opening(server_key=self.server_key)

    def directory_target(self) -> PostgresTarget | None:
        """The PostgreSQL directory, which snapshots export; None for the SQLite file."""
        if not self.settings.directory.url:
            return None
        from postvern.directory.pg import target_from_settings  # loads psycopg

        return target_from_settings(self.settings)

    def snapshotter(self) -> Snapshotter:
        if self._snapshotter is None:
            snap = Snapshotter(
                self.data_dir,
                self.server_key,
                server_root(self.data_dir),
                keys.load_public(self.data_dir),
                self.targets,
                self.guard,
                self.directory_target(),
            )
            snap.state = Catalog(self.targets.targets[0], self.opening()).state()
            self._snapshotter = snap
        return self._snapshotter

    def run(
        self, kind: str = "full", progress: Callable[[int], None] | None = None
    ) -> Result | None:
        """A snapshot to every target, then pruning; the status file says how it went."""
        started = catalog.now()
        try:
            result = self.snapshotter().take(kind, progress)
        except Exception as e:
            self._snapshotter = None  # start again from what the targets hold
            catalog.record(self.data_dir, backup_ok=False, backup=str(e)[:300])
            raise
        if result is not None:
            catalog.record(
                self.data_dir,
                backup_ok=True,
                backup_at=result.manifest.created,
                backup_started=started,  # what a restore of it holds: the RPO's reference
                backup=result.manifest.id,
                **({"full_at": result.manifest.created} if kind == "full" else {}),
            )
            pruned_at = float(catalog.read_status(self.data_dir).get("pruned_at") or 0)
            if kind == "full" or catalog.now() - pruned_at >= PRUNE_INTERVAL_SECONDS:
                self.prune()
                catalog.record(self.data_dir, pruned_at=catalog.now())
        return result

    def prune(self) -> int:
        status = catalog.read_status(self.data_dir)
        last_good = status.get("verify") if status.get("verify_ok") else None
        removed = 0
        for target in self.targets.targets:
            cat = Catalog(target, self.opening())
            summaries, _ = cat.summaries()
            keep = retention.choose(summaries, catalog.now(), policy(self.settings), last_good)
            result, deleted = retention.prune(cat, keep)
            removed += result.snapshots
            if self._snapshotter is not None and self._snapshotter.present is not None:
                self._snapshotter.present -= deleted
        return removed

    def verify(
        self, snapshot: str | None = None, progress: Callable[[int], None] | None = None
    ) -> VerifyReport:
        report = verify(
            self.data_dir,
            self.server_key,
            self.targets,
            snapshot,
            progress=progress,
            directory=self.directory_target(),
        )
        if report.problems and self._snapshotter is not None:
            # Objects named as damaged are no longer trusted: the next snapshot stores their
            # pieces anew instead of referencing them, and the backups heal themselves.
            damaged = set(DAMAGED_OBJECT.findall(" ".join(report.problems)))
            if self._snapshotter.present is not None:
                self._snapshotter.present -= damaged
        catalog.record(
            self.data_dir,
            verify_ok=report.ok,
            verify_at=catalog.now(),
            verify=report.snapshot if report.ok else "; ".join(report.problems)[:500],
        )
        return report
