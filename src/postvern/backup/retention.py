"""Retention: which snapshots to keep, and pruning the rest safely.

Full snapshots are kept grandfather-father-son: the newest of each of the last ``daily``
days, ``weekly`` ISO weeks and ``monthly`` months that have one (7, 4 and 12 by default).
Replication points (deltas) are kept for ``points_hours`` (48 by default — "the mail as it
was at 09:00 yesterday"): every one from the last hour, then the newest of each hour, and
only while their full base is kept. Never pruned: the newest snapshot, the newest full one,
and the last one that verified.

Pruning deletes headers first (a snapshot without a header does not exist), then bodies,
then the objects no kept snapshot references. It runs under the same lock as snapshots, so
it never deletes an object a snapshot in progress is about to reference.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from postvern.backup.catalog import Catalog
from postvern.backup.manifest import BODY_PREFIX, HEADER_PREFIX, OBJECT_PREFIX, Summary

HOUR = 3600.0
KEEP_ALL_POINTS_SECONDS = HOUR


@dataclass(frozen=True)
class Policy:
    daily: int = 7
    weekly: int = 4
    monthly: int = 12
    points_hours: float = 48.0


def _day(s: Summary) -> tuple[int, ...]:
    d = datetime.datetime.fromtimestamp(s.created, datetime.UTC)
    return (d.year, d.month, d.day)


def _week(s: Summary) -> tuple[int, ...]:
    iso = datetime.datetime.fromtimestamp(s.created, datetime.UTC).isocalendar()
    return (iso.year, iso.week)


def _month(s: Summary) -> tuple[int, ...]:
    d = datetime.datetime.fromtimestamp(s.created, datetime.UTC)
    return (d.year, d.month)


def choose(
    summaries: list[Summary], now: float, policy: Policy, last_good: str | None = None
) -> set[str]:
    """The ids to keep."""
    if not summaries:
        return set()
    newest_first = sorted(summaries, key=lambda s: s.created, reverse=True)
    fulls = [s for s in newest_first if s.kind == "full"]
    keep: set[str] = {newest_first[0].id}
    if fulls:
        keep.add(fulls[0].id)
    for bucket, count in ((_day, policy.daily), (_week, policy.weekly), (_month, policy.monthly)):
        seen: list[tuple[int, ...]] = []
        for s in fulls:
            key = bucket(s)
            if key in seen:
                continue
            if len(seen) >= count:
                break
            seen.append(key)
            keep.add(s.id)
    if last_good is not None and any(s.id == last_good for s in summaries):
        keep.add(last_good)
    hours_seen: set[int] = set()
    for s in newest_first:
        if s.kind != "delta" or s.base not in keep:
            continue
        age = now - s.created
        if age <= KEEP_ALL_POINTS_SECONDS:
            keep.add(s.id)
        elif age <= policy.points_hours * HOUR:
            hour = int(s.created // HOUR)
            if hour not in hours_seen:
                hours_seen.add(hour)
                keep.add(s.id)
    # A kept delta needs its base, whatever the rules above said.
    keep |= {s.base for s in summaries if s.id in keep and s.base is not None}
    return keep


@dataclass
class PruneResult:
    snapshots: int
    objects: int


def prune(catalog: Catalog, keep: set[str]) -> tuple[PruneResult, set[str]]:
    """Delete every snapshot not in ``keep`` from one target; (counts, deleted object names)."""
    summaries, _problems = catalog.summaries()
    if not keep & {s.id for s in summaries}:
        # Never empty a target: whatever went wrong in choosing, keep what is there.
        return PruneResult(0, 0), set()
    dropped = [s.id for s in summaries if s.id not in keep]
    target = catalog.target
    referenced: set[str] = set()
    for sid in keep:
        if any(s.id == sid for s in summaries):
            manifest = catalog.manifest(sid)
            referenced |= set(manifest.objects)
    target.delete([HEADER_PREFIX + sid for sid in dropped])
    target.delete([BODY_PREFIX + sid for sid in dropped])
    headers = {n[len(HEADER_PREFIX) :] for n in target.list(HEADER_PREFIX)}
    orphan_bodies = [n for n in target.list(BODY_PREFIX) if n[len(BODY_PREFIX) :] not in headers]
    target.delete(orphan_bodies)
    garbage = {n for n in target.list(OBJECT_PREFIX) if n not in referenced}
    target.delete(sorted(garbage))
    return PruneResult(len(dropped), len(garbage)), garbage
