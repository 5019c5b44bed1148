"""The MX end to end: a real `postvern serve`, a real DNS server, real SMTP clients.

Mail is sent with smtplib and swaks over STARTTLS to a server whose resolver is a loopback
DNS server serving the senders' SPF, DKIM and DMARC records; what arrived is read back by
logging in (which imports the sealed spool).
"""

from __future__ import annotations

import email.utils
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

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
from postvern.emailauth import dkim

ALICE, BOB = "alice@example.test", "bob@example.test"
RSA_KEY = dkim.generate_private_key("rsa-sha256")
ED_KEY = dkim.generate_private_key("ed25519-sha256")


def sender_zones(dns: DNSTestServer) -> None:
    dns.load(
        {
            "good.test": {"TXT": "v=spf1 ip4:127.0.0.1 -all"},
            "r1._domainkey.good.test": {"TXT": dkim.key_record(RSA_KEY)},
            "e1._domainkey.good.test": {"TXT": dkim.key_record(ED_KEY)},
            "_dmarc.good.test": {"TXT": "v=DMARC1; p=reject"},
            "softfail.test": {"TXT": "v=spf1 ~all"},
            "fail.test": {"TXT": "v=spf1 -all"},
            "_dmarc.fail.test": {"TXT": "v=DMARC1; p=none"},
            "reject.test": {"TXT": "v=spf1 -all"},
            "_dmarc.reject.test": {"TXT": "v=DMARC1; p=reject"},
            "quarantine.test": {"TXT": "v=spf1 -all"},
            "_dmarc.quarantine.test": {"TXT": "v=DMARC1; p=quarantine"},
            "temp.test": {"TXT": "v=spf1 include:broken.temp.test -all"},
            "_dmarc.temp.test": {"TXT": "v=DMARC1; p=reject"},
        }
    )
    dns.fail("broken.temp.test", mode="servfail")


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSTestServer]:
    with DNSTestServer() as server:
        sender_zones(server)
        yield server


@pytest.fixture(scope="module")
def mx(tmp_path_factory: pytest.TempPathFactory, dns: DNSTestServer) -> Iterator[DataDir]:
    data = make_data_dir(tmp_path_factory.mktemp("mx") / "data")
    set_config(data.path, "dns", {"nameservers": [dns.nameserver], "timeout": 2.0})
    set_config(
        data.path, "limits", {"message_size": 200_000, "recipients": 5, "auth_failure_delay": 0.05}
    )
    app = data.app()
    try:
        app.directory.add_alias("team@example.test", [ALICE, BOB])
        app.directory.add_alias("@example.test", [BOB])  # catch-all
    finally:
        app.close()
    with ServerProcess(data):
        yield data


def message(sender: str, subject: str, body: str = "Hello there.\r\n", extra: str = "") -> bytes:
    return (
        f"From: {sender}\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
        f"Date: {email.utils.formatdate()}\r\nMessage-ID: {email.utils.make_msgid()}\r\n"
        f"{extra}MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n{body}"
    ).encode()


def send(data: DataDir, sender: str, rcpts: list[str], raw: bytes) -> dict:
    host, port = data.addr("smtp")
    with smtplib.SMTP(host, port, local_hostname="client.good.test", timeout=30) as s:
        s.starttls(context=client_tls_context())
        return s.sendmail(sender, rcpts, raw)


def find(data: DataDir, address: str, subject: str, folder: str | None = None) -> bytes:
    for raw in mailbox_messages(data, address, folder):
        if f"Subject: {subject}\r\n".encode() in raw:
            return raw
    raise AssertionError(f"{subject!r} not in {address}'s {folder or 'mailbox'}")


def auth_results(raw: bytes) -> str:
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    fields = [f for f in head.replace("\r\n\t", " ").replace("\r\n ", " ").split("\r\n")]
    ours = [f for f in fields if f.lower().startswith("authentication-results: mx.example.test")]
    assert len(ours) == 1, fields
    return ours[0]


