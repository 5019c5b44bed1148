"""Several worker processes (``[server] workers = 2``) behind one set of listeners.

One real ``postvern serve`` with two workers for the module. Real clients (imaplib, smtplib,
raw IDLE) connect until they have landed on both workers — the IMAP ID response names the
worker, and every log line of a worker carries ``[wN]`` — and check what must be shared:
mail delivered over SMTP through either worker arrives once; what one worker's session does
to a mailbox reaches an IDLE session on the other; a ban one worker makes holds in the
other; the outbound queue is delivered once (only worker 0 runs the MTA); and a worker
killed with SIGKILL is restarted without losing a message it had accepted.
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import re
import signal
import smtplib
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dnsserver import DNSTestServer
from harness import (
    DataDir,
    ServerProcess,
    SocketActivated,
    client_tls_context,
    free_port,
    mailbox_messages,
    make_data_dir,
    set_config,
)
from test_queue_ids import SINK_ADDRESS, ThreadedSink
from test_zero_downtime import FollowedServer, become_subreaper, send_one

ALICE = "alice@example.test"
BOB = "bob@example.test"
WAIT_LIMIT = 30.0  # a bound for what should happen promptly; never asserted as a duration
# Connections tried while looking for one on each worker: the kernel gives each connection
# to whichever worker accepts first, so a handful almost always reach both.
FIND_ATTEMPTS = 60
# The client address the ban test uses: loopback, but outside the allowlist below.
GUESSER = "127.0.0.7"
AUTH_FAILURES = 3


@dataclass
class World:
    data: DataDir
    server: ServerProcess
    sink: ThreadedSink


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    port = free_port()
    sink = ThreadedSink(port)
    try:
        with DNSTestServer() as dns:
            dns.add("remote.test", "MX", (10, "mx.remote.test"))
            dns.add("mx.remote.test", "A", SINK_ADDRESS)
            data = make_data_dir(
                tmp_path_factory.mktemp("workers") / "data",
                listeners=("smtp", "submissions", "imap"),
            )
            set_config(data.path, "dns", {"nameservers": [dns.nameserver], "timeout": 2.0})
            set_config(data.path, "mta", {"port": port, "allow_loopback_mx": True})
            # A mailbox closes with its last session, so which worker has it open (and so
            # whether a delivery goes into it or into the spool) is up to each test.
            set_config(
                data.path, "limits", {"auth_failure_delay": 0.05, "mailbox_linger_seconds": 0}
            )
            set_config(
                data.path,
                "abuse",
                {"allowlist": ["127.0.0.1/32", "::1"], "auth_failures_per_ip": AUTH_FAILURES},
            )
            env = {"POSTVERN_SERVER__WORKERS": "2"}
            with ServerProcess(data, env=env) as server:
                yield World(data, server, sink)
    finally:
        sink.close()


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_LIMIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in time: {what}")
        time.sleep(0.05)


# -- IMAP clients that know their worker ------------------------------------------------------


class Imap(imaplib.IMAP4):
    """imaplib over STARTTLS from a chosen loopback source address."""

    def __init__(self, address: tuple[str, int], source: str = "127.0.0.1") -> None:
        self.source = source
        super().__init__(*address, timeout=10)
        self.starttls(client_tls_context())

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source, 0)
        )

    def worker(self) -> str:
        typ, _ = self.xatom("ID", "NIL")
        assert typ == "OK"
        (data,) = self.untagged_responses.pop("ID")
        match = re.search(rb'"worker" "(\d+)"', data)
        assert match, data
        return match[1].decode()


def one_per_worker(world: World, source: str = "127.0.0.1") -> dict[str, Imap]:
    """A connection on worker 0 and one on worker 1 (others are closed)."""
    found: dict[str, Imap] = {}
    for _ in range(FIND_ATTEMPTS):
        client = Imap(world.data.addr("imap"), source)
        worker = client.worker()
        if worker in found:
            client.shutdown()
            continue
        found[worker] = client
        if len(found) == 2:
            return found
    raise AssertionError(f"every connection landed on worker {sorted(found)}")


def close_all(clients: dict[str, Imap]) -> None:
    for client in clients.values():
        with contextlib.suppress(OSError):
            client.shutdown()


def login(client: Imap, world: World, user: str) -> None:
    client.login(user, world.data.passwords[user])


class Idler:
    """An IMAP session in IDLE on the selected INBOX; collects the untagged lines."""

    def __init__(self, client: Imap) -> None:
        self.client = client
        self.lines: list[bytes] = []
        client.send(b"i1 IDLE\r\n")
        assert client.readline().startswith(b"+")
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                line = self.client.readline()
            except OSError:
                return
            if not line:
                return
            self.lines.append(line)
            if line.startswith(b"i1 "):
                return

    def saw(self, pattern: bytes) -> bool:
        return any(re.search(pattern, line) for line in list(self.lines))

    def done(self) -> None:
        self.client.send(b"DONE\r\n")
        self.thread.join(WAIT_LIMIT)


# -- SMTP --------------------------------------------------------------------------------------


def send_mx(world: World, recipient: str, subject: str) -> str:
    """One message over a new SMTP connection to the MX; its queue id from the 250."""
    message = f"From: <x@sender.test>\r\nTo: <{recipient}>\r\nSubject: {subject}\r\n\r\nhi\r\n"
    with smtplib.SMTP(*world.data.addr("smtp"), timeout=30) as s:
        s.ehlo("client.test")
        s.mail("x@sender.test")
        assert s.rcpt(recipient)[0] == 250
        code, reply = s.data(message.encode())
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[-1]


def workers_that_logged(world: World, queue_ids: set[str]) -> Counter[str]:
    """Which worker answered each message, from its ``message <id>: 250`` log line."""
    counts: Counter[str] = Counter()
    for line in list(world.server.output):
        match = re.search(r"postvern\.smtp\.mx\[w(\d)\]: message (\S+): 250", line)
        if match and match[2] in queue_ids:
            counts[match[1]] += 1
    return counts


def inbox_subjects(world: World, user: str) -> Counter[str]:
    client = Imap(world.data.addr("imap"))
    try:
        login(client, world, user)
        client.select("INBOX", readonly=True)
        typ, data = client.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK"
        found: Counter[str] = Counter()
        for item in data:
            if isinstance(item, tuple):
                found[item[1].decode().strip().removeprefix("Subject: ")] += 1
        return found
    finally:
        client.logout()


def mx_deliveries(world: World, recipient: str, tag: str, count: int) -> set[str]:
    ids = set()
    for i in range(count):
        ids.add(send_mx(world, recipient, f"{tag}-{i}"))
    return ids


# -- the tests ---------------------------------------------------------------------------------


def test_smtp_deliveries_over_both_workers_arrive_once(world: World) -> None:
    ids: set[str] = set()
    sent = 0
    # Until both workers have answered some (each connection goes to one of them).
    while sent < 12 or len(workers_that_logged(world, ids)) < 2:
        ids.add(send_mx(world, BOB, f"spread-{sent}"))
        sent += 1
        assert sent < FIND_ATTEMPTS, "every SMTP connection landed on one worker"
    wait_until(lambda: sum(workers_that_logged(world, ids).values()) == sent, "log lines")
    subjects = inbox_subjects(world, BOB)
    mine = {s: n for s, n in subjects.items() if s.startswith("spread-")}
    assert mine == {f"spread-{i}": 1 for i in range(sent)}


def burst(world: World, size: int) -> Counter[str]:
    """``size`` IMAP connections opened at once: how many reached each worker."""
    raw = [socket.create_connection(world.data.addr("imap"), timeout=10) for _ in range(size)]
    try:
        workers: Counter[str] = Counter()
        for number, sock in enumerate(raw):
            reader = sock.makefile("rb")
            assert reader.readline().startswith(b"* OK")
            sock.sendall(b"t%d ID NIL\r\n" % number)
            match = re.search(rb'"worker" "(\d)"', reader.readline())
            assert match
            workers[match[1].decode()] += 1
        return workers
    finally:
        for sock in raw:
            sock.close()


def test_a_burst_of_connections_is_spread_over_both_workers(world: World) -> None:
    """Sixteen clients connecting at once (a sending MTA opening its connections, a client
    reconnecting its folders) reach both workers: a worker takes one connection per turn of
    its loop, not the whole accept queue (before, most bursts went to one worker alone).
    On a loaded machine one worker's loop may not come round during some burst, so most
    of six bursts, not all, must reach both."""
    seen = [burst(world, 16) for _ in range(6)]
    assert sum(set(workers) == {"0", "1"} for workers in seen) >= 4, seen


def test_idle_on_one_worker_hears_the_other(world: World) -> None:
    """APPEND, STORE and EXPUNGE through worker B reach an IDLE session on worker A; and a
    delivery that goes to the sealed spool (the delivering worker has the mailbox locked)
    is imported by the worker that has it open and heard there too."""
    clients = one_per_worker(world)
    watcher, actor = clients["0"], clients["1"]
    try:
        login(watcher, world, ALICE)
        login(actor, world, ALICE)
        typ, data = watcher.select("INBOX")
        exists = int(data[0])
        actor.select("INBOX")
        idle = Idler(watcher)
        message = b"From: a@example.test\r\nSubject: appended\r\n\r\nby the other worker\r\n"
        typ, _ = actor.append("INBOX", None, None, message)
        assert typ == "OK"
        wait_until(lambda: idle.saw(rb"^\* %d EXISTS" % (exists + 1)), "EXISTS after APPEND")
        typ, _ = actor.store(str(exists + 1), "+FLAGS", "(\\Flagged)")
        assert typ == "OK"
        wait_until(lambda: idle.saw(rb"^\* %d FETCH .*\\Flagged" % (exists + 1)), "FETCH")
        actor.store(str(exists + 1), "+FLAGS", "(\\Deleted)")
        actor.expunge()
        wait_until(lambda: idle.saw(rb"^\* %d EXPUNGE" % (exists + 1)), "EXPUNGE")
        actor.logout()
        # Now only worker 0 has alice's mailbox open: what worker 1 accepts goes to the
        # spool and is imported by worker 0; either way the IDLE session hears of it.
        ids = mx_deliveries(world, ALICE, "idle-mx", 6)
        wait_until(lambda: idle.saw(rb"^\* %d EXISTS" % (exists + 6)), "EXISTS after SMTP")
        idle.done()
        assert workers_that_logged(world, ids)
    finally:
        close_all(clients)


def test_spooled_by_one_worker_imported_by_the_other(world: World) -> None:
    """Bob's mailbox is open only in worker 0 (his IDLE session); messages that worker 1
    accepts go to the sealed spool, and worker 0 imports them, each once."""
    clients = one_per_worker(world)
    watcher = clients["0"]
    clients["1"].shutdown()
    try:
        login(watcher, world, BOB)
        _, data = watcher.select("INBOX")
        exists = int(data[0])
        idle = Idler(watcher)
        ids: set[str] = set()
        while len(ids) < 4 or "1" not in workers_that_logged(world, ids):
            ids.add(send_mx(world, BOB, f"spooled-{len(ids)}"))
            assert len(ids) < FIND_ATTEMPTS, "no SMTP connection landed on worker 1"
        total = exists + len(ids)
        wait_until(lambda: idle.saw(rb"^\* %d EXISTS" % total), "every delivery heard")
        idle.done()
        assert any("message(s) another worker spooled" in line for line in world.server.output)
    finally:
        watcher.shutdown()
    subjects = inbox_subjects(world, BOB)
    assert {s: n for s, n in subjects.items() if s.startswith("spooled-")} == {
        f"spooled-{i}": 1 for i in range(len(ids))
    }


def test_failures_count_and_bans_hold_across_workers(world: World) -> None:
    """Failed logins on both workers add up to one allowance; the ban the last one makes in
    worker 0 refuses the client in worker 1 too."""
    clients = one_per_worker(world, GUESSER)
    try:
        # On neither worker alone would these reach the limit of three.
        for worker in ("1", "0"):
            with pytest.raises(imaplib.IMAP4.error, match="authentication failed"):
                clients[worker].login("nobody@example.test", "guess")
        # Worker 0 bans on its second failure only because worker 1's counted too.
        with pytest.raises(imaplib.IMAP4.error, match="too many failed logins"):
            clients["0"].login("nobody@example.test", "guess")
        with pytest.raises(imaplib.IMAP4.error, match="blocked until"):
            login(clients["0"], world, ALICE)
        # Once the ban has reached worker 1, no new connection from the client gets a
        # greeting from either worker.
        wait_until(lambda: all(greeting_refused(world) for _ in range(10)), "ban everywhere")
        # And worker 1 refuses the right password on the connection it had already open.
        with pytest.raises(imaplib.IMAP4.error, match="blocked until"):
            login(clients["1"], world, ALICE)
    finally:
        close_all(clients)


def greeting_refused(world: World) -> bool:
    """A new connection from the guesser's address is answered BYE at once."""
    with socket.create_connection(
        world.data.addr("imap"), timeout=10, source_address=(GUESSER, 0)
    ) as s:
        return s.makefile("rb").readline().startswith(b"* BYE")


