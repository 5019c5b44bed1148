"""One user's mailbox back to a point in time, nobody else touched (issue #18, layer 4)."""

from __future__ import annotations

import datetime
import hashlib
import time
from pathlib import Path

from backup_kit import append, configure, deposit, init_key, message, user_id
from cli_kit import postvern
from harness import mailbox_messages, make_data_dir
from postvern.store.mailbox import INBOX, Mailbox

ALICE = "alice@example.test"
BOB = "bob@example.test"


def _subjects(raws: list[bytes]) -> list[str]:
    return sorted(r.split(b"Subject: ")[1].split(b"\r\n")[0].decode() for r in raws)


def test_restore_one_users_mailbox_as_it_was(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path / "data")
    configure(data, [str(tmp_path / "region-a"), str(tmp_path / "region-b")])
    init_key(data, tmp_path / "offline.key")
    cli = ["--data", str(data.path), "backup"]

    append(data, ALICE, [message("a1"), message("a2")])
    assert postvern(*cli, "run").returncode == 0
    deposit(data, ALICE, message("a3"))
    deposit(data, BOB, message("b1"))
    run = postvern(*cli, "run", "--kind", "delta")
    assert run.returncode == 0 and "(delta)" in run.stdout, run.stdout + run.stderr
    time.sleep(1.1)  # the point to go back to lies strictly between two snapshots
    nine_oclock = datetime.datetime.now().astimezone().isoformat()
    time.sleep(1.1)

    # Later: Alice's mail is wiped out (a client gone wrong), Bob gets more mail.
    assert _subjects(mailbox_messages(data, ALICE)) == ["a1", "a2", "a3"]  # imports the spool
    app = data.app()
    try:
        unlocked = app.accounts.authenticate(ALICE, data.passwords[ALICE])
        with Mailbox.open(app.accounts.mailbox_path(unlocked.user), unlocked.mailbox_key) as box:
            inbox = box.folder(INBOX).id
            box.remove(inbox, box.uids(inbox))
    finally:
        app.close()
    deposit(data, BOB, message("b2"))
    assert postvern(*cli, "run", "--kind", "delta").returncode == 0
    assert mailbox_messages(data, ALICE) == []

    bob_box = data.path / "mailboxes" / f"{user_id(data, BOB)}.sqlite"
    bob_spool = sorted((data.path / "spool" / user_id(data, BOB)).glob("*.sealed"))
    before = hashlib.sha256(bob_box.read_bytes()).hexdigest()

    restored = postvern(*cli, "restore", "--user", ALICE, "--at", nine_oclock)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert _subjects(mailbox_messages(data, ALICE)) == ["a1", "a2", "a3"]
    # Bob: not a byte of his mailbox or spool changed.
    assert hashlib.sha256(bob_box.read_bytes()).hexdigest() == before
    assert sorted((data.path / "spool" / user_id(data, BOB)).glob("*.sealed")) == bob_spool
    assert _subjects(mailbox_messages(data, BOB)) == ["b1", "b2"]
    # The mailbox as it was before the restore is kept beside it, not destroyed.
    assert list((data.path / "mailboxes").glob(f"{user_id(data, ALICE)}.sqlite.before-restore-*"))