def test_spf_pass_dkim_rsa_and_ed25519_dmarc_pass(mx: DataDir) -> None:
    raw = message("Good <news@good.test>", "dual signed")
    signed = dkim.sign(raw, "good.test", "e1", ED_KEY, "ed25519-sha256") + raw
    signed = dkim.sign(signed, "good.test", "r1", RSA_KEY, "rsa-sha256") + signed
    send(mx, "news@good.test", [ALICE], signed)
    got = find(mx, ALICE, "dual signed")
    ar = auth_results(got)
    assert "spf=pass" in ar and "smtp.mailfrom=news@good.test" in ar
    assert ar.count("dkim=pass") == 2
    assert "header.a=rsa-sha256" in ar or "header.s=r1" in ar
    assert "header.s=e1" in ar
    assert "dmarc=pass" in ar and "header.from=good.test" in ar
    # trace fields: Return-Path, Delivered-To, Received with the TLS details
    assert got.startswith(b"Return-Path: <news@good.test>\r\nDelivered-To: alice@example.test\r\n")
    assert b"Received: from client.good.test ([127.0.0.1])\r\n\t(using TLSv1." in got
    assert b"by mx.example.test (Postvern) with ESMTPS id " in got
    assert got.endswith(signed)


def test_dkim_fail_when_tampered(mx: DataDir) -> None:
    raw = message("Good <news@good.test>", "tampered")
    signed = dkim.sign(raw, "good.test", "r1", RSA_KEY, "rsa-sha256") + raw
    send(mx, "news@good.test", [ALICE], signed.replace(b"Hello there.", b"Hello THERE."))
    ar = auth_results(find(mx, ALICE, "tampered"))
    assert "dkim=fail" in ar and "spf=pass" in ar and "dmarc=pass" in ar


def test_spf_softfail_and_fail(mx: DataDir) -> None:
    send(mx, "x@softfail.test", [ALICE], message("x@softfail.test", "soft"))
    assert "spf=softfail" in auth_results(find(mx, ALICE, "soft"))
    send(mx, "x@fail.test", [ALICE], message("x@fail.test", "hardfail"))
    ar = auth_results(find(mx, ALICE, "hardfail"))
    assert "spf=fail" in ar and "dmarc=fail" in ar


def test_dmarc_reject_quarantine_and_tempfail(mx: DataDir) -> None:
    with pytest.raises(smtplib.SMTPDataError) as e:
        send(mx, "x@reject.test", [ALICE], message("x@reject.test", "rejected"))
    assert e.value.smtp_code == 550 and b"5.7.1" in e.value.smtp_error
    send(mx, "x@quarantine.test", [ALICE], message("x@quarantine.test", "quarantined"))
    ar = auth_results(find(mx, ALICE, "quarantined", folder="Junk"))
    assert "dmarc=fail" in ar
    with pytest.raises(smtplib.SMTPDataError) as e:
        send(mx, "x@temp.test", [ALICE], message("x@temp.test", "temporary"))
    assert e.value.smtp_code == 451


def test_forged_results_are_removed(mx: DataDir) -> None:
    forged = "Authentication-Results: mx.example.test; spf=pass; dkim=pass; dmarc=pass\r\n"
    other = "Authentication-Results: elsewhere.example; spf=pass\r\n"
    send(mx, "x@softfail.test", [ALICE], message("x@softfail.test", "forged", extra=forged + other))
    got = find(mx, ALICE, "forged")
    assert forged.encode() not in got
    assert other.encode() in got
    assert "spf=softfail" in auth_results(got)


def test_routing_aliases_plus_and_catch_all(mx: DataDir) -> None:
    send(mx, "x@softfail.test", ["alice+lists@example.test"], message("x@softfail.test", "plus"))
    assert b"Delivered-To: alice+lists@example.test\r\n" in find(mx, ALICE, "plus")
    send(mx, "x@softfail.test", ["team@example.test"], message("x@softfail.test", "to team"))
    find(mx, ALICE, "to team")
    find(mx, BOB, "to team")
    send(mx, "x@softfail.test", ["whoever@example.test"], message("x@softfail.test", "catch"))
    find(mx, BOB, "catch")
    # one copy per mailbox, even when two recipients resolve to the same user
    send(mx, "x@softfail.test", [ALICE, "alice+x@example.test"], message("x@softfail.test", "once"))
    copies = [m for m in mailbox_messages(mx, ALICE) if b"Subject: once\r\n" in m]
    assert len(copies) == 1


