"""A real IMAP client against the server: mbsync (isync) syncs a mailbox down to a Maildir and
a flag change and a new message back up, over implicit TLS and over STARTTLS.

The data directory's certificate names mx.example.test (and 127.0.0.1, but isync 1.4 checks
only DNS names, and trusts a CertificateFile entry without a name check only when it is not
a CA certificate). So mbsync reaches the server through ``Tunnel`` (a byte relay to the
loopback port) with ``Host mx.example.test``: it still runs TLS itself and verifies the
certificate and the host name against CertificateFile, exactly as it would in production.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest

from postvern.store.mailbox import INBOX
from test_imap_session import ALICE, Env, env, in_thread, message, ok

__all__ = ["env"]  # the fixture, shared with test_imap_session

MBSYNC = "/usr/bin/mbsync"

# stdin/stdout ↔ a TCP port: what ``nc`` would do, which this machine does not have.
RELAY = """\
import socket, sys, threading
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def up():
    while data := sys.stdin.buffer.read1(65536):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := sock.recv(65536):
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
"""

CONFIG = """\
IMAPAccount test
Host mx.example.test
Tunnel "{python} {relay} {port}"
User {user}
Pass "{password}"
SSLType {tls}
CertificateFile {cert}
SystemCertificates no
AuthMechs LOGIN PLAIN

IMAPStore remote
Account test

MaildirStore local
Path {maildir}/
Inbox {maildir}/INBOX
SubFolders Verbatim

Channel sync
Far :remote:
Near :local:
Patterns *
Create Both
Expunge Both
SyncState *
"""


def lf(raw: bytes) -> bytes:
    """Maildir keeps LF line endings; mbsync converts on the way down."""
    return raw.replace(b"\r\n", b"\n")


def mbsync(home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MBSYNC, "--config", str(home / ".mbsyncrc"), "--all"],
        env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def maildir_messages(folder: Path) -> dict[Path, bytes]:
    """Each message file, less the X-TUID header mbsync adds to find its copies again."""
    return {
        p: re.sub(rb"(?m)^X-TUID: [^\n]*\n", b"", p.read_bytes())
        for sub in ("cur", "new")
        for p in (folder / sub).glob("*")
    }


async def server_folder(env: Env, name: str) -> list[tuple[tuple[str, ...], bytes]]:
    """(flags, raw) of every message in a folder, through a handle of our own."""
    logged = await env.svc.login.login(ALICE, env.password(ALICE), "127.0.0.1", "test")
    try:
        box = logged.mailbox.box
        folder = await logged.mailbox.run(box.folder, name)
        infos = await logged.mailbox.run(box.messages, folder.id)
        return [(m.flags, await logged.mailbox.run(box.raw, folder.id, m.uid)) for m in infos]
    finally:
        await logged.mailbox.release()


@pytest.mark.parametrize("tls", ["IMAPS", "STARTTLS"])
async def test_mbsync_syncs_down_and_up(env: Env, tmp_path: Path, tls: str) -> None:
    down = [message(f"sync {i}", f"Body number {i}.") for i in range(3)]
    for raw in down:
        await env.deliver(ALICE, raw)
    work = message("work item", "Quarterly numbers.")

    def prepare() -> None:
        client = env.client()
        ok(client.create("Work"))
        ok(client.append("Work", "(\\Seen)", None, work))
        client.select(INBOX)
        ok(client.store("2", "+FLAGS", "(\\Seen)"))
        client.logout()

    await in_thread(prepare)
    home = tmp_path / "home"
    maildir = home / "mail"
    maildir.mkdir(parents=True)
    (home / "relay.py").write_text(RELAY)
    (home / ".mbsyncrc").write_text(
        CONFIG.format(
            python=sys.executable,
            relay=home / "relay.py",
            port=env.tls_port if tls == "IMAPS" else env.port,
            user=ALICE,
            password=env.password(ALICE),
            tls=tls,
            cert=env.data.path / "tls" / "cert.pem",
            maildir=maildir,
        )
    )

    result = await asyncio.to_thread(mbsync, home)
    assert result.returncode == 0, result.stderr

    inbox = maildir_messages(maildir / "INBOX")
    assert sorted(inbox.values()) == sorted(lf(raw) for raw in down)
    seen = [p for p, raw in inbox.items() if raw == lf(down[1])]
    assert seen and seen[0].name.endswith("S")  # \Seen became the Maildir S flag
    assert list(maildir_messages(maildir / "Work").values()) == [lf(work)]

    # A flag change and a new message, made locally, go back up.
    flagged = next(p for p, raw in inbox.items() if raw == lf(down[0]))
    flagged.rename(flagged.with_name(flagged.name.split(":2,")[0] + ":2,F"))
    new = message("written offline", "Uploaded by mbsync.")
    (maildir / "INBOX" / "new" / "1700000000.1_1.localhost").write_bytes(lf(new))

    result = await asyncio.to_thread(mbsync, home)
    assert result.returncode == 0, result.stderr

    on_server = await server_folder(env, INBOX)
    assert len(on_server) == 4
    by_subject = {raw.split(b"Subject: ")[1].split(b"\r\n")[0]: flags for flags, raw in on_server}
    assert "\\Flagged" in by_subject[b"sync 0"]
    assert "\\Seen" in by_subject[b"sync 1"]
    assert b"written offline" in by_subject
    uploaded = next(raw for _, raw in on_server if b"written offline" in raw)
    assert b"Uploaded by mbsync." in uploaded
