"""Each user files their own copy: block list to Junk, allow list (authenticated senders
only) out of Junk, their own Junk threshold — after the message's shared verdict.

The rules themselves against the real settings store, then the running server: one message
to two users, one of whom blocks the sender's domain.
"""

from __future__ import annotations

import smtplib
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
from postvern.accounts.settings import Settings
from postvern.accounts.store import AccountStore
from postvern.delivery.userrules import RULE_HEADER, SharedVerdict, UserRules, sender_of

ALICE, BOB = "alice@example.test", "bob@example.test"
CLEAN = SharedVerdict(junk=False, score=1.0, quarantined=False)
SPAMMY = SharedVerdict(junk=True, score=7.0, quarantined=False)


@pytest.fixture
def rules(tmp_path: Path) -> Iterator[tuple[UserRules, Settings, str]]:
    data = make_data_dir(tmp_path / "d")
    app = data.app()
    try:
        user = app.directory.user(ALICE)
        assert user is not None
        yield UserRules(app.directory), Settings(AccountStore(app.directory)), user.id
    finally:
        app.close()


def test_sender_is_read_from_one_from_field() -> None:
    s = sender_of(['"News" <News@Shop.Example>'], "Bounce@mail.shop.example", True)
    assert s.addresses == ("news@shop.example", "bounce@mail.shop.example")
    assert sender_of(["a@x.test", "b@y.test"], "", False).header_from is None


def test_block_list_junks_and_names_the_entry(rules: tuple[UserRules, Settings, str]) -> None:
    r, settings, uid = rules
    settings.add_sender(uid, "block", "@shop.example")
    filed = r.file(uid, CLEAN, sender_of(["x@news.shop.example"], "", True))
    assert (
        filed.junk and filed.header == RULE_HEADER + b": Junk (your block list: shop.example)\r\n"
    )
    assert not r.file(uid, CLEAN, sender_of(["x@shop.example.org"], "", True)).junk


def test_allow_list_needs_an_authenticated_sender(rules: tuple[UserRules, Settings, str]) -> None:
    r, settings, uid = rules
    settings.add_sender(uid, "allow", "friend@pals.test")
    forged = sender_of(["friend@pals.test"], "friend@pals.test", authenticated=False)
    assert r.file(uid, SPAMMY, forged).junk  # a From header alone proves nothing
    real = sender_of(["friend@pals.test"], "friend@pals.test", authenticated=True)
    filed = r.file(uid, SPAMMY, real)
    assert not filed.junk and b"your allow list" in filed.header


def test_own_threshold_but_never_against_dmarc(rules: tuple[UserRules, Settings, str]) -> None:
    r, settings, uid = rules
    anyone = sender_of(["a@b.test"], "a@b.test", True)
    assert r.file(uid, CLEAN, anyone).header == b""  # no setting: the shared verdict
    settings.set_junk_threshold(uid, 1.0)
    filed = r.file(uid, CLEAN, anyone)
    assert filed.junk and b"your Junk threshold 1" in filed.header
    settings.set_junk_threshold(uid, 15.0)
    assert not r.file(uid, SPAMMY, anyone).junk
    quarantined = SharedVerdict(junk=True, score=0.5, quarantined=True)
    assert r.file(uid, quarantined, anyone).junk


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataDir]:
    with DNSTestServer() as dns:
        data = make_data_dir(tmp_path_factory.mktemp("rules") / "data")
        set_config(data.path, "dns", {"nameservers": [dns.nameserver], "timeout": 2.0})
        app = data.app()
        try:
            user = app.directory.user(ALICE)
            assert user is not None
            Settings(AccountStore(app.directory)).add_sender(user.id, "block", "shop.example")
        finally:
            app.close()
        with ServerProcess(data):
            yield data


def test_one_message_filed_per_user(server: DataDir) -> None:
    raw = (
        b"From: Shop <deals@shop.example>\r\nTo: alice@example.test, bob@example.test\r\n"
        b"Subject: this week only\r\nMessage-ID: <rules-1@shop.example>\r\n"
        b"Date: Mon, 07 Dec 2026 10:00:00 +0000\r\n\r\nHello, here are our deals.\r\n"
    )
    host, port = server.addr("smtp")
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.starttls(context=client_tls_context())
        s.sendmail("deals@shop.example", [ALICE, BOB], raw)
    in_junk = mailbox_messages(server, ALICE, "Junk")
    assert any(b"rules-1@shop.example" in m and b"your block list" in m for m in in_junk)
    inbox = mailbox_messages(server, BOB, "INBOX")
    assert any(b"rules-1@shop.example" in m and RULE_HEADER not in m for m in inbox)


def test_a_message_that_went_round_too_often_is_refused(server: DataDir) -> None:
    """RFC 5321 §6.3: a forwarding loop through outside servers ends at the hop limit."""
    hops = b"".join(
        b"Received: from relay%d.example by relay%d.example; Mon, 7 Dec 2026 10:00:00 +0000\r\n"
        % (i, i + 1)
        for i in range(101)
    )
    raw = hops + b"From: a@loop.example\r\nTo: bob@example.test\r\nSubject: again\r\n\r\nx\r\n"
    host, port = server.addr("smtp")
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.starttls(context=client_tls_context())
        s.ehlo("client.test")
        s.mail("a@loop.example")
        assert s.rcpt(BOB)[0] == 250
        code, text = s.data(raw)
    assert code == 554 and text.startswith(b"5.4.6")