def submit(world: World, recipient: str, subject: str) -> None:
    message = f"From: {ALICE}\r\nTo: {recipient}\r\nSubject: {subject}\r\n\r\nHello.\r\n"
    host, port = world.data.addr("submissions")
    with smtplib.SMTP_SSL(host, port, context=client_tls_context(), timeout=30) as s:
        s.login(ALICE, world.data.passwords[ALICE])
        s.sendmail(ALICE, [recipient], message.encode())


def test_outbound_queue_delivered_once(world: World) -> None:
    """Submissions through both workers; only worker 0's MTA delivers, woken by the other
    worker's enqueues, and each message reaches the remote MX once."""
    subjects: list[str] = []

    def queued_by_worker_1() -> int:
        return sum(
            1 for line in list(world.server.output) if "postvern.smtp.submission[w1]" in line
        )

    while len(subjects) < 10 or queued_by_worker_1() < 3:
        subjects.append(f"out-{len(subjects)}")
        submit(world, "erin@remote.test", subjects[-1])
        assert len(subjects) < FIND_ATTEMPTS, "no submission landed on worker 1"

    def arrived() -> Counter[str]:
        return Counter(
            s
            for m in list(world.sink.sink.received)
            for s in subjects
            if f"Subject: {s}\r\n".encode() in m.message
        )

    wait_until(lambda: set(arrived()) == set(subjects), "every submission delivered")
    time.sleep(1.0)  # room for a second delivery, if there were one, to show up
    assert arrived() == Counter({s: 1 for s in subjects})
    assert not any(re.search(r"postvern\.mta\.\S*\[w1\]", line) for line in world.server.output)


