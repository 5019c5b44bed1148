"""The sealed spool: durable deposit, and import exactly once across crashes at every step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from harness import DataDir
from postvern.store import faults
from postvern.store.mailbox import Mailbox
from postvern.store.spool import IMPORT_BATCH, Spool, SpoolItem

ALICE = "alice@example.test"

IMPORT_SCRIPT = """
import sys
from pathlib import Path
from postvern.app import App
from postvern.store.mailbox import Mailbox
from postvern.store.spool import import_spool
app = App.open(Path(sys.argv[1]))
unlocked = app.accounts.authenticate(sys.argv[2], sys.argv[3])
box = Mailbox.open(app.accounts.mailbox_path(unlocked.user), unlocked.mailbox_key)
print(len(import_spool(box, app.accounts.spool, unlocked.user.id)))
"""

CRASH_POINTS = [
    "spool.before-insert",
    "store.append.before-commit",
    "spool.after-commit",
    "spool.after-unlink",
    "spool.after-fsync",
]


def run_import(data: DataDir, crash_at: str | None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop(faults.ENV_VAR, None)
    if crash_at:
        env[faults.ENV_VAR] = crash_at
    return subprocess.run(
        [sys.executable, "-c", IMPORT_SCRIPT, str(data.path), ALICE, data.passwords[ALICE]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def subjects(data: DataDir) -> list[str]:
    app = data.app()
    try:
        unlocked = app.accounts.authenticate(ALICE, data.passwords[ALICE])
        with Mailbox.open(app.accounts.mailbox_path(unlocked.user), unlocked.mailbox_key) as box:
            out = []
            for folder in box.folders():
                for uid in box.uids(folder.id):
                    first = box.raw(folder.id, uid).split(b"\r\n", 1)[0]
                    out.append(first.decode())
            return sorted(out)
    finally:
        app.close()


def deposit(data: DataDir, count: int) -> list[str]:
    app = data.app()
    try:
        user = app.directory.user(ALICE)
        spool = Spool(data.path)
        names = [f"Subject: spooled {i:04d}" for i in range(count)]
        for i, name in enumerate(names):
            use = "\\Junk" if i % 7 == 3 else None
            spool.deposit(
                user.id, user.spool_public, SpoolItem(f"{name}\r\n\r\nbody {i}\r\n".encode(), use)
            )
        return sorted(names)
    finally:
        app.close()


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_during_import_loses_and_duplicates_nothing(data_dir: DataDir, point: str) -> None:
    # More than one batch, so a crash can land between batches as well as inside one.
    expected = deposit(data_dir, IMPORT_BATCH + 6)
    crashed = run_import(data_dir, point)
    assert crashed.returncode == faults.CRASH_EXIT_CODE, crashed.stderr
    resumed = run_import(data_dir, None)
    assert resumed.returncode == 0, resumed.stderr
    assert subjects(data_dir) == expected
    assert Spool(data_dir.path).pending(data_dir.app().directory.user(ALICE).id) == []
    # a third import finds nothing to do
    assert run_import(data_dir, None).stdout.strip() == "0"


def test_deposit_is_durable_and_private(data_dir: DataDir) -> None:
    deposit(data_dir, 3)
    spool_dir = next((data_dir.path / "spool").iterdir())
    files = sorted(spool_dir.iterdir())
    assert len(files) == 3
    for f in files:
        assert f.stat().st_mode & 0o077 == 0
        assert b"spooled" not in f.read_bytes()
    assert spool_dir.stat().st_mode & 0o077 == 0


def test_leftover_temp_and_tampered_files(data_dir: DataDir) -> None:
    deposit(data_dir, 2)
    spool_dir = next((data_dir.path / "spool").iterdir())
    (spool_dir / ".tmp-00000000000000000001-dead").write_bytes(b"partial")
    victim = sorted(spool_dir.glob("*.sealed"))[0]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = run_import(data_dir, None)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"
    assert not list(spool_dir.glob(".tmp-*"))
    assert [p.name for p in (spool_dir / "unreadable").iterdir()] == [victim.name]