def test_no_open_relay_and_unknown_users(tmp_path: Path, dns: DNSTestServer) -> None:
    data = make_data_dir(tmp_path / "d")  # no catch-all here
    set_config(data.path, "dns", {"nameservers": [dns.nameserver]})
    with ServerProcess(data):
        host, port = data.addr("smtp")
        with smtplib.SMTP(host, port, timeout=30) as s:
            s.starttls(context=client_tls_context())
            s.ehlo("client.test")
            s.mail("x@softfail.test")
            code, text = s.rcpt("victim@elsewhere.example")
            assert code == 550 and text.startswith(b"5.7.1")
            code, text = s.rcpt("nobody@example.test")
            assert code == 550 and text.startswith(b"5.1.1")
            code, text = s.rcpt("user@[127.0.0.1]")
            assert code == 550
            code, _ = s.rcpt(ALICE)
            assert code == 250


def test_swaks_over_starttls(mx: DataDir) -> None:
    host, port = mx.addr("smtp")
    result = subprocess.run(
        [
            "swaks", "--server", host, "--port", str(port), "--tls", "--ehlo", "swaks.test",
            "--from", "x@softfail.test", "--to", ALICE, "--header", "Subject: via swaks",
            "--body", "sent by swaks",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert " -> STARTTLS" in result.stdout and "=== TLS started" in result.stdout
    assert " ~> MAIL FROM:<x@softfail.test>" in result.stdout  # the envelope went over TLS
    got = find(mx, ALICE, "via swaks")
    assert b"sent by swaks" in got and b"with ESMTPS" in got


def test_limits_on_the_real_mx(mx: DataDir) -> None:
    host, port = mx.addr("smtp")
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.starttls(context=client_tls_context())
        s.ehlo("client.test")
        # SIZE declared above the limit: refused at MAIL (RFC 1870)
        code, text = s.mail("x@softfail.test", ["SIZE=999999999"])
        assert code == 552 and text.startswith(b"5.3.4")
        s.rset()
        s.mail("x@softfail.test")
        for i in range(5):
            assert s.rcpt(f"r{i}@example.test")[0] == 250
        code, text = s.rcpt("r6@example.test")
        assert code == 452 and text.startswith(b"4.5.3")
        s.rset()
        # a message over the limit (no SIZE declared) is refused after DATA, streamed and
        # discarded; the session goes on
        s.mail("x@softfail.test")
        s.rcpt(ALICE)
        code, text = s.data(b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 300)
        assert code == 552 and text.startswith(b"5.3.4")
        assert s.noop()[0] == 250


def test_failed_copy_withdraws_the_others_and_answers_451(
    tmp_path: Path, dns: DNSTestServer
) -> None:
    data = make_data_dir(tmp_path / "d")
    set_config(data.path, "dns", {"nameservers": [dns.nameserver]})
    app = data.app()
    try:
        app.directory.add_alias("both@example.test", [ALICE, BOB])
    finally:
        app.close()
    # the second sealed deposit of this server's life fails, as a full disk would
    with ServerProcess(data, env={"POSTVERN_FAIL_AT": "spool.deposit:2"}):
        with pytest.raises(smtplib.SMTPDataError) as e:
            send(data, "x@softfail.test", ["both@example.test"], message("x@softfail.test", "half"))
        assert e.value.smtp_code == 451 and e.value.smtp_error.startswith(b"4.3.0")
        # the retry succeeds and delivers exactly one copy to each
        send(data, "x@softfail.test", ["both@example.test"], message("x@softfail.test", "half"))
    for user in (ALICE, BOB):
        copies = [m for m in mailbox_messages(data, user, None) if b"Subject: half\r\n" in m]
        assert len(copies) == 1, user


def test_quota_is_enforced_at_rcpt(tmp_path: Path, dns: DNSTestServer) -> None:
    data = make_data_dir(tmp_path / "d")
    set_config(data.path, "dns", {"nameservers": [dns.nameserver]})
    app = data.app()
    try:
        bob = app.directory.user(BOB)
        assert bob is not None
        app.directory.set_quota(bob.id, 20_000)
    finally:
        app.close()
    with ServerProcess(data):
        big = message("x@softfail.test", "filler", body="y" * 15_000 + "\r\n")
        send(data, "x@softfail.test", [BOB], big)
        send(data, "x@softfail.test", [BOB], big)  # accepted: usage was below the quota
        host, port = data.addr("smtp")
        with smtplib.SMTP(host, port, timeout=30) as s:
            s.starttls(context=client_tls_context())
            s.ehlo("client.test")
            s.mail("x@softfail.test")
            code, text = s.rcpt(BOB)
            assert code == 452 and text.startswith(b"4.2.2")
            assert s.rcpt(ALICE)[0] == 250  # others are unaffected