def test_killed_worker_is_restarted_and_loses_nothing(world: World) -> None:
    """SIGKILL one worker while mail flows through both: the supervisor starts it again,
    and every message that was answered 250 is in the mailbox, once."""
    accepted: list[str] = []
    stop = threading.Event()

    def sender() -> None:
        n = 0
        while not stop.is_set():
            try:
                send_mx(world, ALICE, f"kill-{n}")
            except (OSError, smtplib.SMTPException, AssertionError):
                pass  # a connection the killed worker had: not answered 250, may be lost
            else:
                accepted.append(f"kill-{n}")
            n += 1

    def worker_pid(index: int) -> int:
        pids = [
            int(m[1])
            for line in list(world.server.output)
            if (m := re.search(rf"worker {index} \(pid (\d+)\) ready", line))
        ]
        return pids[-1]

    victim = worker_pid(1)
    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(accepted) >= 5, "mail flowing")
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: worker_pid(1) != victim, "worker 1 restarted")
        count = len(accepted)
        wait_until(lambda: len(accepted) >= count + 5, "mail flowing after the restart")
    finally:
        stop.set()
        thread.join(WAIT_LIMIT)
    subjects = inbox_subjects(world, ALICE)
    assert {s: subjects[s] for s in accepted} == {s: 1 for s in accepted}
    assert any(f"worker 1 (pid {victim}) exited" in line for line in world.server.output)


