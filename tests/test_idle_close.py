"""A mailbox whose every session is in IDLE closes its SQLite connection (issue #15).

Fifty thousand IDLE sessions must fit in 2 GiB; an open encrypted SQLite connection is
about 160 KiB, so a mailbox whose sessions all sit in IDLE hibernates
(``Mailbox.hibernate``, ``MailboxRegistry._arm_hibernation``): it keeps its key, its
listeners and what it knew of each folder, and reopens on the next use.

First the store alone: a hibernating mailbox notices another process's commit from the
file's signature without reopening, then reopens and tells it. Then a real ``postvern
serve`` with two workers and real TLS IMAP clients: the IDLE session's worker closes the
file (seen in /proc), an APPEND on the other worker and an SMTP delivery still reach the
IDLE session, the mailbox goes back to sleep, and after DONE the next command reads every
message intact.

Between them, the registry with many users each idle in one session: their connections'
memory goes back to the system once they sleep (one ``malloc_trim`` for all of them), so a
sleeping user costs the process about what its objects take, not the high-water mark of
mailboxes awake at once (bench/imap_idle.py with ``--users`` equal to ``--sessions``).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from dnsserver import DNSTestServer
from harness import DataDir, ServerProcess, free_port, make_data_dir, set_config
from postvern.store.mailbox import INBOX, Mailbox
from test_workers import Idler, World, one_per_worker, send_mx, wait_until

ALICE = "alice@example.test"
KEY = bytes(range(32))
SPOOL_KEY = bytes(32)


# -- the store alone -------------------------------------------------------------------------


@pytest.fixture
def shared_store(tmp_path: Path) -> Iterator[Path]:
    """Mailbox.shared as with several workers (another connection may write the file)."""
    before = Mailbox.shared
    Mailbox.shared = True
    try:
        path = tmp_path / "box.sqlite"
        Mailbox.create(path, KEY, SPOOL_KEY).close()
        yield path
    finally:
        Mailbox.shared = before


def test_hibernating_mailbox_hears_another_connection(shared_store: Path) -> None:
    sleeper = Mailbox.open(shared_store, KEY)
    writer = Mailbox.open(shared_store, KEY)
    heard: list[str] = []
    sleeper.subscribe(lambda change: heard.append(change.kind))
    try:
        inbox = sleeper.folder(INBOX).id
        sleeper.append(inbox, b"Subject: one\r\n\r\nfirst\r\n")
        assert sleeper.hibernate()
        assert sleeper.hibernating
        assert sleeper.poll_external() == 0  # nothing written: no reopen, nothing told
        assert sleeper.hibernating
        writer.append(inbox, b"Subject: two\r\n\r\nsecond\r\n")
        assert sleeper.poll_external() == 1  # the signature moved: reopened and told
        assert not sleeper.hibernating
        assert heard[-1] == "append"
        # A call in flight keeps it awake; the next use after a hibernation reopens it.
        with sleeper.using():
            assert not sleeper.hibernate()
        assert sleeper.hibernate()
        raws = [sleeper.raw(inbox, uid) for uid in sleeper.uids(inbox)]
        assert not sleeper.hibernating
        assert raws == [b"Subject: one\r\n\r\nfirst\r\n", b"Subject: two\r\n\r\nsecond\r\n"]
    finally:
        sleeper.close()
        writer.close()


def test_last_connection_closing_leaves_a_signature_that_still_moves(
    shared_store: Path,
) -> None:
    """The hibernating connection was the only one (its close removed the WAL and its
    index); another connection that opens, commits and closes is still noticed."""
    sleeper = Mailbox.open(shared_store, KEY)
    try:
        inbox = sleeper.folder(INBOX).id
        assert sleeper.hibernate()
        assert not Path(f"{shared_store}-wal").exists()
        with Mailbox.open(shared_store, KEY) as writer:
            writer.append(inbox, b"Subject: later\r\n\r\nwhile it slept\r\n")
        assert sleeper.poll_external() == 1
        assert [m.uid for m in sleeper.messages(inbox)] == [1]
    finally:
        sleeper.close()


# -- the registry: many users, one idle session each ------------------------------------------

SLEEPERS = 24  # users, each with one session in IDLE


def rss_kib() -> int:
    text = Path("/proc/self/smaps_rollup").read_text()
    match = re.search(r"^Rss:\s+(\d+) kB", text, re.M)
    assert match is not None
    return int(match.group(1))


async def until(check: object, what: str, seconds: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not check():  # type: ignore[operator]
        assert loop.time() < deadline, what
        await asyncio.sleep(0.1)


# -- a real server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with DNSTestServer() as dns:
        data = make_data_dir(
            tmp_path_factory.mktemp("idle-close") / "data", listeners=("smtp", "imap")
        )
        set_config(data.path, "dns", {"nameservers": [dns.nameserver], "timeout": 2.0})
        set_config(data.path, "mta", {"port": free_port(), "allow_loopback_mx": True})
        set_config(data.path, "limits", {"auth_failure_delay": 0.05})
        with ServerProcess(data, env={"POSTVERN_SERVER__WORKERS": "2"}) as server:
            yield World(data, server, None)  # type: ignore[arg-type]  # no outbound sink


def mailbox_file(data: DataDir, address: str) -> str:
    app = data.app()
    try:
        user = app.accounts.directory.user(address)
        assert user is not None
        return str(app.accounts.mailbox_path(user))
    finally:
        app.close()


def process_tree(pid: int) -> list[int]:
    out = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in f.read().split():
                out += process_tree(int(child))
    return out


def open_files(pid: int) -> set[str]:
    found = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                pass  # closed meanwhile
    except FileNotFoundError:
        pass
    return found


def hibernating_in(world: World, path: str) -> bool:
    """Some worker holds the mailbox's flock descriptor but no SQLite connection (which
    would have the WAL open): its sessions' mailbox sleeps."""
    assert world.server.proc is not None
    for pid in process_tree(world.server.proc.pid):
        files = open_files(pid)
        if path in files and f"{path}-wal" not in files:
            return True
    return False


