"""Field-test defects of the SMTP listeners (issue #12), against a real `postvern serve`.

* Text pipelined behind a refused DATA never runs as commands: the client gets 421 and the
  connection closes (RFC 2920 §3.1), on the MX and on submission alike.
* Recipient address literals (RFC 5321 §4.1.3): ours is the primary domain, anyone else's is
  relaying (MX) or refused because the MTA does not route literals (submission).
* A refused attempt to send as someone else leaves a warning that names the account only by
  its pseudonym and the refused address only by its domain.
"""

from __future__ import annotations

import base64
import re
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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
from postvern.smtp.address import Address
from postvern.smtp.mx import names_this_host
from postvern.smtp.session import SessionState

ALICE, BOB = "alice@example.test", "bob@example.test"
WAIT_LIMIT = 30.0  # how long to wait for a log line (a bound, never asserted)


@dataclass
class Running:
    data: DataDir
    process: ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with DNSTestServer() as dns:
        data = make_data_dir(tmp_path_factory.mktemp("edges") / "data")
        set_config(data.path, "dns", {"nameservers": [dns.nameserver], "timeout": 2.0})
        with ServerProcess(data) as process:
            yield Running(data, process)


def wait_for_line(process: ServerProcess, test: Callable[[str], bool], after: int = 0) -> str:
    """The first line of the server's output from index ``after`` on that passes ``test``."""
    deadline = time.monotonic() + WAIT_LIMIT
    while time.monotonic() < deadline:
        for line in list(process.output)[after:]:
            if test(line):
                return line
        time.sleep(0.05)
    raise AssertionError("log line not found:\n" + "\n".join(process.output[-20:]))