# -- the supervisor under systemd socket activation and the SIGUSR2 handoff -------------------


@pytest.fixture
def lone(tmp_path: Path) -> Iterator[DataDir]:
    """A data directory of its own (these tests restart and stop the server)."""
    become_subreaper()  # a handoff's successor outlives its parent, our child
    with DNSTestServer() as dns:
        data = make_data_dir(tmp_path / "data", listeners=("smtp", "imap"))
        set_config(data.path, "dns", {"nameservers": [dns.nameserver], "timeout": 2.0})
        set_config(data.path, "server", {"workers": 2})
        yield data


def worker_pids(lines: list[str]) -> set[int]:
    return {int(m[1]) for line in lines if (m := re.search(r"worker \d \(pid (\d+)\) ready", line))}


def test_sigusr2_hands_over_to_a_new_supervisor_and_workers(lone: DataDir) -> None:
    server = FollowedServer(lone).start()
    try:
        assert send_one(lone.addr("smtp"), "before-handoff") == 250
        old_workers = worker_pids(server.output)
        assert len(old_workers) == 2
        old = server.pid()
        new = server.restart()  # the old supervisor exited 0 (checked there)
        assert new != old
        # The old supervisor stopped its workers before it exited.
        for pid in old_workers:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert len(worker_pids(server.output) - old_workers) == 2
        assert send_one(lone.addr("smtp"), "after-handoff") == 250
    finally:
        assert server.stop() == 0
    stored = b"\n".join(mailbox_messages(lone, ALICE, folder=None))
    assert b"before-handoff" in stored and b"after-handoff" in stored


