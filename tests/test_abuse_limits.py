"""Rate limits of the abuse layer: every counter, IPv6 /64 grouping, the allowlist."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from postvern import config
from postvern.abuse import Abuse, BanError, Reason, Refusal

Factory = Callable[..., Awaitable[Abuse]]


@pytest.fixture
async def make_abuse(tmp_path: Path) -> AsyncIterator[Factory]:
    """Build started Abuse objects with some [abuse] settings changed; closed afterwards."""
    made: list[Abuse] = []

    async def make(**settings: Any) -> Abuse:
        data = tmp_path / f"node{len(made)}"
        data.mkdir()
        cfg = config.Settings(data_dir=data)
        for name, value in settings.items():
            setattr(cfg.abuse, name, value)
        abuse = Abuse(cfg, data, os.urandom(32))
        await abuse.start()
        made.append(abuse)
        return abuse

    yield make
    for abuse in made:
        await abuse.close()


def assert_refusal(r: Refusal | None, code: int, status: str, reason: Reason) -> Refusal:
    assert r is not None, "expected a refusal"
    assert (r.code, r.enhanced_status, r.reason) == (code, status, reason)
    assert "\r" not in r.text and "\n" not in r.text
    return r


async def test_connections_per_ip_per_minute(make_abuse: Factory) -> None:
    abuse = await make_abuse(connections_per_ip_per_minute=3)
    for _ in range(3):
        assert await abuse.on_connect("192.0.2.1", "smtp") is None
    refused = await abuse.on_connect("192.0.2.1", "imap")
    r = assert_refusal(refused, 421, "4.7.0", Reason.RATE_LIMITED)
    assert r.close and r.temporary
    assert await abuse.on_connect("192.0.2.2", "smtp") is None


async def test_ipv6_counts_per_64(make_abuse: Factory) -> None:
    abuse = await make_abuse(connections_per_ip_per_minute=2)
    assert await abuse.on_connect("2001:db8:1:2::1", "smtp") is None
    assert await abuse.on_connect("2001:db8:1:2:ffff:ffff:ffff:9", "pop3") is None
    refused = await abuse.on_connect("2001:db8:1:2::abcd", "imap")
    assert_refusal(refused, 421, "4.7.0", Reason.RATE_LIMITED)
    # The neighbouring /64 is another client.
    assert await abuse.on_connect("2001:db8:1:3::1", "smtp") is None


async def test_ipv4_mapped_ipv6_is_the_ipv4_client(make_abuse: Factory) -> None:
    abuse = await make_abuse(connections_per_ip_per_minute=1)
    assert await abuse.on_connect("::ffff:192.0.2.5", "smtp") is None
    assert await abuse.on_connect("192.0.2.5", "smtp") is not None


async def test_zero_disables_a_limit(make_abuse: Factory) -> None:
    abuse = await make_abuse(connections_per_ip_per_minute=0)
    for _ in range(200):
        assert await abuse.on_connect("192.0.2.1", "smtp") is None


async def test_peer_without_address_is_not_counted(make_abuse: Factory) -> None:
    abuse = await make_abuse(connections_per_ip_per_minute=1)
    for _ in range(3):
        assert await abuse.on_connect("", "submission") is None


async def test_messages_per_ip_per_hour(make_abuse: Factory) -> None:
    abuse = await make_abuse(messages_per_ip_per_hour=2)
    ip, sender = "192.0.2.1", "a@example.org"
    for _ in range(2):
        assert await abuse.on_mail(ip, sender) is None
        assert await abuse.on_message(ip, sender, 1) is None
    assert_refusal(await abuse.on_mail(ip, sender), 451, "4.7.1", Reason.RATE_LIMITED)
    # A message already under way when the limit ran out is refused at end of DATA.
    r = assert_refusal(await abuse.on_message(ip, sender, 1), 451, "4.7.1", Reason.RATE_LIMITED)
    assert not r.close
    assert await abuse.on_mail("192.0.2.2", sender) is None


async def test_recipients_per_ip_per_hour(make_abuse: Factory) -> None:
    abuse = await make_abuse(recipients_per_ip_per_hour=5)
    ip = "192.0.2.1"
    assert await abuse.on_rcpt(ip, "a@example.org", "u@example.test", True) is None
    assert await abuse.on_message(ip, "a@example.org", 5) is None
    refused = await abuse.on_rcpt(ip, "a@example.org", "u@example.test", True)
    assert_refusal(refused, 450, "4.7.1", Reason.RATE_LIMITED)
    assert await abuse.on_message(ip, "a@example.org", 1) is not None


async def test_messages_per_sender_per_day(make_abuse: Factory) -> None:
    abuse = await make_abuse(messages_per_sender_per_day=2)
    # From different clients: the sender is counted wherever it comes from, in any case.
    assert await abuse.on_message("192.0.2.1", "Bulk@Example.org", 1) is None
    assert await abuse.on_message("192.0.2.2", "<bulk@example.ORG>", 1) is None
    refused = await abuse.on_mail("192.0.2.3", "bulk@example.org")
    r = assert_refusal(refused, 451, "4.7.1", Reason.RATE_LIMITED)
    assert "sender" in r.text
    assert await abuse.on_mail("192.0.2.3", "other@example.org") is None


async def test_null_sender_is_not_limited_per_sender(make_abuse: Factory) -> None:
    abuse = await make_abuse(messages_per_sender_per_day=1)
    for n in range(5):
        ip = f"192.0.2.{n + 1}"
        assert await abuse.on_mail(ip, "") is None
        assert await abuse.on_message(ip, "<>", 1) is None


async def test_submissions_per_user_per_day(make_abuse: Factory) -> None:
    abuse = await make_abuse(submissions_per_user_per_day=3)
    for _ in range(3):
        assert await abuse.on_submission("alice@example.test") is None
    refused = await abuse.on_submission("Alice@Example.TEST")
    assert_refusal(refused, 451, "4.7.1", Reason.RATE_LIMITED)
    assert await abuse.on_submission("bob@example.test") is None


async def test_auth_failures_per_ip_ban_the_client(make_abuse: Factory) -> None:
    abuse = await make_abuse(auth_failures_per_ip=3, auth_failures_per_account=100)
    ip = "198.51.100.20"
    for n, protocol in enumerate(("smtp", "imap")):
        await abuse.login_failed(ip, f"user{n}@example.test", protocol)
        assert abuse.is_banned(ip) is None
        assert await abuse.login_allowed(ip, "someone@example.test") is None
    await abuse.login_failed(ip, "user9@example.test", "pop3")
    ban = abuse.is_banned(ip)
    assert ban is not None and ban.offences == 1 and "authentication" in ban.reason
    reason = await abuse.login_allowed(ip, "anyone@example.test")
    assert reason is not None and "blocked" in reason
    for service in ("smtp", "submission", "imap", "pop3"):
        r = assert_refusal(await abuse.on_connect(ip, service), 421, "4.7.0", Reason.BANNED)
        assert r.close and r.retry_after is not None and r.retry_after > 0
    assert abuse.is_banned("198.51.100.21") is None


async def test_auth_failures_per_ip_group_ipv6_64(make_abuse: Factory) -> None:
    abuse = await make_abuse(auth_failures_per_ip=2)
    await abuse.login_failed("2001:db8:77:1::1", "a@example.test", "imap")
    await abuse.login_failed("2001:db8:77:1::2", "b@example.test", "imap")
    ban = abuse.is_banned("2001:db8:77:1:dead:beef::3")
    assert ban is not None and ban.network == "2001:db8:77:1::/64"
    assert abuse.is_banned("2001:db8:77:2::1") is None


async def test_auth_failures_per_account_lock_it_except_from_known_networks(
    make_abuse: Factory,
) -> None:
    abuse = await make_abuse(auth_failures_per_ip=100, auth_failures_per_account=3)
    account = "alice@example.test"
    await abuse.login_succeeded("203.0.113.5", account, "imap")
    # A distributed guesser: every attempt from another address.
    for n in range(3):
        assert await abuse.login_allowed(f"192.0.2.{n + 1}", account) is None
        await abuse.login_failed(f"192.0.2.{n + 1}", "ALICE@example.test", "imap")
    locked = await abuse.login_allowed("192.0.2.50", account)
    assert locked is not None and "account" in locked
    # The owner, from the network she logged in from before, still gets in.
    assert await abuse.login_allowed("203.0.113.5", account) is None
    assert await abuse.login_allowed("192.0.2.50", "bob@example.test") is None
    # No single client crossed its own limit.
    assert all(abuse.is_banned(f"192.0.2.{n + 1}") is None for n in range(3))


async def test_unknown_recipients_ban_the_client(make_abuse: Factory) -> None:
    abuse = await make_abuse(unknown_rcpt_per_ip=3)
    ip, sender = "192.0.2.9", "probe@example.org"
    for n in range(2):
        assert await abuse.on_rcpt(ip, sender, f"guess{n}@example.test", False) is None
    refused = await abuse.on_rcpt(ip, sender, "guess2@example.test", False)
    r = assert_refusal(refused, 421, "4.7.0", Reason.BANNED)
    assert r.close
    ban = abuse.is_banned(ip)
    assert ban is not None and ban.reason == "unknown recipients"
    # Even a real recipient is refused now, and so is a new connection.
    known = await abuse.on_rcpt(ip, sender, "alice@example.test", True)
    assert_refusal(known, 421, "4.7.0", Reason.BANNED)
    assert_refusal(await abuse.on_connect(ip, "smtp"), 421, "4.7.0", Reason.BANNED)


async def test_allowlist_is_exempt_from_everything(make_abuse: Factory) -> None:
    abuse = await make_abuse(
        allowlist=["192.0.2.0/24", "2001:db8:aa::/48"],
        connections_per_ip_per_minute=1,
        messages_per_ip_per_hour=1,
        recipients_per_ip_per_hour=1,
        messages_per_sender_per_day=1,
        auth_failures_per_ip=1,
        auth_failures_per_account=1,
        unknown_rcpt_per_ip=1,
        greylisting=True,
    )
    for ip in ("192.0.2.200", "2001:db8:aa:5::1"):
        for _ in range(3):
            assert await abuse.on_connect(ip, "smtp") is None
            await abuse.login_failed(ip, "alice@example.test", "imap")
            assert await abuse.login_allowed(ip, "alice@example.test") is None
            assert await abuse.on_mail(ip, "x@example.org") is None
            assert await abuse.on_rcpt(ip, "x@example.org", "nobody@example.test", False) is None
            assert await abuse.on_rcpt(ip, "x@example.org", "alice@example.test", True) is None
            assert await abuse.on_message(ip, "x@example.org", 3) is None
        assert abuse.is_banned(ip) is None
    with pytest.raises(BanError):
        await abuse.ban("192.0.2.7", 3600, "by hand")
    with pytest.raises(BanError):
        await abuse.ban("192.0.0.0/16", 3600, "wider than the allowlisted /24")
    # Outside the allowlist the limits still apply.
    assert await abuse.on_connect("198.51.100.1", "smtp") is None
    assert await abuse.on_connect("198.51.100.1", "smtp") is not None


async def test_bad_allowlist_entry_is_a_configuration_error(tmp_path: Path) -> None:
    cfg = config.Settings(data_dir=tmp_path)
    cfg.abuse.allowlist = ["192.0.2.0/24", "not-a-network"]
    with pytest.raises(ValueError, match="allowlist"):
        Abuse(cfg, tmp_path, os.urandom(32))


async def two_workers(tmp_path: Path, **settings: Any) -> tuple[Abuse, Abuse]:
    """Two Abuse objects on one data directory sharing counters through abuse.sqlite, as
    two worker processes of one server do (workers.py; no Redis)."""
    data = tmp_path / "shared"
    data.mkdir()
    cfg = config.Settings(data_dir=data)
    for name, value in settings.items():
        setattr(cfg.abuse, name, value)
    key = os.urandom(32)
    pair = []
    for _ in range(2):
        abuse = Abuse(cfg, data, key)
        abuse.share_between_workers()
        await abuse.start()
        pair.append(abuse)
    return pair[0], pair[1]


async def test_workers_share_one_allowance_through_leases(tmp_path: Path) -> None:
    """A limit large enough for leases (ratelimit.lease_size > 1): the two workers together
    accept exactly the limit, however the messages fall on them, and both refuse after."""
    limit = 1000  # leases of 10 messages
    one, two = await two_workers(tmp_path, messages_per_ip_per_hour=limit)
    try:
        ip, accepted, refused = "192.0.2.1", 0, {id(one): 0, id(two): 0}
        # An irregular spread: bursts on one worker, then the other.
        pattern = [one] * 7 + [two] * 3 + [one, two] * 5
        for n in range(limit + 200):
            worker = pattern[n % len(pattern)]
            if await worker.on_message(ip, "", 1) is None:
                accepted += 1
            else:
                refused[id(worker)] += 1
        assert accepted == limit
        assert all(refused.values())
        # Neither worker accepts another, nor does MAIL get past either.
        for worker in (one, two):
            assert await worker.on_mail(ip, "a@example.org") is not None
            assert await worker.on_message(ip, "", 1) is not None
        # Another client has its own allowance.
        assert await two.on_mail("192.0.2.2", "a@example.org") is None
    finally:
        await one.close()
        await two.close()


async def test_a_closing_worker_gives_its_lease_back(tmp_path: Path) -> None:
    """What a worker reserved and did not spend counts again for the others once it stops."""
    limit = 1000
    one, two = await two_workers(tmp_path, recipients_per_ip_per_hour=limit)
    ip = "192.0.2.1"
    try:
        assert await one.on_message(ip, "", 1) is None  # one reserves a lease, spends 1
        await one.close()
        # Two can now take all the rest: limit - 1 more recipients, then no more.
        assert await two.on_message(ip, "", limit - 1) is None
        assert await two.on_message(ip, "", 1) is not None
    finally:
        await two.close()


async def test_small_limits_are_counted_hit_by_hit_across_workers(tmp_path: Path) -> None:
    """Below LEASE_FRACTION a lease is one hit: the third connection is refused on whichever
    worker it reaches, exactly as with one process."""
    one, two = await two_workers(tmp_path, connections_per_ip_per_minute=3)
    try:
        assert await one.on_connect("192.0.2.1", "smtp") is None
        assert await two.on_connect("192.0.2.1", "smtp") is None
        assert await one.on_connect("192.0.2.1", "smtp") is None
        assert await two.on_connect("192.0.2.1", "smtp") is not None
        assert await one.on_connect("192.0.2.1", "smtp") is not None
    finally:
        await one.close()
        await two.close()
