"""One queue id from the SMTP reply to `postvern queue`, and `queue retry` acting at once.

A real `postvern serve` delivers to a receiving MX on loopback (``tests/mta_kit.Sink``, run in
a thread of this process) found through a loopback DNS server; the admin commands run as
real `postvern` subprocesses on the same data directory while the server runs.
"""

from __future__ import annotations

import asyncio
import os
import re
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from dnsserver import DNSTestServer
from harness import (
    DataDir,
    ServerProcess,
    client_tls_context,
    free_port,
    mailbox_messages,
    make_data_dir,
    set_config,
)
from mta_kit import Sink
from postvern.smtp.replies import Reply

ALICE = "alice@example.test"
BOB = "bob@example.test"
SINK_ADDRESS = "127.0.0.5"
WAIT_LIMIT = 30.0  # a bound for what should happen promptly; never asserted as a duration
# Far beyond WAIT_LIMIT: a deferred recipient is tried again within the test only if
# something makes it due now.
RETRY_BASE = 3600.0


class ThreadedSink:
    """A :class:`Sink` on its own event loop thread. Recipients in ``deferring`` get 450."""

    def __init__(self, port: int) -> None:
        self.deferring: set[str] = set()
        self.refusing: set[str] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        sink = Sink(SINK_ADDRESS, port, None, rcpt_reply=self._rcpt_reply)
        self.sink = asyncio.run_coroutine_threadsafe(sink.start(), self.loop).result(10)

    def _rcpt_reply(self, address: str) -> Reply | None:
        if address in self.deferring:
            return Reply(450, "4.2.0", "try again later")
        if address in self.refusing:
            return Reply(550, "5.1.1", "no such user")
        return None

    def received(self, subject: str) -> bool:
        return any(f"Subject: {subject}".encode() in m.message for m in list(self.sink.received))

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.sink.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class World:
    data: DataDir
    process: ServerProcess
    sink: ThreadedSink


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    port = free_port()
    sink = ThreadedSink(port)
    try:
        with DNSTestServer() as dns:
            dns.add("remote.test", "MX", (10, "mx.remote.test"))
            dns.add("mx.remote.test", "A", SINK_ADDRESS)
            data = make_data_dir(tmp_path_factory.mktemp("queue-ids") / "data")
            set_config(data.path, "dns", {"nameservers": [dns.nameserver], "timeout": 2.0})
            set_config(
                data.path,
                "mta",
                {"port": port, "allow_loopback_mx": True, "retry_base": RETRY_BASE},
            )
            app = data.app()
            try:
                app.directory.add_alias("fwd@example.test", ["erin-fwd@remote.test"])
            finally:
                app.close()
            with ServerProcess(data) as process:
                yield World(data, process, sink)
    finally:
        sink.close()


