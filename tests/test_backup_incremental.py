"""Incremental by content and retention (issue #18, layer 2)."""

from __future__ import annotations

import datetime
from pathlib import Path

from backup_kit import append, deposit, message
from harness import DataDir, make_data_dir
from postvern.app import App
from postvern.backup import keys, retention
from postvern.backup.catalog import Catalog
from postvern.backup.manifest import Summary
from postvern.backup.service import BackupService
from postvern.backup.targets import Targets

DAY = 86400.0


def _service(data: DataDir, targets: list[str]) -> tuple[App, BackupService]:
    app = data.app()
    _offline, public = keys.generate(app.server_key)
    keys.save_public(data.path, public)
    return app, BackupService(
        data.path, app.settings, app.server_key, targets=Targets.from_urls(targets)
    )


def test_unchanged_mailboxes_are_not_uploaded_again(tmp_path: Path, seaweed) -> None:  # type: ignore[no-untyped-def]
    passwords = {f"user{i}@example.test": f"password-number-{i}" for i in range(30)}
    data = make_data_dir(tmp_path / "data", passwords=passwords)
    for address in passwords:
        append(data, address, [message(f"{address}-{n}", 30_000) for n in range(4)])
    a, _b = seaweed
    app, service = _service(data, [str(tmp_path / "local"), a.url("incremental")])
    try:
        full = service.run("full")
        assert full is not None
        # One mailbox of thirty changes (3%): the next full snapshot uploads that mailbox's
        # changed pieces and a manifest, not the rest.
        append(data, "user7@example.test", [message("one-more", 30_000)])
        again = service.run("full")
        assert again is not None
        assert again.files_read <= 4  # the changed mailbox, and databases whose stat moved
        assert again.uploaded_bytes < full.uploaded_bytes * 0.1
        nothing = service.run("delta")
        assert nothing is None  # nothing changed: no replication point is written
        deposit(data, "user3@example.test", message("late-arrival"))
        delta = service.run("delta")
        assert delta is not None and delta.manifest.kind == "delta"
        assert list(delta.manifest.files) == [
            f for f in delta.manifest.files if f.startswith("spool/")
        ]
        report = service.verify()
        assert report.ok, report.problems
    finally:
        app.close()


def _summary(n: int, created: float, kind: str = "full", base: str | None = None) -> Summary:
    return Summary(f"s{n}", created, kind, base)


def test_retention_keeps_seven_daily_four_weekly_twelve_monthly() -> None:
    now = datetime.datetime(2026, 12, 7, 12, tzinfo=datetime.UTC).timestamp()
    fulls = [_summary(n, now - n * DAY) for n in range(400)]
    keep = retention.choose(fulls, now, retention.Policy())
    days = sorted(int(s[1:]) for s in keep)
    assert days[:7] == list(range(7))
    # 7 daily + weekly and monthly ones beyond them, never more than 7 + 4 + 12.
    assert 7 + 3 <= len(keep) <= 7 + 4 + 12
    assert max(days) > 300  # a monthly one from most of a year ago
    assert max(days) < 400


def test_retention_never_drops_the_last_good_or_a_kept_deltas_base() -> None:
    now = datetime.datetime(2026, 12, 7, 12, tzinfo=datetime.UTC).timestamp()
    summaries = [
        _summary(1, now - 30 * DAY),  # the last one that verified
        _summary(2, now - 2 * DAY),
        _summary(3, now - 600, "delta", "s2"),
        _summary(4, now - 100, "full"),
        _summary(5, now - 60 * DAY + 5, "delta", "s9"),
    ]
    policy = retention.Policy(daily=1, weekly=0, monthly=0)
    keep = retention.choose(summaries, now, policy, last_good="s1")
    assert {"s1", "s4"} <= keep
    assert "s3" not in keep or "s2" in keep
    assert "s5" not in keep


def test_prune_removes_old_snapshots_and_their_objects_only(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path / "data")
    local = tmp_path / "local"
    app, service = _service(data, [str(local)])
    try:
        for n in range(3):
            append(data, "alice@example.test", [message(f"round-{n}", 50_000)])
            assert service.run("full") is not None
        # All three are from today: the daily rule keeps the newest only (and what verified).
        catalog = Catalog(service.targets.targets[0], service.opening())
        summaries, _ = catalog.summaries()
        assert len(summaries) == 1
        objects_now = set(service.targets.targets[0].list("o/"))
        latest = catalog.point(summaries[0].id)
        assert {p.obj for e in latest.files.values() for p in e.pieces} == objects_now
        assert service.verify().ok
    finally:
        app.close()
