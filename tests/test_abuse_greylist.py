"""Greylisting: the rule itself, its life cycle through Abuse, exemptions, storage at rest."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from clock import START, Clock
from postvern import config
from postvern.abuse import Abuse, GreylistPolicy, Reason
from postvern.abuse.greylist import Decision, Entry, decide
from postvern.abuse.personal import derive_key
from postvern.abuse.store import FILE_NAME, MIGRATIONS
from postvern.encdb import open_encrypted

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
POLICY = GreylistPolicy(delay=5 * MINUTE, window=DAY, pass_period=36 * DAY)
SENDER, RCPT = "news@sender.example", "alice@example.test"


Factory = Callable[..., Awaitable[Abuse]]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


@pytest.fixture
async def make_abuse(tmp_path: Path, clock: Clock, key: bytes) -> AsyncIterator[Factory]:
    made: list[Abuse] = []

    async def make(**kw: Any) -> Abuse:
        cfg = config.Settings(data_dir=tmp_path)
        cfg.abuse.greylisting = True
        for name, value in kw.items():
            setattr(cfg.abuse, name, value)
        abuse = Abuse(cfg, tmp_path, key, clock=clock, greylist_policy=POLICY)
        await abuse.start()
        made.append(abuse)
        return abuse

    yield make
    for abuse in made:
        await abuse.close()


def test_decide_first_sight_defers() -> None:
    outcome = decide(None, START, POLICY)
    assert outcome.decision is Decision.DEFER
    assert outcome.entry == Entry(START)
    assert outcome.wait == POLICY.delay
    assert outcome.keep_until == START + POLICY.window


def test_decide_early_retry_keeps_the_first_attempt() -> None:
    outcome = decide(Entry(START), START + 2 * MINUTE, POLICY)
    assert outcome.decision is Decision.DEFER
    assert outcome.entry == Entry(START)
    assert outcome.wait == 3 * MINUTE


def test_decide_retry_in_window_passes_and_is_remembered() -> None:
    now = START + 10 * MINUTE
    outcome = decide(Entry(START), now, POLICY)
    assert outcome.decision is Decision.ACCEPT
    assert outcome.entry.passes_until == now + POLICY.pass_period
    again = decide(outcome.entry, now + 30 * DAY, POLICY)
    assert again.decision is Decision.ACCEPT
    assert again.entry.passes_until == now + 30 * DAY + POLICY.pass_period


def test_decide_late_retry_starts_again() -> None:
    now = START + DAY + 1
    outcome = decide(Entry(START), now, POLICY)
    assert outcome.decision is Decision.DEFER
    assert outcome.entry == Entry(now)


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        GreylistPolicy(delay=DAY, window=HOUR)


def test_entry_unpack_rejects_garbage() -> None:
    assert Entry.unpack(b"short") is None
    assert Entry.unpack(Entry(1.0, 2.0).pack()) == Entry(1.0, 2.0)


async def test_greylisting_life_cycle(make_abuse: Factory, clock: Clock) -> None:
    abuse = await make_abuse()
    ip = "192.0.2.10"
    first = await abuse.on_rcpt(ip, SENDER, RCPT, True)
    assert first is not None
    assert (first.code, first.enhanced_status, first.reason) == (451, "4.7.1", Reason.GREYLISTED)
    assert "try again" in first.text and first.retry_after == POLICY.delay
    clock.advance(1 * MINUTE)
    early = await abuse.on_rcpt(ip, SENDER, RCPT, True)
    assert early is not None and early.retry_after == 4 * MINUTE
    clock.advance(4 * MINUTE)
    assert await abuse.on_rcpt(ip, SENDER, RCPT, True) is None
    # Passed: later messages go straight through for the pass period, renewed by each.
    clock.advance(20 * DAY)
    assert await abuse.on_rcpt(ip, SENDER, RCPT, True) is None
    clock.advance(30 * DAY)
    assert await abuse.on_rcpt(ip, SENDER, RCPT, True) is None
    # Silence for longer than the pass period: a stranger again.
    clock.advance(37 * DAY)
    assert await abuse.on_rcpt(ip, SENDER, RCPT, True) is not None


async def test_a_retry_after_the_window_is_a_first_attempt(
    make_abuse: Factory, clock: Clock
) -> None:
    abuse = await make_abuse()
    assert await abuse.on_rcpt("192.0.2.10", SENDER, RCPT, True) is not None
    clock.advance(DAY + HOUR)
    assert await abuse.on_rcpt("192.0.2.10", SENDER, RCPT, True) is not None
    clock.advance(5 * MINUTE)
    assert await abuse.on_rcpt("192.0.2.10", SENDER, RCPT, True) is None


async def test_triplet_is_network_sender_recipient(make_abuse: Factory, clock: Clock) -> None:
    abuse = await make_abuse()
    assert await abuse.on_rcpt("192.0.2.10", SENDER, RCPT, True) is not None
    assert await abuse.on_rcpt("2001:db8:4:4::1", SENDER, RCPT, True) is not None
    clock.advance(6 * MINUTE)
    # The retry comes from another address of the same /24 (a sending pool), in other case.
    assert await abuse.on_rcpt("192.0.2.77", SENDER.upper(), f"<{RCPT}>", True) is None
    assert await abuse.on_rcpt("2001:db8:4:4:ffff::2", SENDER, RCPT, True) is None
    # Anything else in the triplet differs: a new triplet.
    assert await abuse.on_rcpt("192.0.3.10", SENDER, RCPT, True) is not None
    assert await abuse.on_rcpt("192.0.2.10", "other@sender.example", RCPT, True) is not None
    assert await abuse.on_rcpt("192.0.2.10", SENDER, "bob@example.test", True) is not None
    # The null sender is greylisted like any other.
    assert await abuse.on_rcpt("192.0.2.10", "", RCPT, True) is not None


async def test_exemptions(make_abuse: Factory) -> None:
    abuse = await make_abuse(allowlist=["198.51.100.0/24"])
    assert await abuse.on_rcpt("198.51.100.3", SENDER, RCPT, True) is None
    assert await abuse.on_rcpt("192.0.2.10", SENDER, RCPT, True, authenticated=True) is None
    # Unknown recipients are refused by the listener, never greylisted.
    assert await abuse.on_rcpt("192.0.2.10", SENDER, "nobody@example.test", False) is None


async def test_off_by_default(tmp_path: Path, key: bytes) -> None:
    abuse = Abuse(config.Settings(data_dir=tmp_path), tmp_path, key)
    await abuse.start()
    try:
        assert abuse.greylisting is False
        assert await abuse.on_rcpt("192.0.2.10", SENDER, RCPT, True) is None
    finally:
        await abuse.close()


async def test_triplets_are_stored_hashed(make_abuse: Factory, tmp_path: Path, key: bytes) -> None:
    abuse = await make_abuse()
    await abuse.on_rcpt("192.0.2.10", SENDER, RCPT, True)
    await abuse.close()
    # Even with the database key, nothing in it names the client, sender or recipient.
    conn = open_encrypted(tmp_path / FILE_NAME, derive_key(key, "database"), MIGRATIONS)
    try:
        rows = conn.execute("SELECT triplet, entry, keep_until FROM greylist").fetchall()
    finally:
        conn.close()
    assert len(rows) == 1
    dump = repr(rows).encode()
    for needle in (b"192.0.2", b"sender.example", b"alice", b"example.test"):
        assert needle not in dump
    assert isinstance(rows[0][0], bytes) and len(rows[0][0]) == 16


async def test_stale_entries_are_purged(make_abuse: Factory, clock: Clock) -> None:
    abuse = await make_abuse()
    await abuse.on_rcpt("192.0.2.10", SENDER, RCPT, True)
    assert await abuse.purge() == (0, 0)
    clock.advance(DAY + 1)
    assert await abuse.purge() == (0, 1)
    # The entry is gone: the client is a stranger again, with a fresh first attempt.
    refused = await abuse.on_rcpt("192.0.2.10", SENDER, RCPT, True)
    assert refused is not None and refused.retry_after == POLICY.delay