def postvern(data: DataDir, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTVERN_")}
    return subprocess.run(
        [sys.executable, "-m", "postvern.cli", "--data", str(data.path), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def wait_until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_LIMIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


def queued_id(reply: bytes) -> str:
    match = re.fullmatch(rb"2\.0\.0 OK queued as ([0-9A-F]+)", reply)
    assert match, reply
    return match[1].decode()


def submit(world: World, recipient: str, subject: str, sender: str = ALICE) -> str:
    """Submit over real SMTP; the id the 250 reply names."""
    host, port = world.data.addr("submissions")
    message = f"From: {sender}\r\nTo: {recipient}\r\nSubject: {subject}\r\n\r\nHello.\r\n"
    with smtplib.SMTP_SSL(host, port, context=client_tls_context(), timeout=30) as s:
        s.login(sender, world.data.passwords[sender])
        s.mail(sender)
        assert s.rcpt(recipient)[0] == 250
        code, reply = s.data(message.encode())
    assert code == 250, reply
    return queued_id(reply)


def deferred_once(world: World, queue_id: str) -> Callable[[], bool]:
    """The entry is in the queue and its first attempt was deferred by the sink."""

    def check() -> bool:
        shown = postvern(world.data, "queue", "show", queue_id)
        return shown.returncode == 0 and "1 attempts" in shown.stdout and "450" in shown.stdout

    return check


def test_the_reply_id_is_the_queue_entry(world: World) -> None:
    recipient = "carol-show@remote.test"
    world.sink.deferring.add(recipient)
    queue_id = submit(world, recipient, "one id")
    shown = postvern(world.data, "queue", "show", queue_id)
    assert shown.returncode == 0, shown.stderr
    assert f"Queue id:   {queue_id}" in shown.stdout
    assert f"id {queue_id}" in shown.stdout  # the Received header we added names it too
    assert queue_id in postvern(world.data, "queue", "list").stdout
    wait_until(deferred_once(world, queue_id))
    # Every log line about this message names the same id.
    wait_until(lambda: any(f"mta: {queue_id} to remote.test" in t for t in world.process.output))
    assert any(f"submission {queue_id}:" in t for t in world.process.output)


def test_a_forwarded_message_keeps_its_id(world: World) -> None:
    world.sink.deferring.add("erin-fwd@remote.test")
    host, port = world.data.addr("smtp")
    message = b"From: someone@sender.test\r\nTo: fwd@example.test\r\nSubject: fwd\r\n\r\nHi.\r\n"
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail("someone@sender.test")
        assert s.rcpt("fwd@example.test")[0] == 250
        code, reply = s.data(message)
    assert code == 250, reply
    queue_id = queued_id(reply)
    shown = postvern(world.data, "queue", "show", queue_id)
    assert shown.returncode == 0, shown.stderr
    assert "erin-fwd@remote.test" in shown.stdout


def test_submission_to_a_forwarding_alias_is_one_entry(world: World) -> None:
    # The alias's outside address and a remote recipient: one transaction, one entry.
    world.sink.deferring.update({"erin-fwd@remote.test", "frank-both@remote.test"})
    host, port = world.data.addr("submissions")
    message = f"From: {ALICE}\r\nTo: fwd@example.test\r\nSubject: both\r\n\r\nHi.\r\n"
    with smtplib.SMTP_SSL(host, port, context=client_tls_context(), timeout=30) as s:
        s.login(ALICE, world.data.passwords[ALICE])
        s.mail(ALICE)
        assert s.rcpt("fwd@example.test")[0] == 250
        assert s.rcpt("frank-both@remote.test")[0] == 250
        code, reply = s.data(message.encode())
    assert code == 250, reply
    shown = postvern(world.data, "queue", "show", queued_id(reply))
    assert shown.returncode == 0, shown.stderr
    assert "erin-fwd@remote.test" in shown.stdout and "frank-both@remote.test" in shown.stdout


def test_queue_retry_delivers_at_once(world: World) -> None:
    recipient = "dave-retry@remote.test"
    world.sink.deferring.add(recipient)
    queue_id = submit(world, recipient, "retry me")
    wait_until(deferred_once(world, queue_id))  # next try in about an hour
    world.sink.deferring.discard(recipient)
    retried = postvern(world.data, "queue", "retry", queue_id)
    assert retried.returncode == 0, retried.stderr
    assert "no running server" not in retried.stdout
    wait_until(lambda: world.sink.received("retry me"))
    wait_until(lambda: postvern(world.data, "queue", "show", queue_id).returncode != 0)
    gone = postvern(world.data, "queue", "show", queue_id)
    assert f"no queue entry {queue_id}" in gone.stderr


def test_queue_retry_without_a_server_says_so(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = make_data_dir(tmp_path / "data", passwords={})
    retried = postvern(data, "queue", "retry")
    assert retried.returncode == 0, retried.stderr
    assert "no running server was reached" in retried.stdout


def test_a_bounce_for_a_removed_sender_reaches_the_postmaster(world: World) -> None:
    """Bob's message bounces after bob was removed: the notice goes to the postmaster (alice,
    the first user) instead of nowhere. Last in the module: bob is gone afterwards."""
    recipient = "zed-bounce@remote.test"
    world.sink.deferring.add(recipient)
    queue_id = submit(world, recipient, "bounce me", sender=BOB)
    wait_until(deferred_once(world, queue_id))
    removed = postvern(world.data, "user", "remove", BOB, "--yes")
    assert removed.returncode == 0, removed.stderr
    world.data.passwords.pop(BOB)
    world.sink.deferring.discard(recipient)
    world.sink.refusing.add(recipient)
    assert postvern(world.data, "queue", "retry", queue_id).returncode == 0

    def notice_for_postmaster() -> bool:
        return any(
            b"zed-bounce@remote.test" in raw and b"Content-Type: multipart/report" in raw
            for raw in mailbox_messages(world.data, ALICE)
        )

    wait_until(notice_for_postmaster)
