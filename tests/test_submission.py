"""Submission on 465 (implicit TLS) and 587 (STARTTLS): AUTH, sender ownership, signing."""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
from collections.abc import Iterator

import pytest

from dnsserver import DNSTestServer
from harness import (
    DataDir,
    ServerProcess,
    client_tls_context,
    mailbox_messages,
    make_data_dir,
    set_config,
)
from postvern.crypto.tls import TLS12_CIPHERS
from postvern.emailauth import dkim

ALICE, BOB = "alice@example.test", "bob@example.test"


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSTestServer]:
    with DNSTestServer() as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, dns: DNSTestServer) -> Iterator[DataDir]:
    data = make_data_dir(tmp_path_factory.mktemp("sub") / "data")
    set_config(data.path, "dns", {"nameservers": [dns.nameserver]})
    app = data.app()
    try:
        app.directory.add_alias("team@example.test", [ALICE])
        data.passwords["app"] = app.accounts.add_app_password(ALICE, data.passwords[ALICE], "t")
        for key in app.directory.dkim_keys("example.test"):
            dns.add(
                f"{key.selector}._domainkey.example.test", "TXT", dkim.key_record(key.private_key)
            )
    finally:
        app.close()
    with ServerProcess(data):
        yield data


def submit(data: DataDir, user: str, password: str, sender: str, rcpts: list[str], raw: bytes):
    host, port = data.addr("submissions")
    with smtplib.SMTP_SSL(host, port, context=client_tls_context(), timeout=30) as s:
        s.login(user, password)
        return s.sendmail(sender, rcpts, raw)


def msg(sender: str, subject: str) -> bytes:
    return f"From: {sender}\r\nTo: {BOB}\r\nSubject: {subject}\r\n\r\nHi Bob.\r\n".encode()


def test_auth_refused_before_tls(server: DataDir) -> None:
    host, port = server.addr("submission")
    with socket.create_connection((host, port), timeout=10) as sock:
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b"EHLO client.test\r\n")
        ehlo = []
        while True:
            line = f.readline()
            ehlo.append(line)
            if line[3:4] == b" ":
                break
        assert not any(b"AUTH" in line for line in ehlo)  # not even advertised
        token = base64.b64encode(f"\0{ALICE}\0{server.passwords[ALICE]}".encode())
        sock.sendall(b"AUTH PLAIN " + token + b"\r\n")
        assert f.readline().startswith(b"538 5.7.11")
    # after STARTTLS it works on 587
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.starttls(context=client_tls_context())
        assert s.login(ALICE, server.passwords[ALICE])[0] == 235


def test_submit_locally_signed_and_private(server: DataDir, dns: DNSTestServer) -> None:
    submit(server, ALICE, server.passwords[ALICE], ALICE, [BOB], msg(ALICE, "from alice"))
    (got,) = [m for m in mailbox_messages(server, BOB) if b"Subject: from alice" in m]
    assert got.count(b"DKIM-Signature:") == 2
    assert b"Received: from submission.invalid\r\n" in got and b"127.0.0.1" not in got
    assert b"Message-ID: <" in got and b"Date: " in got  # completed by the MSA
    body = got[got.index(b"DKIM-Signature:") :]
    import asyncio

    results = asyncio.run(dkim.verify(body, dns.resolver()))
    assert sorted(r.status.value for r in results) == ["pass", "pass"], results
    assert {r.algorithm for r in results} == {"rsa-sha256", "ed25519-sha256"}


def test_app_password_and_alias_sender(server: DataDir) -> None:
    submit(
        server,
        ALICE,
        server.passwords["app"],
        "team@example.test",
        [BOB],
        msg("Team <team@example.test>", "as team"),
    )
    assert any(b"Subject: as team" in m for m in mailbox_messages(server, BOB))


def test_wrong_password(server: DataDir) -> None:
    with pytest.raises(smtplib.SMTPAuthenticationError) as e:
        submit(server, ALICE, "wrong-password", ALICE, [BOB], msg(ALICE, "x"))
    assert e.value.smtp_code == 535


def test_cannot_send_as_someone_else(server: DataDir) -> None:
    with pytest.raises(smtplib.SMTPSenderRefused) as e:
        submit(server, ALICE, server.passwords[ALICE], BOB, [BOB], msg(BOB, "spoof"))
    assert e.value.smtp_code == 550 and b"5.7.1" in e.value.smtp_error
    with pytest.raises(smtplib.SMTPDataError) as d:
        submit(server, ALICE, server.passwords[ALICE], ALICE, [BOB], msg(BOB, "header spoof"))
    assert d.value.smtp_code == 550 and b"From" in d.value.smtp_error
    with pytest.raises(smtplib.SMTPDataError):
        two = b"From: alice@example.test\r\nFrom: bob@example.test\r\n\r\nx\r\n"
        submit(server, ALICE, server.passwords[ALICE], ALICE, [BOB], two)


def test_mail_before_auth_refused(server: DataDir) -> None:
    host, port = server.addr("submissions")
    with smtplib.SMTP_SSL(host, port, context=client_tls_context(), timeout=30) as s:
        s.ehlo()
        code, text = s.mail(ALICE)
        assert code == 530 and text.startswith(b"5.7.0")


def test_tls_is_modern(server: DataDir) -> None:
    """TLS 1.2 gets a forward-secret AEAD suite; TLS 1.3 is preferred when offered."""
    host, port = server.addr("submissions")
    ctx = client_tls_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ALL:@SECLEVEL=0")  # offer everything, weak suites included
    with socket.create_connection((host, port), timeout=10) as sock:
        with ctx.wrap_socket(sock) as tls:
            name, version, _ = tls.cipher()
            assert version == "TLSv1.2"
            assert name in TLS12_CIPHERS.split(":")
    with socket.create_connection((host, port), timeout=10) as sock:
        with client_tls_context().wrap_socket(sock) as tls:
            assert tls.version() == "TLSv1.3"
