"""Bans and limits against the running server: IMAP, POP3, SMTP, the CLI, Redis, restarts.

These servers run without the loopback allowlist the other tests use, so the client — at
127.0.0.1 — is subject to every limit.
"""

from __future__ import annotations

import http.client
import imaplib
import os
import poplib
import shutil
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dnsserver import DNSTestServer
from harness import (
    DataDir,
    ServerProcess,
    client_tls_context,
    free_ports,
    make_data_dir,
    set_config,
)
from redis_server import RedisTestServer

ALICE = "alice@example.test"
LISTENERS = ("smtp", "submissions", "imaps", "pop3s", "https")


def server_data(path: Path, **abuse: object) -> DataDir:
    data = make_data_dir(path, listeners=LISTENERS)
    set_config(data.path, "abuse", {"allowlist": [], "auth_failures_per_ip": 3, **abuse})
    return data


def cli(data: DataDir, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVERN_")}
    return subprocess.run(
        [sys.executable, "-m", "postvern.cli", "--data", str(data.path), *args],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip


def metrics(data: DataDir) -> dict[str, float]:
    host, port = data.addr("https")
    conn = http.client.HTTPSConnection(host, port, context=client_tls_context(), timeout=10)
    conn.request("GET", "/metrics")
    body = conn.getresponse().read().decode()
    lines = (line.split() for line in body.splitlines() if not line.startswith("#"))
    return {k: float(v) for k, v in lines}


def imap_login(data: DataDir, password: str) -> str:
    """'ok', 'failed' or 'refused' (turned away before any login could happen)."""
    host, port = data.addr("imaps")
    try:
        client = imaplib.IMAP4_SSL(host, port, ssl_context=client_tls_context(), timeout=10)
    except (imaplib.IMAP4.error, OSError):  # a BYE instead of a greeting
        return "refused"
    try:
        client.login(ALICE, password)
    except imaplib.IMAP4.error:
        return "failed"
    finally:
        try:
            client.logout()
        except (imaplib.IMAP4.error, OSError):
            pass
    return "ok"


def wait_until(check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.2)


def test_failed_logins_ban_and_banned_never_hash(tmp_path: Path) -> None:
    data = server_data(tmp_path / "d")
    with ServerProcess(data):
        assert [imap_login(data, "wrong-password") for _ in range(3)] == ["failed"] * 3
        hashed = metrics(data)["postvern_kdf_runs_total"]
        assert hashed == 3
        # banned now: every protocol turns the address away at connect
        assert [imap_login(data, data.passwords[ALICE]) for _ in range(5)] == ["refused"] * 5
        host, port = data.addr("pop3s")
        with pytest.raises(poplib.error_proto, match="LOGIN-DELAY"):
            poplib.POP3_SSL(host, port, context=client_tls_context(), timeout=10)
        host, port = data.addr("smtp")
        with pytest.raises(smtplib.SMTPConnectError) as e:
            smtplib.SMTP(host, port, timeout=10)
        assert e.value.smtp_code == 421
        # not one more password reached Argon2id, not even the right one
        assert metrics(data)["postvern_kdf_runs_total"] == hashed
        assert metrics(data)["postvern_bans_active"] == 1
    # the ban survives a restart, and the administrator can see and lift it
    with ServerProcess(data):
        assert imap_login(data, data.passwords[ALICE]) == "refused"
        listing = cli(data, "ban", "list")
        assert "127.0.0.1" in listing.stdout and "authentication failures" in listing.stdout
        assert cli(data, "ban", "remove", "127.0.0.1").returncode == 0
        wait_until(lambda: imap_login(data, data.passwords[ALICE]) == "ok")


def test_admin_ban_reaches_a_running_server(tmp_path: Path) -> None:
    data = server_data(tmp_path / "d")
    with ServerProcess(data):
        assert imap_login(data, data.passwords[ALICE]) == "ok"
        assert cli(data, "ban", "add", "127.0.0.0/8", "--duration", "1h").returncode == 0
        wait_until(lambda: imap_login(data, data.passwords[ALICE]) == "refused")


def test_enumeration_of_unknown_users_bans(tmp_path: Path) -> None:
    data = server_data(tmp_path / "d", unknown_rcpt_per_ip=5)
    with ServerProcess(data):
        host, port = data.addr("smtp")
        codes = []
        with smtplib.SMTP(host, port, timeout=10) as s:
            s.starttls(context=client_tls_context())
            s.ehlo("probe.test")
            s.mail("x@probe.test")
            for i in range(6):
                code, _ = s.rcpt(f"guess{i}@example.test")
                codes.append(code)
                if code == 421:
                    break
        assert codes[:4] == [550] * 4 and codes[-1] == 421
        with pytest.raises(smtplib.SMTPConnectError):
            smtplib.SMTP(host, port, timeout=10)


def test_connection_rate_limit(tmp_path: Path) -> None:
    data = server_data(tmp_path / "d", connections_per_ip_per_minute=5)
    with ServerProcess(data):
        results = [imap_login(data, data.passwords[ALICE]) for _ in range(7)]
        assert results[:5] == ["ok"] * 5 and results[5:] == ["refused"] * 2


def test_bans_are_shared_through_redis(tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    with RedisTestServer(tmp_path / "redis") as redis:
        one = server_data(tmp_path / "one", redis_url=redis.url)
        # a second node of the same installation: same keys and accounts, its own ports
        shutil.copytree(one.path, tmp_path / "two")
        two = DataDir(tmp_path / "two", one.domain, free_ports(list(LISTENERS)), one.passwords)
        set_config(two.path, "listen", two.listen)
        with ServerProcess(one), ServerProcess(two):
            assert imap_login(two, two.passwords[ALICE]) == "ok"
            assert [imap_login(one, "wrong") for _ in range(3)] == ["failed"] * 3
            wait_until(lambda: imap_login(two, two.passwords[ALICE]) == "refused")


def smtp_session(data: DataDir) -> smtplib.SMTP:
    host, port = data.addr("smtp")
    s = smtplib.SMTP(host, port, timeout=10)
    s.starttls(context=client_tls_context())
    s.ehlo("client.test")
    return s


MSG = b"From: x@sender.test\r\nSubject: hi\r\n\r\nhello\r\n"


def test_message_and_recipient_rates_per_ip(tmp_path: Path) -> None:
    data = server_data(tmp_path / "d", messages_per_ip_per_hour=2)
    with ServerProcess(data), smtp_session(data) as s:
        for _ in range(2):
            s.mail("x@sender.test")
            assert s.rcpt(ALICE)[0] == 250
            assert s.data(MSG)[0] == 250
        code, text = s.mail("x@sender.test")  # two messages this hour already
        assert code == 451 and text.startswith(b"4.7.1")
    data = server_data(tmp_path / "e", recipients_per_ip_per_hour=3)
    with ServerProcess(data), smtp_session(data) as s:
        # recipients count when the message is accepted: three in one message
        assert (
            s.sendmail("x@sender.test", [ALICE, "bob@example.test", "alice+x@example.test"], MSG)
            == {}
        )
        s.mail("x@sender.test")
        code, text = s.rcpt(ALICE)  # three recipients this hour already
        assert code == 450 and text.startswith(b"4.7.1")


def test_messages_per_sender_per_day(tmp_path: Path) -> None:
    data = server_data(tmp_path / "d", messages_per_sender_per_day=1)
    with ServerProcess(data), smtp_session(data) as s:
        s.sendmail("x@sender.test", [ALICE], MSG)
        code, text = s.mail("x@sender.test")
        if code == 250:
            s.rcpt(ALICE)
            code, text = s.data(MSG)
        assert code == 451 and text.startswith(b"4.7.1")
        assert s.sendmail("other@sender.test", [ALICE], MSG) == {}  # another sender is fine


def test_submissions_per_user_per_day(tmp_path: Path) -> None:
    data = server_data(tmp_path / "d", submissions_per_user_per_day=2)
    host, port = data.addr("submissions")
    with ServerProcess(data):
        with smtplib.SMTP_SSL(host, port, context=client_tls_context(), timeout=10) as s:
            s.login(ALICE, data.passwords[ALICE])
            msg = b"From: alice@example.test\r\nSubject: s\r\n\r\nx\r\n"
            s.sendmail(ALICE, ["bob@example.test"], msg)
            s.sendmail(ALICE, ["bob@example.test"], msg)
            with pytest.raises(smtplib.SMTPDataError) as e:
                s.sendmail(ALICE, ["bob@example.test"], msg)
            assert e.value.smtp_code == 451


def test_auth_failures_per_account_lock_the_account(tmp_path: Path) -> None:
    data = server_data(tmp_path / "d", auth_failures_per_ip=100, auth_failures_per_account=2)
    with ServerProcess(data):
        assert [imap_login(data, "wrong") for _ in range(2)] == ["failed"] * 2
        hashed = metrics(data)["postvern_kdf_runs_total"]
        # locked: even the right password is refused without being hashed
        assert imap_login(data, data.passwords[ALICE]) == "failed"
        assert metrics(data)["postvern_kdf_runs_total"] == hashed


def test_dnsbl_listing_is_named_in_the_reply(tmp_path: Path) -> None:
    with DNSTestServer() as dns:
        # RFC 5782 §5: 127.0.0.2 is every list's test entry; the client connects from it
        dns.add("2.0.0.127.bl.test", "A", "127.0.0.2")
        dns.add("2.0.0.127.bl.test", "TXT", "listed for testing")
        data = server_data(tmp_path / "d", dnsbl=["bl.test"])
        set_config(data.path, "dns", {"nameservers": [dns.nameserver]})
        with ServerProcess(data):
            host, port = data.addr("smtp")
            with pytest.raises(smtplib.SMTPConnectError) as e:
                smtplib.SMTP(host, port, timeout=10, source_address=("127.0.0.2", 0))
            assert e.value.smtp_code == 554 and b"bl.test" in e.value.smtp_error
            # an address the list does not name is served as usual
            with smtplib.SMTP(host, port, timeout=10) as s:
                assert s.noop()[0] == 250


def test_greylisting_defers_then_accepts(tmp_path: Path) -> None:
    data = server_data(tmp_path / "d", greylisting=True, greylist_delay=1.0)
    with ServerProcess(data):
        with smtp_session(data) as s:
            s.mail("x@sender.test")
            code, text = s.rcpt(ALICE)
            assert code == 451 and text.startswith(b"4.7.1")
        time.sleep(1.5)
        with smtp_session(data) as s:
            assert s.sendmail("x@sender.test", [ALICE], MSG) == {}
