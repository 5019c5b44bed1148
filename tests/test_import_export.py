"""``postvern import`` from mbox, Maildir and a real Dovecot over IMAP; ``postvern export``
(issue #18, layer 5). Folders, flags and dates survive; a second run imports only what is new.
"""

from __future__ import annotations

import datetime
import mailbox
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_kit import postvern
from harness import DataDir, free_port, make_data_dir
from postvern.store.mailbox import Mailbox

ALICE = "alice@example.test"
DOVECOT = "/usr/sbin/dovecot"
DOVE_USER, DOVE_PASSWORD = "carol", "carol-dovecot-secret"
NOBODY = 65534

DOVECOT_CONF = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 1
mail_location = maildir:{root}/home/%n/Maildir
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={uid} home={root}/home/%n
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""


def _msg(subject: str, day: int) -> bytes:
    return (
        f"From: someone@example.net\r\nTo: carol@example.net\r\nSubject: {subject}\r\n"
        f"Date: Mon, {day:02d} Nov 2026 10:00:00 +0000\r\n\r\nbody of {subject}\r\n"
    ).encode()


def _write_maildir(root: Path, folders: dict[str, list[tuple[bytes, str, int]]]) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    box = mailbox.Maildir(root, create=True)
    for name, items in folders.items():
        target = box if name == "INBOX" else box.add_folder(name)
        for raw, flags, day in items:
            m = mailbox.MaildirMessage(raw)
            m.set_subdir("cur")
            m.set_flags(flags)
            m.set_date(datetime.datetime(2026, 11, day, 10, tzinfo=datetime.UTC).timestamp())
            target.add(m)


def _contents(data: DataDir, address: str) -> dict[str, list[tuple[str, tuple[str, ...], str]]]:
    """folder → [(subject, flags, internal date)] in UID order."""
    app = data.app()
    try:
        unlocked = app.accounts.authenticate(address, data.passwords[address])
        with Mailbox.open(app.accounts.mailbox_path(unlocked.user), unlocked.mailbox_key) as box:
            out = {}
            for folder in box.folders():
                rows = []
                for info in box.messages(folder.id):
                    raw = box.raw(folder.id, info.uid)
                    subject = raw.split(b"Subject: ")[1].split(b"\n")[0].strip().decode()
                    rows.append((subject, info.flags, info.internaldate.date().isoformat()))
                if rows:
                    out[folder.name] = rows
            return out
    finally:
        app.close()


def _import(data: DataDir, source: str, *extra: str, secrets: list[str] | None = None):  # type: ignore[no-untyped-def]
    lines = [data.passwords[ALICE], *(secrets or [])]
    return postvern(
        "--data", str(data.path), "import", ALICE, source, "--password-stdin", *extra,
        stdin="\n".join(lines) + "\n",
    )  # fmt: skip


