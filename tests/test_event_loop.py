"""``[server] event_loop = "uvloop"``: the real server on uvloop takes mail over STARTTLS and
serves it over IMAP with implicit TLS, as it does on asyncio's own loop."""

from __future__ import annotations

import imaplib
import smtplib
from pathlib import Path

import pytest

from harness import ServerProcess, client_tls_context, make_data_dir, set_config
from postvern.net import event_loop_factory

ALICE = "alice@example.test"


def test_uvloop_serves_smtp_and_imap(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path / "data", listeners=("smtp", "imaps"))
    set_config(data.path, "server", {"event_loop": "uvloop"})
    message = b"From: a@sender.test\r\nTo: alice@example.test\r\nSubject: on uvloop\r\n\r\nhi\r\n"
    with ServerProcess(data):
        with smtplib.SMTP(*data.addr("smtp"), timeout=30) as s:
            s.starttls(context=client_tls_context())
            s.sendmail("a@sender.test", [ALICE], message)
        imap = imaplib.IMAP4_SSL(*data.addr("imaps"), ssl_context=client_tls_context())
        imap.login(ALICE, data.passwords[ALICE])
        imap.select("INBOX")
        _, found = imap.search(None, "SUBJECT", '"on uvloop"')
        assert found[0].split()
        imap.logout()


def test_unknown_event_loop_is_refused() -> None:
    assert event_loop_factory("asyncio") is None
    assert event_loop_factory("uvloop") is not None
    with pytest.raises(ValueError, match="event_loop"):
        event_loop_factory("trio")
