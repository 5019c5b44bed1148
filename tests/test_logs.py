"""Logs name no one: addresses and accounts are anonymised on the way out."""

from __future__ import annotations

import logging
import smtplib
from pathlib import Path

from harness import ServerProcess, client_tls_context, make_data_dir, set_config
from postvern.abuse import subject
from postvern.ops.logs import AnonymisingFormatter, anonymise_ip


def record(**extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("postvern.test", logging.INFO, __file__, 1, "login failed", (), None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_addresses_keep_only_their_network() -> None:
    assert anonymise_ip("192.0.2.77") == "192.0.2.0/24"
    assert anonymise_ip("2001:db8:1234:5678::9") == "2001:db8:1234::/48"
    assert anonymise_ip("not an address") == "invalid"


def test_accounts_become_daily_pseudonyms() -> None:
    formatter = AnonymisingFormatter(b"k" * 32)
    line = formatter.format(record(**subject(ip="198.51.100.9", account="Alice@Example.org")))
    assert "198.51.100.9" not in line and "alice" not in line.lower()
    assert "ip=198.51.100.0/24" in line
    same = formatter.format(record(**subject(account="alice@example.org")))
    pseudonym = line.split("account=")[1].split("]")[0]
    assert f"account={pseudonym}" in same  # one account, one name within a day
    other_key = AnonymisingFormatter(b"j" * 32).format(record(**subject(account="alice@x.org")))
    assert pseudonym not in other_key


def test_full_logs_when_the_owner_asks() -> None:
    line = AnonymisingFormatter(b"k" * 32, anonymise=False).format(record(ip="192.0.2.77"))
    assert "ip=192.0.2.77" in line


def test_server_log_has_no_client_address_or_account(tmp_path: Path, dns_server) -> None:  # type: ignore[no-untyped-def]
    data = make_data_dir(tmp_path / "d", listeners=("smtp", "submissions"))
    set_config(data.path, "abuse", {"allowlist": []})
    set_config(data.path, "dns", {"nameservers": [dns_server.nameserver]})
    server = ServerProcess(data).start()
    try:
        host, port = data.addr("submissions")
        with smtplib.SMTP_SSL(host, port, context=client_tls_context(), timeout=10) as s:
            try:
                s.login("alice@example.test", "wrong-password")
            except smtplib.SMTPAuthenticationError:
                pass
        host, port = data.addr("smtp")
        with smtplib.SMTP(host, port, timeout=10) as s:
            s.starttls(context=client_tls_context())
            msg = b"From: x@sender.test\r\nSubject: x\r\n\r\nx\r\n"
            s.sendmail("x@sender.test", ["alice@example.test"], msg)
    finally:
        server.stop()
    log = "\n".join(server.output)
    assert "login failed" in log and "ip=n-" in log  # the network as a daily pseudonym
    about_clients = [line for line in server.output if "listening for" not in line]
    assert not any("127.0.0.1" in line for line in about_clients)  # ours may be named
    assert "alice@example.test" not in log
