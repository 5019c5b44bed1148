"""Bans: escalation, expiry, persistence across restarts, operator commands, the login gate."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from clock import START, Clock
from harness import make_data_dir, services
from postvern import config
from postvern.abuse import Abuse, Ban, BanError, Reason, parse_duration, utc_text
from postvern.abuse.admin import ban_table
from postvern.abuse.bans import OFFENCE_MEMORY_SECONDS
from postvern.abuse.store import FILE_NAME
from postvern.encdb import WrongKey
from postvern.login import LoginRefused

Factory = Callable[..., Awaitable[Abuse]]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


@pytest.fixture
async def make_abuse(tmp_path: Path, clock: Clock, key: bytes) -> AsyncIterator[Factory]:
    """Started Abuse objects on one data directory (several may share it); closed after."""
    made: list[Abuse] = []

    async def make(*, data: Path | None = None, with_key: bytes | None = None, **kw: Any) -> Abuse:
        where = data or tmp_path
        cfg = config.Settings(data_dir=where)
        for name, value in kw.items():
            setattr(cfg.abuse, name, value)
        abuse = Abuse(cfg, where, with_key or key, clock=clock)
        await abuse.start()
        made.append(abuse)
        return abuse

    yield make
    for abuse in made:
        await abuse.close()


async def offend(abuse: Abuse, ip: str) -> None:
    await abuse.login_failed(ip, "victim@example.test", "imap")


async def test_bans_double_per_repeat_offence_up_to_the_cap(
    make_abuse: Factory, clock: Clock
) -> None:
    abuse = await make_abuse(auth_failures_per_ip=1, ban_seconds=60, ban_max_seconds=200)
    ip = "198.51.100.7"
    durations = []
    for expected_offences in (1, 2, 3, 4):
        await offend(abuse, ip)
        ban = abuse.is_banned(ip)
        assert ban is not None and ban.offences == expected_offences
        durations.append(ban.until - clock())
        clock.advance(ban.until - clock() + 1)
        assert abuse.is_banned(ip) is None
    assert durations == [60, 120, 200, 200]


async def test_a_ban_ends_and_the_client_is_let_in(make_abuse: Factory, clock: Clock) -> None:
    abuse = await make_abuse(auth_failures_per_ip=1, ban_seconds=600)
    await offend(abuse, "198.51.100.8")
    refused = await abuse.on_connect("198.51.100.8", "smtp")
    assert refused is not None and refused.reason is Reason.BANNED
    assert refused.retry_after == pytest.approx(600)
    clock.advance(599)
    assert await abuse.on_connect("198.51.100.8", "smtp") is not None
    clock.advance(2)
    assert await abuse.on_connect("198.51.100.8", "smtp") is None
    assert await abuse.login_allowed("198.51.100.8", "victim@example.test") is None


async def test_offences_are_forgotten_after_the_offence_memory(
    make_abuse: Factory, clock: Clock
) -> None:
    abuse = await make_abuse(auth_failures_per_ip=1, ban_seconds=60, ban_max_seconds=6000)
    ip = "198.51.100.9"
    await offend(abuse, ip)
    clock.advance(61 + OFFENCE_MEMORY_SECONDS / 2)
    await offend(abuse, ip)
    second = abuse.is_banned(ip)
    assert second is not None and second.offences == 2
    clock.advance(121 + OFFENCE_MEMORY_SECONDS + 1)
    assert abuse.bans(include_expired=True)  # still held until purged
    assert await abuse.purge() == (1, 0)
    assert abuse.bans(include_expired=True) == []
    await offend(abuse, ip)
    fresh = abuse.is_banned(ip)
    assert fresh is not None and fresh.offences == 1 and fresh.until - clock() == 60


async def test_a_ban_survives_a_restart(make_abuse: Factory, tmp_path: Path, key: bytes) -> None:
    first = await make_abuse(auth_failures_per_ip=2, ban_seconds=900)
    await offend(first, "2001:db8:9::1")
    await offend(first, "2001:db8:9::2")
    before = first.is_banned("2001:db8:9::3")
    assert before is not None
    await first.close()
    second = await make_abuse(auth_failures_per_ip=2, ban_seconds=900)
    after = second.is_banned("2001:db8:9::4")
    assert after == before
    refused = await second.on_connect("2001:db8:9::5", "imap")
    assert refused is not None and refused.code == 421


async def test_the_ban_database_needs_its_key(make_abuse: Factory, tmp_path: Path) -> None:
    abuse = await make_abuse(auth_failures_per_ip=1)
    await offend(abuse, "198.51.100.10")
    await abuse.close()
    cfg = config.Settings(data_dir=tmp_path)
    stranger = Abuse(cfg, tmp_path, os.urandom(32))
    with pytest.raises(WrongKey):
        await stranger.start()
    await stranger.close()


def database_files(directory: Path) -> dict[str, bytes]:
    """The abuse database and its WAL and shared-memory files, by name."""
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.name.startswith(FILE_NAME)}


async def test_no_address_or_reason_in_clear_on_disk(make_abuse: Factory, tmp_path: Path) -> None:
    abuse = await make_abuse(auth_failures_per_ip=1)
    await offend(abuse, "198.51.100.77")
    await abuse.ban("203.0.113.99", 3600, "distinctive-reason-text")
    open_files = database_files(tmp_path)  # with the write-ahead log
    await abuse.close()
    closed_files = database_files(tmp_path)
    assert len(open_files) > 1 and closed_files
    for name, data in [*open_files.items(), *closed_files.items()]:
        for needle in (b"198.51.100.77", b"203.0.113.99", b"distinctive-reason-text"):
            assert needle not in data, name


async def test_operator_add_list_remove(make_abuse: Factory, clock: Clock) -> None:
    abuse = await make_abuse()
    ban = await abuse.ban("192.0.2.44", parse_duration("2h"), "spam run")
    assert (ban.network, ban.until, ban.reason, ban.offences) == (
        "192.0.2.44",
        clock() + 7200,
        "spam run",
        1,
    )
    assert [b.network for b in abuse.bans()] == ["192.0.2.44"]
    assert abuse.is_banned("192.0.2.44") == ban
    removed = await abuse.unban("192.0.2.44")
    assert removed == ban
    assert abuse.is_banned("192.0.2.44") is None and abuse.bans(include_expired=True) == []
    assert await abuse.unban("192.0.2.44") is None
    with pytest.raises(BanError):
        await abuse.ban("not-an-address", 60, "x")


async def test_operator_bans_networks(make_abuse: Factory) -> None:
    abuse = await make_abuse()
    await abuse.ban("203.0.113.0/24", 3600, "hosting range")
    await abuse.ban("2001:db8:5::/48", 3600, "v6 range")
    single = await abuse.ban("2001:db8:6::1", 3600, "one host")
    assert abuse.is_banned("203.0.113.200") is not None
    assert abuse.is_banned("203.0.114.1") is None
    assert abuse.is_banned("2001:db8:5:ffff::1") is not None
    assert single.network == "2001:db8:6::/64"
    assert abuse.is_banned("2001:db8:6::ffff") is not None
    assert abuse.is_banned("2001:db8:6:1::1") is None
    await abuse.unban("203.0.113.0/24")
    assert abuse.is_banned("203.0.113.200") is None


async def test_reason_text_cannot_inject_reply_lines(make_abuse: Factory) -> None:
    abuse = await make_abuse()
    await abuse.ban("192.0.2.45", 60, "evil\r\n250 OK\r\nmore" + "x" * 1000)
    refused = await abuse.on_connect("192.0.2.45", "smtp")
    assert refused is not None
    assert "\r" not in refused.text and "\n" not in refused.text
    assert len(refused.smtp_line()) < 512


async def test_a_ban_by_another_process_reaches_the_server(
    make_abuse: Factory, tmp_path: Path
) -> None:
    server = await make_abuse()
    cli = await make_abuse()  # `postvern ban add` opens the same data directory
    await cli.ban("192.0.2.60", 3600, "from the command line")
    assert await server.sync()
    assert server.is_banned("192.0.2.60") is not None
    assert not await server.sync()  # nothing new
    await cli.unban("192.0.2.60")
    assert await server.sync()
    assert server.is_banned("192.0.2.60") is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3600", 3600), ("10m", 600), ("2h", 7200), ("7d", 604800), ("1w", 604800), ("1h30m", 5400)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "soon", "10x", "-5m", "99999w"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(BanError):
        parse_duration(text)


class CountingAccounts:
    """The real Accounts, with a count of password checks (Argon2id runs) made through it."""

    def __init__(self, accounts: Any) -> None:
        self._accounts = accounts
        self.directory = accounts.directory  # the login service reads the 2FA state there
        self.calls = 0

    def authenticate(self, address: str, secret: str) -> Any:
        self.calls += 1
        return self._accounts.authenticate(address, secret)


async def test_banned_client_never_reaches_password_hashing(
    tmp_path: Path, clock: Clock, key: bytes
) -> None:
    address, password = "alice@example.test", "alice-correct-horse"
    data = make_data_dir(tmp_path / "data", passwords={address: password})
    cfg = config.load(data.path, environ={})
    cfg.abuse.auth_failures_per_ip = 2
    abuse = Abuse(cfg, data.path, key, clock=clock)
    await abuse.start()
    svc = services(data)
    try:
        counting = CountingAccounts(svc.app.accounts)
        svc.login.accounts = counting  # type: ignore[assignment]
        svc.login.gate = abuse
        # The right password from a clean address works (and is one KDF run).
        assert (await svc.login.verify(address, password, "192.0.2.1", "imap")).user
        assert counting.calls == 1
        reasons = []
        for _ in range(2):
            with pytest.raises(LoginRefused) as failed:
                await svc.login.verify(address, "wrong", "198.51.100.1", "imap")
            reasons.append(failed.value.reason)
        # the failure that tips the address into a ban says so, so the session can close
        assert reasons == ["failed", "banned"]
        assert counting.calls == 3
        # Banned now: even the right password is refused, and no KDF runs for it.
        with pytest.raises(LoginRefused) as refused:
            await svc.login.verify(address, password, "198.51.100.1", "pop3")
        assert refused.value.reason == "banned"
        assert counting.calls == 3
        await abuse.ban("192.0.2.1", 60, "operator")
        with pytest.raises(LoginRefused):
            await svc.login.verify(address, password, "192.0.2.1", "smtp")
        assert counting.calls == 3
    finally:
        await svc.close()
        await abuse.close()


ADMIN_SCRIPT = """
import asyncio, sys
from pathlib import Path
from postvern import config
from postvern.abuse.admin import opened

