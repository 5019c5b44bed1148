"""Reading what the targets hold: snapshot summaries, manifests, the files of a point in time.

Also the small status file (``backup/status.json``) that ``doctor`` and ``/metrics`` read:
the last snapshot and the last verified restore, as :func:`last_backup` and
:func:`last_verified_restore`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postvern.backup import keys
from postvern.backup.manifest import (
    BODY_PREFIX,
    HEADER_PREFIX,
    FileEntry,
    Header,
    Manifest,
    ManifestError,
    ObjectInfo,
    Opening,
    Summary,
)
from postvern.backup.snapshot import State
from postvern.backup.targets import Target

STATUS_FILE = "status.json"


@dataclass
class Point:
    """The effective content of one snapshot: a full one, or a delta over its full base."""

    summary: Summary
    files: dict[str, FileEntry]
    objects: dict[str, ObjectInfo]
    keys: dict[str, bytes]
    schema: dict[str, int]
    header: Header
    manifests: list[Manifest]


class Catalog:
    """The snapshots of one target, as one key holder sees them."""

    def __init__(self, target: Target, opening: Opening) -> None:
        self.target = target
        self.opening = opening
        self._headers: dict[str, Header] = {}
        self._manifests: dict[str, Manifest] = {}

    def header(self, sid: str) -> Header:
        if sid not in self._headers:
            data = self.target.get(HEADER_PREFIX + sid)
            self._headers[sid] = self.opening.read_header(data, sid)
        return self._headers[sid]

    def summaries(self) -> tuple[list[Summary], list[str]]:
        """Every snapshot, oldest first, and the problems met (a header that fails to verify)."""
        found: list[Summary] = []
        problems: list[str] = []
        for name in self.target.list(HEADER_PREFIX):
            sid = name[len(HEADER_PREFIX) :]
            try:
                found.append(self.opening.summary(self.header(sid)))
            except ManifestError as e:
                problems.append(str(e))
        found.sort(key=lambda s: s.created)
        return found, problems

    def manifest(self, sid: str) -> Manifest:
        if sid not in self._manifests:
            header = self.header(sid)
            self._manifests[sid] = self.opening.body(header, self.target.get(BODY_PREFIX + sid))
        return self._manifests[sid]

    def point(self, sid: str) -> Point:
        manifest = self.manifest(sid)
        chain = [manifest]
        files = dict(manifest.files)
        objects = dict(manifest.objects)
        all_keys = dict(manifest.keys)
        if manifest.kind == "delta":
            if manifest.base is None:
                raise ManifestError(f"b/{sid}: a delta without a base")
            base = self.manifest(manifest.base)
            chain.insert(0, base)
            files = {r: e for r, e in base.files.items() if r not in manifest.deleted}
            files.update(manifest.files)
            objects = {**base.objects, **manifest.objects}
            all_keys = {**base.keys, **manifest.keys}
        schema = chain[0].schema | manifest.schema
        summary = Summary(manifest.id, manifest.created, manifest.kind, manifest.base)
        return Point(summary, files, objects, all_keys, schema, self.header(sid), chain)

    def at(self, when: float | None) -> Point:
        """The newest snapshot taken at or before ``when`` (None: the newest)."""
        summaries, _ = self.summaries()
        chosen = [s for s in summaries if when is None or s.created <= when]
        if not chosen:
            raise ManifestError("no snapshot at or before that time")
        return self.point(chosen[-1].id)

    def state(self) -> State:
        """What the next snapshot builds on (empty when the target holds none)."""
        summaries, _ = self.summaries()
        if not summaries:
            return State()
        latest = self.point(summaries[-1].id)
        base = latest.manifests[0]
        return State(
            files=latest.files,
            objects=latest.objects,
            keys=latest.keys,
            base=base if base.kind == "full" else None,
            last_id=latest.summary.id,
            last_created=latest.summary.created,
        )


# -- status for doctor and /metrics ---------------------------------------------------


def _status_path(data_dir: Path) -> Path:
    return data_dir / keys.BACKUP_DIR / STATUS_FILE


def read_status(data_dir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(_status_path(data_dir).read_text()))
    except (FileNotFoundError, ValueError):
        return {}


def record(data_dir: Path, **values: Any) -> None:
    """Merge ``values`` into the status file (atomic replace; no names, no sizes of users)."""
    status = read_status(data_dir)
    status.update(values)
    path = _status_path(data_dir)
    keys.backup_dir(data_dir)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(status, f)
    os.replace(tmp, path)


@dataclass(frozen=True)
class BackupStatus:
    when: float | None  # epoch seconds of the last success, None if never
    ok: bool  # whether the last attempt succeeded
    detail: str  # the snapshot id, or the last error


def last_backup(data_dir: Path) -> BackupStatus:
    """The last snapshot: for ``postvern doctor`` ("the last backup")."""
    s = read_status(data_dir)
    return BackupStatus(s.get("backup_at"), bool(s.get("backup_ok", False)), s.get("backup", ""))


def last_verified_restore(data_dir: Path) -> BackupStatus:
    """The last ``verify`` (a full test restore): for ``postvern doctor``."""
    s = read_status(data_dir)
    return BackupStatus(s.get("verify_at"), bool(s.get("verify_ok", False)), s.get("verify", ""))


def now() -> float:
    return time.time()
