"""A mailbox stays open a little after its last session, then locks again.

Reconnecting clients (an IMAP client's second connection, a POP3 poller) then find it open,
instead of paying for reopening it; after ``linger_seconds`` without a session it is closed,
and mail arriving then is sealed to the spool again, as for any locked mailbox.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from harness import make_data_dir, services
from postvern.store import service
from postvern.store.spool import SpoolItem

ALICE = "alice@example.test"


def message(subject: str) -> bytes:
    return f"From: x@remote.test\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()


async def test_linger_then_lock(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path / "d")
    svc = services(data)
    svc.registry.linger_seconds = 0.3
    try:
        logged_in = await svc.login.login(ALICE, data.passwords[ALICE], "127.0.0.1", "imap")
        user = logged_in.user
        await logged_in.mailbox.release()
        assert svc.registry.is_unlocked(user.id)  # lingering
        assert await svc.registry.deliver(user, SpoolItem(message("while lingering"))) == "mailbox"
        again = await svc.login.login(ALICE, data.passwords[ALICE], "127.0.0.1", "imap")
        await asyncio.sleep(0.5)  # the linger of the first session ended meanwhile
        assert svc.registry.is_unlocked(user.id)  # held by the second session
        await again.mailbox.release()
        for _ in range(50):
            if not svc.registry.is_unlocked(user.id):
                break
            await asyncio.sleep(0.1)
        assert not svc.registry.is_unlocked(user.id)
        assert await svc.registry.deliver(user, SpoolItem(message("locked again"))) == "spool"
    finally:
        await svc.close()


async def test_without_linger_logout_locks_at_once(tmp_path: Path) -> None:
    data = make_data_dir(tmp_path / "d")
    svc = services(data)
    svc.registry.linger_seconds = 0
    try:
        logged_in = await svc.login.login(ALICE, data.passwords[ALICE], "127.0.0.1", "imap")
        await logged_in.mailbox.release()
        assert not svc.registry.is_unlocked(logged_in.user.id)
    finally:
        await svc.close()


async def test_lingering_mailboxes_are_bounded(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(service, "MAX_LINGERING", 1)
    data = make_data_dir(tmp_path / "d")
    svc = services(data)
    svc.registry.linger_seconds = 60
    try:
        users = []
        for address in ("alice@example.test", "bob@example.test"):
            logged_in = await svc.login.login(address, data.passwords[address], "127.0.0.1", "imap")
            users.append(logged_in.user)
            await logged_in.mailbox.release()
        for _ in range(50):
            if not svc.registry.is_unlocked(users[0].id):
                break
            await asyncio.sleep(0.05)
        assert not svc.registry.is_unlocked(users[0].id)  # the older one was closed
        assert svc.registry.is_unlocked(users[1].id)
    finally:
        await svc.close()


async def test_a_burst_of_logouts_closes_each_surplus_mailbox_once(
    tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """Every session ending at once (a restart of a client fleet, a network drop): each
    mailbox beyond MAX_LINGERING is closed once. Before, one already being closed still
    counted as lingering, so every later logout scheduled its close again — a quadratic
    number of pending closes, 170 MiB → 1.5 GiB of RSS when 2,000 IDLE sessions ended
    (bench/imap_idle.py)."""
    monkeypatch.setattr(service, "MAX_LINGERING", 1)
    passwords = {f"user{n}@example.test": f"password-{n}-staple" for n in range(5)}
    data = make_data_dir(tmp_path / "d", passwords=passwords)
    svc = services(data)
    svc.registry.linger_seconds = 60
    closes: list[str] = []
    expire_soon = svc.registry._expire_soon

    def counted(user_id: str, entry: object) -> None:
        closes.append(user_id)
        expire_soon(user_id, entry)  # type: ignore[arg-type]

    svc.registry._expire_soon = counted  # type: ignore[method-assign]
    try:
        sessions = [
            await svc.login.login(address, password, "127.0.0.1", "imap")
            for address, password in passwords.items()
        ]
        # All at once: every release runs before any close it schedules.
        await asyncio.gather(*(s.mailbox.release() for s in sessions))
        assert sorted(closes) == sorted(s.user.id for s in sessions[:-1])
        for _ in range(100):
            if not any(svc.registry.is_unlocked(s.user.id) for s in sessions[:-1]):
                break
            await asyncio.sleep(0.05)
        assert [svc.registry.is_unlocked(s.user.id) for s in sessions] == [False] * 4 + [True]
    finally:
        await svc.close()
