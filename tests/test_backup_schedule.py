"""The server tests its own restores (issue #18): the scheduled verify reports in /metrics,
mails the postmaster when a stored object is damaged, and the next snapshots heal it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from backup_kit import configure, init_key, metrics
from harness import DataDir, ServerProcess, mailbox_messages, make_data_dir

ALICE = "alice@example.test"
DEADLINE_SECONDS = 90.0


def _status(data: DataDir) -> dict[str, object]:
    try:
        return dict(json.loads((data.path / "backup" / "status.json").read_text()))
    except (FileNotFoundError, ValueError):
        return {}


def _wait(data: DataDir, what: str, check) -> dict[str, object]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        status = _status(data)
        if check(status):
            return status
        assert time.monotonic() < deadline, f"waited in vain for {what}: {status}"
        time.sleep(0.2)


def test_scheduled_verify_reports_alerts_and_heals(tmp_path: Path) -> None:
    data = make_data_dir(
        tmp_path / "data",
        passwords={ALICE: "alice-correct-horse"},
        listeners=("https", "smtp"),
    )
    target = tmp_path / "region"
    # A test restore every 2 s instead of weekly, replication every second.
    configure(data, [str(target)], replicate_seconds=1.0, verify_interval_hours=2 / 3600)
    init_key(data, tmp_path / "offline.key")
    server = ServerProcess(data).start()
    try:
        first = _wait(data, "a verified backup", lambda s: s.get("verify_ok") is True)
        scraped = metrics(data)
        assert scraped["postvern_backup_last_verify_ok"] == 1
        assert 0 <= scraped["postvern_backup_replication_lag_seconds"] < 60
        assert scraped["postvern_backup_last_success_timestamp"] > 0

        # Damage every stored data object, as a failing disk in the region would.
        for obj in (target / "o").iterdir():
            blob = bytearray(obj.read_bytes())
            blob[len(blob) // 2] ^= 0xFF
            obj.write_bytes(bytes(blob))
        failed = _wait(
            data,
            "a failed verify",
            lambda s: s.get("verify_ok") is False and s.get("verify_at") != first["verify_at"],
        )
        assert "hash mismatch" in str(failed["verify"])
        assert metrics(data)["postvern_backup_verify_failures_total"] >= 1
        # The damaged objects are no longer trusted: the next snapshot stores those pieces
        # anew, and the next test restore passes again.
        _wait(
            data,
            "a verify that passes again",
            lambda s: s.get("verify_ok") is True and s.get("verify_at") != failed["verify_at"],
        )
    finally:
        server.stop()
    subjects = [
        m.split(b"\r\nSubject: ", 1)[1].split(b"\r\n", 1)[0] for m in mailbox_messages(data, ALICE)
    ]
    assert b"Backup verification FAILED" in subjects