def test_idle_session_sleeps_and_still_hears_everything(world: World) -> None:
    path = mailbox_file(world.data, ALICE)
    clients = one_per_worker(world)
    watcher, actor = clients["0"], clients["1"]
    try:
        for client in (watcher, actor):
            client.login(ALICE, world.data.passwords[ALICE])
        _, data = watcher.select("INBOX")
        exists = int(data[0])
        actor.select("INBOX")
        assert not hibernating_in(world, path)  # both workers have it open
        idle = Idler(watcher)
        wait_until(lambda: hibernating_in(world, path), "the IDLE worker closes the file")

        appended = b"From: a@example.test\r\nSubject: appended\r\n\r\nby the other worker\r\n"
        typ, _ = actor.append("INBOX", None, None, appended)
        assert typ == "OK"
        wait_until(lambda: idle.saw(rb"^\* %d EXISTS" % (exists + 1)), "EXISTS after APPEND")
        wait_until(lambda: hibernating_in(world, path), "asleep again after the report")

        actor.logout()  # now only the IDLE worker has it (asleep): SMTP wakes it or spools
        send_mx(world, ALICE, "during-idle")
        wait_until(lambda: idle.saw(rb"^\* %d EXISTS" % (exists + 2)), "EXISTS after SMTP")
        idle.done()
        assert idle.saw(rb"^i1 OK")

        typ, data = watcher.fetch(f"{exists + 1}:{exists + 2}", "(BODY.PEEK[])")
        assert typ == "OK"
        bodies = [item[1] for item in data if isinstance(item, tuple)]
        assert bodies[0] == appended
        assert b"Subject: during-idle" in bodies[1] and bodies[1].endswith(b"\r\n\r\nhi\r\n")
        typ, _ = watcher.noop()
        assert typ == "OK"
    finally:
        for client in clients.values():
            try:
                client.shutdown()
            except OSError:
                pass