@pytest.fixture
def dovecot() -> Iterator[tuple[int, Path]]:
    if not os.path.exists(DOVECOT):
        pytest.fail("dovecot not installed: `make test` installs it (tools/install-system-deps)")
    # Dovecot reads the mail as an unprivileged user, who cannot enter pytest's 0700 tmp.
    base = Path(tempfile.mkdtemp(prefix="postvern-dovecot-"))
    base.chmod(0o755)
    maildir = base / "home" / DOVE_USER / "Maildir"
    _write_maildir(
        maildir,
        {
            "INBOX": [(_msg("inbox one", 1), "S", 1), (_msg("inbox two", 2), "FR", 2)],
            "Work": [(_msg("work plan", 3), "S", 3)],
            "Work.Projects": [(_msg("project x", 4), "", 4)],
        },
    )
    port = free_port()
    (base / "passwd").write_text(f"{DOVE_USER}:{{PLAIN}}{DOVE_PASSWORD}::::::\n")
    # Read by Dovecot's auth process, which runs as its own user: whatever the umask.
    (base / "passwd").chmod(0o644)
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(base / "home")], check=True)
    (base / "dovecot.conf").write_text(DOVECOT_CONF.format(root=base, uid=NOBODY, port=port))
    (base / "dovecot.conf").chmod(0o644)
    proc = subprocess.Popen(
        [DOVECOT, "-F", "-c", str(base / "dovecot.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("dovecot did not start: " + (base / "dovecot.log").read_text()[-2000:])
            time.sleep(0.1)
    try:
        yield port, maildir
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def test_import_from_dovecot_over_imap_keeps_folders_flags_dates_and_resumes(
    tmp_path: Path, dovecot: tuple[int, Path]
) -> None:
    port, maildir = dovecot
    data = make_data_dir(tmp_path / "data")
    url = f"imap://{DOVE_USER}@127.0.0.1:{port}"
    first = _import(data, url, secrets=[DOVE_PASSWORD])
    assert first.returncode == 0, first.stderr
    assert "imported 4 message(s)" in first.stdout
    got = _contents(data, ALICE)
    assert got["INBOX"] == [
        ("inbox one", ("\\Seen",), "2026-11-01"),
        ("inbox two", ("\\Answered", "\\Flagged"), "2026-11-02"),
    ]
    assert got["Work"] == [("work plan", ("\\Seen",), "2026-11-03")]
    assert got["Work/Projects"] == [("project x", (), "2026-11-04")]

    # Resumable: the same import again brings nothing twice; new mail at the source comes.
    again = _import(data, url, secrets=[DOVE_PASSWORD])
    assert again.returncode == 0 and "imported 0 message(s)" in again.stdout, again.stdout
    _write_maildir(maildir, {"INBOX": [(_msg("inbox three", 5), "S", 5)]})
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(maildir)], check=True)
    third = _import(data, url, secrets=[DOVE_PASSWORD])
    assert "imported 1 message(s)" in third.stdout, third.stdout + third.stderr
    assert [s for s, _f, _d in _contents(data, ALICE)["INBOX"]] == [
        "inbox one",
        "inbox two",
        "inbox three",
    ]

    wrong = _import(data, url, secrets=["not-the-password"])
    assert wrong.returncode == 1 and wrong.stderr.startswith("postvern: ")


def test_maildir_and_mbox_import_and_export_round_trip(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path / "data")
    source = tmp_path / "old-maildir"
    _write_maildir(
        source,
        {"INBOX": [(_msg("md one", 6), "S", 6)], "Archive.2025": [(_msg("md old", 7), "F", 7)]},
    )
    assert _import(data, str(source)).returncode == 0
    mbox_path = tmp_path / "old.mbox"
    out = mailbox.mbox(mbox_path)
    m = mailbox.mboxMessage(_msg("mbox one", 8))
    m.set_from(
        "someone@example.net",
        time.gmtime(datetime.datetime(2026, 11, 8, 9, tzinfo=datetime.UTC).timestamp()),
    )
    m.set_flags("RA")
    out.add(m)
    out.close()
    done = _import(data, str(mbox_path), "--folder", "Imported")
    assert done.returncode == 0 and "imported 1" in done.stdout, done.stderr
    got = _contents(data, ALICE)
    assert got["INBOX"] == [("md one", ("\\Seen",), "2026-11-06")]
    assert got["Archive/2025"] == [("md old", ("\\Flagged",), "2026-11-07")]
    assert got["Imported"] == [("mbox one", ("\\Answered", "\\Seen"), "2026-11-08")]

    for fmt in ("maildir", "mbox"):
        dest = tmp_path / f"export-{fmt}"
        exported = postvern(
            "--data", str(data.path), "export", ALICE, "--to", str(dest), "--format", fmt,
            "--password-stdin", stdin=data.passwords[ALICE] + "\n",
        )  # fmt: skip
        assert exported.returncode == 0, exported.stderr
        assert "exported 3 message(s)" in exported.stdout
        assert dest.stat().st_mode & 0o077 == 0
    # The exported Maildir imports into a fresh account with the same folders and flags.
    other = make_data_dir(tmp_path / "other")
    assert _import(other, str(tmp_path / "export-maildir")).returncode == 0
    assert _contents(other, ALICE) == got
    exported_mbox = mailbox.mbox(tmp_path / "export-mbox" / "Imported.mbox")
    (only,) = list(exported_mbox)
    assert set(only.get_flags()) >= {"R", "A"}
    shutil.rmtree(tmp_path / "export-mbox")
