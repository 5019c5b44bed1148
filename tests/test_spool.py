"""The sealed spool: durable deposit, and import exactly once across crashes at every step."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from harness import DataDir, services
from postvern.store import faults
from postvern.store.mailbox import Mailbox
from postvern.store.spool import IMPORT_BATCH, Deposit, Spool, SpoolItem

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
    # the damaged item is set aside, sealed as it was, under its own id
    kept = [p.name for p in (spool_dir / "unreadable").iterdir()]
    assert kept == [victim.name.replace(".sealed", "-0.sealed")]


def test_a_batch_shares_one_segment_and_one_item_can_be_withdrawn(data_dir: DataDir) -> None:
    app = data_dir.app()
    try:
        alice = app.directory.user(ALICE)
        bob = app.directory.user("bob@example.test")
        assert alice is not None and bob is not None
        spool = Spool(data_dir.path)
        deposits = [
            Deposit(alice.id, alice.spool_public, SpoolItem(b"Subject: a0\r\n\r\nx\r\n")),
            Deposit(bob.id, bob.spool_public, SpoolItem(b"Subject: b0\r\n\r\nx\r\n")),
            Deposit(alice.id, alice.spool_public, SpoolItem(b"Subject: a1\r\n\r\nx\r\n")),
            Deposit(alice.id, alice.spool_public, SpoolItem(b"Subject: a2\r\n\r\nx\r\n")),
        ]
        ids = spool.deposit_batch(deposits)
        assert len(spool.pending(alice.id)) == 1 and len(spool.pending(bob.id)) == 1
        assert ids[0].partition("/")[0] == ids[2].partition("/")[0] == ids[3].partition("/")[0]
        spool.withdraw(alice.id, ids[2])
        assert spool.count(alice.id) == 2
    finally:
        app.close()
    assert run_import(data_dir, None).stdout.strip() == "2"
    assert subjects(data_dir) == ["Subject: a0", "Subject: a2"]


def test_concurrent_deliveries_are_group_committed(data_dir: DataDir) -> None:
    async def main() -> None:
        s = services(data_dir)
        try:
            alice = s.app.directory.user(ALICE)
            assert alice is not None
            items = [SpoolItem(f"Subject: c{i:03d}\r\n\r\nx\r\n".encode()) for i in range(60)]
            deliveries = [asyncio.ensure_future(s.registry.deliver(alice, i)) for i in items]
            # a login racing the deliveries waits for those in flight, then imports them
            await asyncio.sleep(0)
            logged = await s.login.login(ALICE, data_dir.passwords[ALICE], "127.0.0.1", "t")
            assert all(r in ("spool", "mailbox") for r in await asyncio.gather(*deliveries))
            box = logged.mailbox.box
            inbox = box.folder("INBOX")
            assert len(box.uids(inbox.id)) == 60
            await logged.mailbox.release()
        finally:
            await s.close()

    asyncio.run(main())
    assert subjects(data_dir) == [f"Subject: c{i:03d}" for i in range(60)]