def test_systemd_socket_activation_with_workers(lone: DataDir) -> None:
    """systemd-socket-activate passes the sockets to the supervisor, which hands them to
    its workers; the connection that started it all is served."""
    activated = SocketActivated.start(
        lone.path, [lone.listen["smtp"], lone.listen["imap"]], "smtp:imap"
    )
    proc, lines, ready = activated.proc, activated.lines, activated.ready
    try:
        wait_until(lambda: activated.listening() == 2, "activation")
        assert send_one(lone.addr("smtp"), "activated-first") == 250
        assert ready.wait(WAIT_LIMIT), "\n".join(lines)
        assert any("serving with 2 worker processes" in line for line in lines)
        assert len(worker_pids(lines)) == 2
        assert send_one(lone.addr("smtp"), "activated-second") == 250
        assert not any("matches no [listen] entry" in line for line in lines), lines
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(WAIT_LIMIT)
    assert proc.returncode == 0, "\n".join(lines)
    stored = b"\n".join(mailbox_messages(lone, ALICE, folder=None))
    assert b"activated-first" in stored and b"activated-second" in stored


# -- two processes on one mailbox, without the server -----------------------------------------

CONCURRENT_ROUNDS = 100


def _append_and_import(path: str, password: str, tag: str, start: object) -> int:
    """In a process of its own, as a worker would, while the other process does the same:
    each round deposit one message in the spool (as a worker with the mailbox locked does),
    append one (a client's APPEND) and import the spool; returns how many it imported."""
    from postvern.app import App
    from postvern.store.mailbox import Mailbox
    from postvern.store.spool import SpoolItem, import_spool

    Mailbox.shared = True
    app = App.open(Path(path))
    try:
        unlocked = app.accounts.authenticate(ALICE, password)
        user, spool = unlocked.user, app.accounts.spool
        with Mailbox.open(app.accounts.mailbox_path(user), unlocked.mailbox_key) as box:
            inbox = box.folder("INBOX").id
            start.wait()  # type: ignore[attr-defined]  # a Barrier: both begin together
            imported = 0
            for i in range(CONCURRENT_ROUNDS):
                raw = f"Subject: {tag}-spooled-{i}\r\n\r\nspooled\r\n".encode()
                spool.deposit(user.id, user.spool_public, SpoolItem(raw))
                box.append(inbox, f"Subject: {tag}-{i}\r\n\r\nappended\r\n".encode())
                imported += len(import_spool(box, spool, user.id))
            return imported
    finally:
        app.close()


def test_two_processes_append_and_import_the_spool_once(tmp_path: Path) -> None:
    """Two processes with one mailbox open append at the same time (IMMEDIATE transactions
    wait for each other instead of failing with SQLITE_BUSY) and import one spool at the
    same time (one importer at a time, flock): every message arrives once."""
    import multiprocessing

    data = make_data_dir(tmp_path / "d", listeners=())
    context = multiprocessing.get_context("spawn")
    start = context.Manager().Barrier(2)
    with context.Pool(2) as pool:
        results = [
            pool.apply_async(
                _append_and_import, (str(data.path), data.passwords[ALICE], tag, start)
            )
            for tag in ("a", "b")
        ]
        imported = [r.get(WAIT_LIMIT * 4) for r in results]
    found = Counter(
        raw.split(b"\r\n", 1)[0].decode().removeprefix("Subject: ")
        for raw in mailbox_messages(data, ALICE)
    )
    expected = Counter(
        f"{tag}{kind}-{i}" for tag in "ab" for kind in ("", "-spooled")
        for i in range(CONCURRENT_ROUNDS)
    )  # fmt: skip
    assert found == expected
    assert sum(imported) <= 2 * CONCURRENT_ROUNDS  # the rest, if any, at the last unlock


async def test_the_portal_is_served_by_worker_0_and_its_sessions_hold(tmp_path: Path) -> None:
    """HTTPS is opened in worker 0 alone (a portal session holds the unlocked mailbox key
    in that process's memory): a session made at login holds over new connections."""
    import aiohttp

    from portal_kit import Browser

    data = make_data_dir(tmp_path / "d", listeners=("https", "imap"))
    with ServerProcess(data, env={"POSTVERN_SERVER__WORKERS": "2"}) as server:
        browser = Browser(data)
        await browser.http.close()
        browser.http = aiohttp.ClientSession(  # a new connection for every request
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            connector=aiohttp.TCPConnector(ssl=client_tls_context(), force_close=True),
        )
        try:
            await browser.login(ALICE, data.passwords[ALICE])
            for _ in range(8):
                response = await browser.get("/account/")
                assert response.status == 200 and "Recent logins" in browser.last
        finally:
            await browser.close()
        listening = [line for line in server.output if "listening for" in line]
    https = [line for line in listening if "listening for https" in line]
    assert len(https) == 1 and "postvern[w0]" in https[0], listening
    imap = [line for line in listening if "listening for imap " in line]
    assert {re.search(r"\[w(\d)\]", line)[1] for line in imap} == {"0", "1"}  # type: ignore[index]