class Conversation:
    """A raw SMTP client: send bytes exactly as given, read replies one at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")

    def reply(self) -> str:
        """The next complete reply's last line ("250 2.1.0 Sender OK"), "" once closed."""
        while True:
            try:
                line = self.file.readline()
            except (ConnectionError, ssl.SSLError):
                return ""
            if not line:
                return ""
            if line[3:4] != b"-":
                return line.decode().rstrip("\r\n")

    def command(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()


def mx_conversation(data: DataDir) -> Conversation:
    sock = socket.create_connection(data.addr("smtp"), timeout=30)
    talk = Conversation(sock)
    assert talk.reply().startswith("220")
    assert talk.command("EHLO client.test").startswith("250")
    return talk


def submission_conversation(data: DataDir) -> Conversation:
    raw = socket.create_connection(data.addr("submissions"), timeout=30)
    sock = client_tls_context().wrap_socket(raw)
    talk = Conversation(sock)
    assert talk.reply().startswith("220")
    assert talk.command("EHLO client.test").startswith("250")
    token = base64.b64encode(f"\0{ALICE}\0{data.passwords[ALICE]}".encode()).decode()
    assert talk.command(f"AUTH PLAIN {token}").startswith("235")
    return talk


# --- Pipelining behind a refused DATA (RFC 2920 §3.1) -----------------------------------------

INJECTED = "pipelined-behind-refused-data"


def refused_data_batch(sender: str) -> bytes:
    """A transaction whose only recipient is refused, with its text sent without waiting;
    the text holds commands that, run, would deliver a message to bob."""
    return (
        f"MAIL FROM:<{sender}>\r\n"
        "RCPT TO:<nobody@example.test>\r\n"
        "DATA\r\n"
        f"RCPT TO:<{BOB}>\r\n"
        "DATA\r\n"
        f"From: {sender}\r\nTo: {BOB}\r\nSubject: {INJECTED}\r\n\r\ninjected\r\n.\r\n"
        "QUIT\r\n"
    ).encode()


@pytest.mark.parametrize("listener", ["smtp", "submissions"])
def test_text_behind_a_refused_data_is_not_run_as_commands(server: Running, listener: str) -> None:
    start = len(server.process.output)
    if listener == "smtp":
        talk, sender = mx_conversation(server.data), "someone@sender.test"
    else:
        talk, sender = submission_conversation(server.data), ALICE
    with talk.sock:
        talk.sock.sendall(refused_data_batch(sender))
        replies = [talk.reply() for _ in range(3)]
        assert [r[:9] for r in replies] == ["250 2.1.0", "550 5.1.1", "421 4.5.0"]
        assert talk.reply() == ""  # closed: nothing behind the DATA was answered
    line = wait_for_line(
        server.process,
        lambda text: "bytes pipelined after DATA" in text and "discarded" in text,
        after=start,
    )
    assert INJECTED not in line and "bob" not in line
    assert not any(INJECTED.encode() in m for m in mailbox_messages(server.data, BOB))


def test_a_client_that_waits_after_a_refused_data_goes_on(server: Running) -> None:
    talk = mx_conversation(server.data)
    with talk.sock:
        # RFC 2920: MAIL, RCPT and DATA in one batch is proper pipelining.
        talk.sock.sendall(
            b"MAIL FROM:<someone@sender.test>\r\nRCPT TO:<nobody@example.test>\r\nDATA\r\n"
        )
        assert [talk.reply()[:9] for _ in range(3)] == ["250 2.1.0", "550 5.1.1", "554 5.5.1"]
        assert talk.command("RSET").startswith("250")
        assert talk.command("QUIT").startswith("221")


# --- Address literals (RFC 5321 §4.1.3) -------------------------------------------------------


def test_mx_accepts_a_literal_naming_this_server(server: Running) -> None:
    host, port = server.data.addr("smtp")
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail("someone@sender.test")
        assert s.docmd("RCPT", f"TO:<alice@[{host}]>")[0] == 250
        assert s.docmd("RCPT", f"TO:<Bob@[IPv6:::ffff:{host}]>")[0] == 250  # IPv4-mapped
        message = (
            f"From: someone@sender.test\r\nTo: alice@[{host}]\r\nSubject: to a literal\r\n"
            "\r\nHello.\r\n"
        )
        code, _ = s.data(message.encode())
        assert code == 250
    assert any(b"Subject: to a literal" in m for m in mailbox_messages(server.data, ALICE))
    assert any(b"Subject: to a literal" in m for m in mailbox_messages(server.data, BOB))


def test_mx_refuses_other_literals_as_relaying(server: Running) -> None:
    host, port = server.data.addr("smtp")
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail("someone@sender.test")
        for literal in ("[192.0.2.1]", "[IPv6:::1]", "[IPv6:2001:db8::1]", "[127.0.0.2]"):
            code, text = s.docmd("RCPT", f"TO:<alice@{literal}>")
            assert (code, text[:5]) == (550, b"5.7.1"), literal
        assert s.docmd("RCPT", "TO:<alice@[300.0.0.1]>")[0] == 501  # not an address


def test_submission_literals(server: Running) -> None:
    host, port = server.data.addr("submissions")
    with smtplib.SMTP_SSL(host, port, context=client_tls_context(), timeout=30) as s:
        s.login(ALICE, server.data.passwords[ALICE])
        s.mail(ALICE)
        assert s.docmd("RCPT", f"TO:<bob@[{host}]>")[0] == 250
        code, text = s.docmd("RCPT", "TO:<someone@[192.0.2.1]>")
        assert (code, text[:5]) == (550, b"5.1.2")  # the MTA does not route literals
        message = (
            f"From: {ALICE}\r\nTo: bob@[{host}]\r\nSubject: submitted to a literal\r\n\r\nx\r\n"
        )
        assert s.data(message.encode())[0] == 250
    assert any(b"Subject: submitted to a literal" in m for m in mailbox_messages(server.data, BOB))


@pytest.mark.parametrize(
    ("local_ip", "domain", "ours"),
    [
        ("::1", "[IPv6:::1]", True),
        ("::1", "[IPv6:0:0:0:0:0:0:0:1]", True),
        ("2001:db8::5", "[IPv6:2001:DB8::5]", True),
        ("::ffff:192.0.2.2", "[192.0.2.2]", True),  # an IPv4 client on a dual-stack socket
        ("192.0.2.2", "[IPv6:::ffff:192.0.2.2]", True),
        ("192.0.2.2", "[192.0.2.3]", False),
        ("::1", "[127.0.0.1]", False),
        ("192.0.2.2", "example.test", False),
    ],
)
def test_which_literals_name_this_host(local_ip: str, domain: str, ours: bool) -> None:
    state = SessionState("id", "198.51.100.7", 1, local_ip, 25, "mx.example.test")
    assert names_this_host(Address("alice", domain), state) is ours


# --- Refused sender addresses are logged (by domain, under a pseudonym) -----------------------


def spoofing_lines(process: ServerProcess, what: str, domain: str) -> str:
    return wait_for_line(
        process,
        lambda text: (
            "WARNING" in text
            and f"may not use this {what} (domain {domain})" in text
            and "account=" in text
        ),
    )


def test_refused_envelope_sender_is_logged_without_the_address(server: Running) -> None:
    host, port = server.data.addr("submissions")
    with smtplib.SMTP_SSL(host, port, context=client_tls_context(), timeout=30) as s:
        s.login(ALICE, server.data.passwords[ALICE])
        code, text = s.mail("ceo@spoofed-mail.test")
        assert (code, text[:5]) == (550, b"5.7.1")
    line = spoofing_lines(server.process, "envelope sender", "spoofed-mail.test")
    assert "ceo" not in line and "alice" not in line
    assert re.search(r"account=[0-9a-f]{12}\b", line)


def test_refused_from_header_is_logged_without_the_address(server: Running) -> None:
    host, port = server.data.addr("submissions")
    with smtplib.SMTP_SSL(host, port, context=client_tls_context(), timeout=30) as s:
        s.login(ALICE, server.data.passwords[ALICE])
        s.mail(ALICE)
        s.rcpt(BOB)
        message = f"From: The CEO <ceo@From-Spoof.test>\r\nTo: {BOB}\r\nSubject: x\r\n\r\nx\r\n"
        code, text = s.data(message.encode())
        assert (code, text[:5]) == (550, b"5.7.1")
    line = spoofing_lines(server.process, "From address", "from-spoof.test")
    assert "ceo" not in line.lower() and "alice" not in line
    assert re.search(r"account=[0-9a-f]{12}\b", line)
