"""Whatever the caller's umask, what postvern writes is its own: files 0600, folders 0700.

The commands run as a real subprocess started with the common umask 022 (which would make
every new file 0644); init, user add, the server and a delivery all write into the data
directory, which is then walked.
"""

from __future__ import annotations

import dataclasses
import imaplib
import smtplib
import stat
from email.message import EmailMessage
from pathlib import Path

from cli_kit import postvern, running
from dnsserver import DNSTestServer
from harness import TEST_KDF, client_tls_context, free_ports, set_config
from postvern import config

CALLER_UMASK = 0o022
ALICE = "alice@example.test"
PASSWORD = "alice-long-password"


def message(subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "someone@sender.test"
    msg["To"] = ALICE
    msg["Subject"] = subject
    msg.set_content("Private.")
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def deliver(smtp: tuple[str, int], subject: str) -> None:
    with smtplib.SMTP(*smtp, timeout=60) as s:
        s.starttls(context=client_tls_context())
        s.ehlo("mail.sender.test")
        assert s.sendmail("someone@sender.test", [ALICE], message(subject)) == {}


def test_everything_written_is_private_whatever_the_umask(
    tmp_path: Path, dns_server: DNSTestServer
) -> None:
    data = tmp_path / "data"
    r = postvern(
        "--data", str(data), "init", "--hostname", "mx.example.test", "--domain", "example.test",
        "--clamd", "none", umask=CALLER_UMASK,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    set_config(data, "kdf", TEST_KDF)
    listen = free_ports(["smtp", "imaps"])
    every = [f.name for f in dataclasses.fields(config.Listen)]
    set_config(data, "listen", {name: listen.get(name) for name in every})
    set_config(data, "dns", {"nameservers": [dns_server.nameserver]})
    r = postvern(
        "--data", str(data), "user", "add", ALICE, "--password-stdin",
        stdin=f"{PASSWORD}\n{PASSWORD}\n", umask=CALLER_UMASK,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr

    smtp = config.parse_hostport(listen["smtp"])
    with running(data, "serve", umask=CALLER_UMASK):
        deliver(smtp, "while away")  # sealed into the spool
        imaps = config.parse_hostport(listen["imaps"])
        with imaplib.IMAP4_SSL(*imaps, ssl_context=client_tls_context()) as imap:
            imap.login(ALICE, PASSWORD)  # opens the mailbox, imports the spool
            imap.select("INBOX")
            deliver(smtp, "while logged in")  # straight into the open mailbox
            imap.noop()
            assert imap.search(None, "ALL")[1][0].split() == [b"1", b"2"]

    paths = [data, *data.rglob("*")]
    names = {p.relative_to(data).as_posix() for p in paths}
    assert {"postvern.toml", "server.key", "tls/cert.pem", "queue.sqlite"} <= names
    assert any(name.startswith("mailboxes/") for name in names)
    modes = {
        p.relative_to(data).as_posix(): (p.is_dir(), stat.S_IMODE(p.stat().st_mode)) for p in paths
    }
    open_to_others = {name: oct(mode) for name, (_, mode) in modes.items() if mode & 0o077}
    assert open_to_others == {}
    folders_not_700 = {name: oct(mode) for name, (d, mode) in modes.items() if d and mode != 0o700}
    assert folders_not_700 == {}