async def main(data, key, action, network):
    settings = config.Settings(data_dir=data)
    async with opened(settings, data, key) as abuse:
        if action == "add":
            await abuse.ban(network, 3600, "from another process")
        else:
            await abuse.unban(network)

asyncio.run(main(Path(sys.argv[1]), bytes.fromhex(sys.argv[2]), sys.argv[3], sys.argv[4]))
"""


async def run_admin(data: Path, key: bytes, action: str, network: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ADMIN_SCRIPT, str(data), key.hex(), action, network
    )
    assert await proc.wait() == 0


async def test_operator_commands_from_another_process(
    make_abuse: Factory, tmp_path: Path, key: bytes
) -> None:
    server = await make_abuse()
    await run_admin(tmp_path, key, "add", "192.0.2.61")
    # The server's own periodic sync may have loaded the change already (then this one finds
    # nothing new and answers False): what matters is what the server now holds.
    await server.sync()
    ban = server.is_banned("192.0.2.61")
    assert ban is not None and ban.reason == "from another process"
    await run_admin(tmp_path, key, "remove", "192.0.2.61")
    await server.sync()
    assert server.is_banned("192.0.2.61") is None


def test_ban_table() -> None:
    bans = [
        Ban("192.0.2.1", START + 60, "authentication failures", 2, START, START),
        Ban("2001:db8::/64", START - 1, "unknown recipients", 1, START - 99, START - 99),
    ]
    lines = ban_table(bans, now=START)
    assert lines[0].split() == ["ADDRESS", "UNTIL", "OFFENCES", "REASON"]
    assert lines[1].split()[:4] == ["192.0.2.1", *utc_text(START + 60).split(), "2"]
    assert lines[1].endswith("authentication failures")
    assert lines[2].split()[:3] == ["2001:db8::/64", "expired", "1"]
    # Columns line up.
    until = utc_text(START + 60)
    assert lines[1].index(until) == lines[2].index("expired") == lines[0].index("UNTIL")
