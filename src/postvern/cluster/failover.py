"""Bringing a dead mailbox node's users back on another node from their replicas.

Every mailbox node replicates its data directory to object storage continuously
(backup/replicate.py, its ``[backup] targets``; nodes.toml names that place as the node's
``replica``). When a node is gone, ``postvern cluster failover`` (admin.py) asks a surviving
node, user by user, to ``RESTORE <user-id> <replica-url>`` (move.py): the node reads the dead
node's newest replication point with the shared server key and writes the user's encrypted
mailbox and sealed spool into its own data directory, through backup/restore.py's per-user
path. The map then names the new node, and the fronts send it every copy the replica may
lack: they kept each copy the dead node acknowledged until its replication covered it
(relay.py), and a copy sent twice is stored once (its delivery id, store/spool.py).

This side is blocking (object storage, files): it runs in a worker thread.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from postvern.backup.catalog import Catalog, Point
from postvern.backup.manifest import ManifestError, Opening
from postvern.backup.restore import RestoreError, RestoreReport, materialise, restore_user
from postvern.backup.snapshot import MAILBOX_DIR, SPOOL_DIR
from postvern.backup.targets import TargetError, Targets
from postvern.crypto.serverkey import ServerKey
from postvern.durable import fsync_dir

# One failover restores many users from the same replica: its newest point is read once and
# reused this long (a newer point only holds more, and the fronts fill in the rest anyway).
POINT_REUSE_SECONDS = 60.0


class FailoverError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Restored:
    files: int
    bytes: int
    point_created: float


class ReplicaReader:
    """Restores single users from a dead node's replica into this node's data directory."""

    def __init__(self, data_dir: Path, server_key: ServerKey) -> None:
        self.data_dir = data_dir
        self.server_key = server_key
        self._points: dict[str, tuple[float, Catalog, Point]] = {}
        self._lock = threading.Lock()

    def _newest(self, url: str) -> tuple[Catalog, Point]:
        with self._lock:
            cached = self._points.get(url)
            if cached is not None and time.monotonic() - cached[0] < POINT_REUSE_SECONDS:
                return cached[1], cached[2]
            try:
                target = Targets.from_urls([url]).targets[0]
                catalog = Catalog(target, Opening(server_key=self.server_key))
                point = catalog.at(None)
            except (ManifestError, TargetError, ValueError) as e:
                raise FailoverError(f"the replica cannot be read: {e}") from None
            self._points[url] = (time.monotonic(), catalog, point)
            return catalog, point

    def restore(self, url: str, user_id: str) -> Restored:
        """The user's mailbox and spool as the replica's newest point has them. A user with
        no file there (never delivered to before that point) gets nothing: the fronts bring
        all of their mail."""
        if not user_id.isalnum():
            raise FailoverError("bad user id")
        if (self.data_dir / MAILBOX_DIR / f"{user_id}.sqlite").exists():
            raise FailoverError("this node already has a mailbox for the user")
        catalog, point = self._newest(url)
        created = point.summary.created
        if f"{MAILBOX_DIR}/{user_id}.sqlite" in point.files:
            try:
                report = restore_user(catalog, point, self.data_dir, user_id, keep_current=False)
            except RestoreError as e:
                raise FailoverError(str(e)) from None
        else:
            report = _spool_only(catalog, point, self.data_dir, user_id)
        if report.problems:
            raise FailoverError("; ".join(report.problems[:3]))
        # The node answers OK, and the map is switched, only once the files' names are
        # durable too (restore.py renames them into place).
        for folder in (self.data_dir / MAILBOX_DIR, self.data_dir / SPOOL_DIR / user_id):
            if folder.is_dir():
                fsync_dir(folder)
        return Restored(report.files, report.bytes, created)


def _spool_only(catalog: Catalog, point: Point, data_dir: Path, user_id: str) -> RestoreReport:
    """A user with spooled mail but no mailbox file yet: the segments, staged then moved in."""
    prefix = f"{SPOOL_DIR}/{user_id}/"
    staging = data_dir / "backup" / "tmp" / f"failover-{user_id}-{time.time_ns()}"
    staging.mkdir(parents=True, mode=0o700)
    try:
        report = materialise(
            catalog,
            point,
            staging,
            wanted=lambda rel: rel.startswith(prefix) and not (data_dir / rel).exists(),
        )
        if not report.problems:
            for rel in sorted(point.files):
                if rel.startswith(prefix) and (staging / rel).exists():
                    target = data_dir / rel
                    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                    os.replace(staging / rel, target)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)
